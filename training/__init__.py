"""Training one LoRA per bird family: licensed photos in, a diffusers LoRA with its attribution out.

- `birdgen.training.dataset`: `BirdDataset` (licence / size / sharpness / family gates with reasons,
  deterministic augmentation, captions from the serving templates, SDXL micro-conditioning) and the
  attribution files.
- `birdgen.training.config`: `TrainConfig`, the settings of a run (no torch; the CLI reads it).
- `birdgen.training.lora`: `train_lora(config) -> TrainResult` (peft + accelerate, exact resume).

Nothing is imported here, so `birdgen.training.config` stays cheap to import. See docs/training.md.
"""
