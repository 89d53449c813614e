"""What birdgen is measured against, in the same run on the same machine:

- diffusers' own pipelines on the same model folder, run the way a user would: eager (fp16 on CUDA,
  fp32 on CPU) and with `torch.compile`, one request at a time;
- the compute floor: the FLOPs one request needs (torch's FlopCounterMode over the models, built on
  the meta device so no weights are needed and nothing is computed) divided by the matrix
  throughput this machine reaches (a timed large matmul: bf16 on CUDA, fp32 on CPU).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from birdgen.benchmarks.scenarios import Scenario
from birdgen.contracts import MOTION_ADAPTER
from birdgen.prompts import PromptLibrary
from birdgen.schema import parse_animation_request, parse_image_request


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def matmul_flops_per_s(device: str, min_seconds: float = 1.0, size: int | None = None) -> dict[str, Any]:
    """Best FLOP/s of repeated square matmuls: bf16 on CUDA (the tensor cores' dtype), fp32 on CPU."""
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n = size or (8192 if device == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # first call: allocation, library init
    _sync(device)
    best, spent = float("inf"), 0.0
    while spent < min_seconds:
        start = time.perf_counter()
        a @ b
        _sync(device)
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
    return {"flops_per_s": 2 * n**3 / best, "dtype": str(dtype).removeprefix("torch."), "size": n}


def _meta_models(model_dir: Path, animation: bool) -> dict[str, Any]:
    """The folder's models built from their configs on the meta device: shapes without weights."""
    import torch
    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel, UNetMotionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        models = {
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(model_dir / "text_encoder")),
            "text_encoder_2": CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(model_dir / "text_encoder_2")
            ),
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model_dir / "unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(model_dir / "vae")),
        }
        if animation:
            adapter = MotionAdapter.from_config(MotionAdapter.load_config(model_dir / MOTION_ADAPTER))
            models["unet"] = UNetMotionModel.from_unet2d(models["unet"], adapter)
    return {name: model.eval() for name, model in models.items()}


def _count(run: Callable[[], Any]) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        run()
    return int(counter.get_total_flops())


def request_flops(model_dir: Path, scenario: Scenario) -> dict[str, int]:
    """FLOPs of one request: both text encoders, `steps` UNet passes (the motion UNet over all
    frames for an animation) and the VAE decode of every frame. Guidance 0: one UNet pass per step."""
    import torch

    model_dir = Path(model_dir)
    models = _meta_models(model_dir, scenario.kind == "animation")
    te, te2, unet, vae = (models[k] for k in ("text_encoder", "text_encoder_2", "unet", "vae"))
    tokens = te.config.max_position_embeddings
    latent = scenario.size // 2 ** (len(vae.config.block_out_channels) - 1)
    frames = max(scenario.frames, 1)
    channels = unet.config.in_channels

    def ids() -> torch.Tensor:
        return torch.zeros(1, tokens, dtype=torch.long, device="meta")

    # Per frame for the motion UNet (which repeats the added embeddings per frame itself).
    hidden = torch.empty(frames, tokens, te.config.hidden_size + te2.config.hidden_size, device="meta")
    added = {
        "text_embeds": torch.empty(1, te2.config.projection_dim, device="meta"),
        "time_ids": torch.empty(1, 6, device="meta"),
    }
    clip = (frames,) if scenario.kind == "animation" else ()
    sample = torch.empty(1, channels, *clip, latent, latent, device="meta")
    t = torch.ones(1, device="meta")
    counts = {
        "text_encoders": _count(lambda: te(ids(), output_hidden_states=True))
        + _count(lambda: te2(ids(), output_hidden_states=True)),
        "unet_step": _count(lambda: unet(sample, t, hidden, added_cond_kwargs=added)),
        "vae_decode": _count(
            lambda: vae.decode(torch.empty(frames, channels, latent, latent, device="meta"))
        ),
    }
    counts["total"] = counts["text_encoders"] + scenario.steps * counts["unet_step"] + counts["vae_decode"]
    return counts


class DiffusersBaseline:
    """A diffusers pipeline on the model folder, timed one request at a time.

    StableDiffusionXLPipeline for images, AnimateDiffSDXLPipeline (with the folder's motion adapter)
    for clips. `compile` wraps the UNet and the VAE decoder in torch.compile as diffusers' docs
    recommend (channels-last, max-autotune, full graph). Output as PIL images, as a user gets them;
    birdgen also encodes PNG/WebP with metadata inside its time.
    """

    def __init__(self, model_dir: Path, scenario: Scenario, mode: str, device: str) -> None:
        import torch
        from diffusers import AnimateDiffSDXLPipeline, MotionAdapter, StableDiffusionXLPipeline
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # the loading bar; the pipeline's own is disabled below
        self.scenario, self.device = scenario, device
        dtype = torch.float16 if device == "cuda" else torch.float32
        if scenario.kind == "animation":
            adapter = MotionAdapter.from_pretrained(
                Path(model_dir) / MOTION_ADAPTER, dtype=dtype, use_safetensors=True
            )
            pipe = AnimateDiffSDXLPipeline.from_pretrained(
                model_dir, motion_adapter=adapter, dtype=dtype, use_safetensors=True
            )
        else:
            pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, dtype=dtype, use_safetensors=True)
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        if mode == "compile":
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
            pipe.unet = torch.compile(pipe.unet, mode="max-autotune", fullgraph=True)
            pipe.vae.decode = torch.compile(pipe.vae.decode, mode="max-autotune", fullgraph=True)
        elif mode != "eager":
            raise ValueError(f"invalid 'baselines' mode: got {mode!r}; allowed: eager, compile")
        self.pipe = pipe
        self.prompts = PromptLibrary.load()

    def __call__(self, seed: int) -> float:
        """One request's seconds, end to end (prompt to PIL images)."""
        import torch

        s = self.scenario
        kwargs: dict[str, Any] = {"num_frames": s.frames} if s.kind == "animation" else {}
        # birdgen's own prompt for the same request, so both encode the same text.
        parse = parse_animation_request if s.kind == "animation" else parse_image_request
        prompt = self.prompts.build(parse(s.request(seed))).text
        generator = torch.Generator("cpu").manual_seed(seed)
        _sync(self.device)
        start = time.perf_counter()
        self.pipe(
            prompt=prompt,
            num_inference_steps=s.steps,
            guidance_scale=0.0,
            width=s.size,
            height=s.size,
            generator=generator,
            **kwargs,
        )
        _sync(self.device)
        return time.perf_counter() - start

    def close(self) -> None:
        import torch

        del self.pipe
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()


def time_baseline(
    model_dir: Path, scenario: Scenario, mode: str, device: str, *, warmup: int, repeats: int
) -> dict[str, Any]:
    """Sequential timings of one diffusers baseline, after `warmup` untimed calls (compile happens there)."""
    from birdgen.benchmarks.stats import latency_summary

    baseline = DiffusersBaseline(model_dir, scenario, mode, device)
    try:
        for seed in range(warmup):
            baseline(seed)
        times_ms = [baseline(warmup + i) * 1000 for i in range(repeats)]
    finally:
        baseline.close()
    summary = latency_summary(times_ms)
    return {**summary, "repeats": repeats, "sequential_rps": 1000 / summary["mean_ms"], "times_ms": times_ms}
