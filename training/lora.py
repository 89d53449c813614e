"""Train one bird family's LoRA on SDXL(-Turbo): peft on the UNet's attention, accelerate for devices.

The loss is diffusers' SDXL LoRA recipe (examples/text_to_image/train_text_to_image_lora_sdxl.py):
VAE latents, DDPM noise at a random timestep, both CLIP encoders (penultimate hidden states
concatenated, pooled from the second), SDXL's size/crop time ids, MSE on what the scheduler config
says the UNet predicts. What birdgen adds is exact resume: every random draw comes from (seed, epoch,
index) or (seed, step, micro-batch, process), never from the order things happened in, so a run that
is killed and resumed from a checkpoint produces the same losses and weights as one that was not.

Works unchanged under `accelerate launch` on several GPUs: each process takes its own slice of every
global batch, gradients are averaged by DDP, and only the main process writes files.
"""

from __future__ import annotations

import importlib.util
import json
import math
import platform
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from birdgen.engines.modules import TARGET_MODULES
from birdgen.prompt_tokenizer import PromptTokenizer
from birdgen.training.config import TrainConfig, bad_value
from birdgen.training.dataset import BirdDataset, write_attribution

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_STATE = "birdgen_state.json"
LORA_CHECKPOINT = "unet_lora.safetensors"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
TRACKER_PROJECT = "birdgen-lora"
# Changing these between a checkpoint and its resume moves the data position or the batches' content.
RESUME_MUST_MATCH = ("seed", "batch_size", "grad_accum", "num_processes", "dataset_size", "resolution")


@dataclass
class TrainResult:
    """What a run did. `losses` holds one value per optimizer step of this run, steps start_step+1 on."""

    output_dir: Path
    lora_path: Path
    card_path: Path
    losses: list[float]
    start_step: int
    global_step: int
    seconds: float
    accepted: int
    rejected: int
    checkpoints: list[Path] = field(default_factory=list)

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None


# -- data order ---------------------------------------------------------------------------------------
def epoch_batches(
    size: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1
) -> list[list[int]]:
    """This process's micro-batches for one epoch: a permutation that depends on (seed, epoch) only,
    cut into global batches of batch_size * world, of which process `rank` takes its slice. The
    incomplete last global batch is dropped so every process runs the same number of steps."""
    order = np.random.default_rng([seed, epoch]).permutation(size)
    step = batch_size * world
    return [
        order[start + rank * batch_size : start + (rank + 1) * batch_size].tolist()
        for start in range(0, size - step + 1, step)
    ]


def collate(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack pixels; SDXL's add_time_ids per item: (orig h, orig w, crop top, crop left, target h, w)."""
    time_ids = [[*i["original_size"], *i["crop_top_left"], *i["target_size"]] for i in items]
    return {
        "pixel_values": torch.stack([i["pixel_values"] for i in items]),
        "captions": [i["caption"] for i in items],
        "time_ids": torch.tensor(time_ids, dtype=torch.float32),
    }


def _step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The noise, timesteps and latent sample of one micro-batch: a pure function of where it is in the
    run, so a resumed run draws exactly what the uninterrupted one would have."""
    state = np.random.SeedSequence([seed, step, micro, rank]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator("cpu").manual_seed(int(state) & ((1 << 63) - 1))


# -- checkpoints --------------------------------------------------------------------------------------
def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (their state file is written last), oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    found = [p for p in root.glob("step-*") if (p / CHECKPOINT_STATE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    """The checkpoint to resume from: None, the newest complete one for "latest" (None when there is none
    yet, so a preemptible job can always pass --resume latest), or an explicit directory."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / CHECKPOINT_STATE).is_file():
        bad_value("resume", resume, f"'latest' or a checkpoint directory containing {CHECKPOINT_STATE}")
    return path


def _tracker(log_with: str) -> str | None:
    """The accelerate tracker to use: TensorBoard when installed (else a warning and none); W&B and
    MLflow only when asked for, and then they must be installed."""
    if log_with == "none":
        return None
    if importlib.util.find_spec(log_with) is None:  # the tracker names are their packages' names
        if log_with == "tensorboard":
            warnings.warn("tensorboard is not installed: training without a logger", stacklevel=3)
            return None
        raise ValueError(f"invalid 'log_with': got {log_with!r}, but {log_with} is not installed")
    return log_with


def _tracker_config(config: TrainConfig) -> dict[str, Any]:
    """Hyperparameters as the trackers accept them (scalars and strings only)."""
    return {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in config.to_dict().items()}


# -- the run ------------------------------------------------------------------------------------------
class _Models:
    """The frozen encoders, the VAE and the LoRA-wrapped UNet, and the loss over one micro-batch."""

    def __init__(self, model_dir: Path, config: TrainConfig, device: torch.device) -> None:
        from diffusers import DDPMScheduler
        from peft import LoraConfig

        from birdgen.engines.modules import TextEncoder
        from birdgen.model_folder import load_part

        # Frozen parts in the mixed-precision dtype on a GPU; fp32 on CPU, where half matmuls are slow.
        half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
        self.weight_dtype = torch.float32 if device.type == "cpu" else half
        self.device = device
        self.prompt_tokenizer = PromptTokenizer.from_folder(model_dir)
        self.encoders = [
            TextEncoder(load_part(model_dir, "text_encoder"), pooled=False),
            TextEncoder(load_part(model_dir, "text_encoder_2"), pooled=True),
        ]
        self.vae = load_part(model_dir, "vae")
        self.unet = load_part(model_dir, "unet")
        self.noise_scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):
            bad_value("prediction_type (scheduler config)", prediction_type, "epsilon, v_prediction")
        for module in (*self.encoders, self.vae, self.unet):
            module.requires_grad_(False)
        # SDXL's VAE overflows in fp16 (its config says force_upcast): fp32 then, as the pipeline does.
        vae_dtype = torch.float32 if self.vae.config.get("force_upcast", False) else self.weight_dtype
        placement = [(e, self.weight_dtype) for e in self.encoders]
        for module, dtype in [*placement, (self.vae, vae_dtype), (self.unet, self.weight_dtype)]:
            # Parts load in fp32; cast only when that changes (diffusers warns about any `.to(dtype)`).
            if dtype == torch.float32:
                module.to(device)
            else:
                module.to(device, dtype=dtype)
        vae_cfg = self.vae.config
        channels = vae_cfg.latent_channels
        mean, std = vae_cfg.get("latents_mean"), vae_cfg.get("latents_std")
        self.latents_mean = torch.tensor(mean or [0.0] * channels).view(1, channels, 1, 1).to(device)
        self.latents_std = torch.tensor(std or [1.0] * channels).view(1, channels, 1, 1).to(device)
        self.scaling_factor = float(vae_cfg.scaling_factor)

        self.lora_config = LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            init_lora_weights="gaussian",
            target_modules=list(TARGET_MODULES),
        )
        self.unet.add_adapter(self.lora_config)
        # The optimizer keeps fp32 master weights for the adapters even when the base runs in half.
        for param in self.unet.parameters():
            if param.requires_grad:
                param.data = param.data.float()

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The serving path's encoding (its tokenizer, then penultimate hidden states of both encoders,
        pooled from the 2nd), so the LoRA learns on the embeddings it will be served with."""
        ids, ids_2 = (i.to(self.device) for i in self.prompt_tokenizer(captions))
        (hidden,) = self.encoders[0](ids)
        hidden_2, pooled = self.encoders[1](ids_2)
        return torch.cat([hidden, hidden_2], dim=-1), pooled

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Pixels in [-1, 1] -> the latents the UNet sees (inverse of the serving VAE decoder's scaling)."""
        vae_dtype = next(self.vae.parameters()).dtype
        latents = self.vae.encode(pixels.to(self.device, vae_dtype)).latent_dist.sample(generator=generator)
        return (latents.float() - self.latents_mean) * self.scaling_factor / self.latents_std

    def loss(
        self, unet: torch.nn.Module, batch: Mapping[str, Any], generator: torch.Generator
    ) -> torch.Tensor:
        latents = self.encode_images(batch["pixel_values"], generator)
        prompt_embeds, pooled = self.encode_prompts(batch["captions"])
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        added = {"text_embeds": pooled, "time_ids": batch["time_ids"].to(self.device, self.weight_dtype)}
        prediction = unet(
            noisy.to(self.weight_dtype),
            timesteps,
            encoder_hidden_states=prompt_embeds,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        return torch.nn.functional.mse_loss(prediction.float(), target.float(), reduction="mean")


def _lora_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def train_lora(config: TrainConfig, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train, checkpoint, and write the LoRA, its training card and attribution to config.output_dir.

    `on_step(global_step, loss)` runs after each optimizer step (and after that step's checkpoint), on
    every process: a hook for notebooks, and for tests that stop a run the way a crash would.
    """
    trainer = LoraTrainer(config)
    try:
        trainer.resume()
        trainer.train(on_step)
        trainer.save_outputs()
    finally:
        trainer.accelerator.end_training()
    return trainer.result()


class LoraTrainer:
    """One run, in the order it happens: set up, resume, train, save. `train_lora` is the usual entry."""

    def __init__(self, config: TrainConfig) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed
        from diffusers.optimization import get_scheduler

        from birdgen.model_folder import ModelDims

        self.started = time.time()
        config.validate()
        self.config = config
        self.dims = ModelDims.from_folder(config.model_dir)
        if config.resolution % self.dims.pixel_stride:
            stride = self.dims.pixel_stride
            bad_value("resolution", config.resolution, f"a multiple of {stride} (this model's pixel stride)")
        self.out = config.output_dir
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.grad_accum,
            log_with=_tracker(config.log_with),
            project_config=ProjectConfiguration(
                project_dir=str(self.out), logging_dir=str(self.out / "logs")
            ),
        )
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        set_seed(config.seed)  # the LoRA's gaussian init and dropout; data and noise have their own seeds

        self.dataset = BirdDataset(
            config.data_dir,
            resolution=config.resolution,
            min_side=config.min_side,
            licences=config.licences,
            family=config.family,
            min_sharpness=config.min_sharpness,
            flip=config.flip,
            random_crop=config.random_crop,
            jitter=config.jitter,
            seed=config.seed,
        )
        self.batches_per_epoch = len(self.dataset) // (config.batch_size * self.world)
        if self.batches_per_epoch == 0:
            counts = ", ".join(f"{n} {r}" for r, n in self.dataset.rejection_counts().items()) or "none"
            raise ValueError(
                f"{config.data_dir}: {len(self.dataset)} usable photos, fewer than one global batch "
                f"(batch_size {config.batch_size} x {self.world} processes); rejected: {counts}"
            )
        self.run_facts = {
            "seed": config.seed,
            "batch_size": config.batch_size,
            "grad_accum": config.grad_accum,
            "num_processes": self.world,
            "dataset_size": len(self.dataset),
            "resolution": config.resolution,
        }

        self.models = _Models(config.model_dir, config, self.accelerator.device)
        self.params = [p for p in self.models.unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        # accelerate steps a prepared scheduler once per process per optimizer step, hence the * world.
        lr_scheduler = get_scheduler(
            "cosine",
            optimizer,
            num_warmup_steps=config.warmup_steps * self.world,
            num_training_steps=config.max_steps * self.world,
        )
        self.unet, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            self.models.unet, optimizer, lr_scheduler
        )
        self.accelerator.register_save_state_pre_hook(self._save_hook)
        self.accelerator.register_load_state_pre_hook(self._load_hook)
        self.global_step = 0
        self.start_step = 0
        self.losses: list[float] = []

    # -- checkpoints: the adapters (MBs), never the frozen UNet (GBs) --------------------------------
    def _save_hook(self, hook_models: list[torch.nn.Module], weights: list[Any], directory: str) -> None:
        from safetensors.torch import save_file

        for model in hook_models:
            if self.accelerator.is_main_process:
                state = _lora_state(self.accelerator.unwrap_model(model))
                save_file(state, str(Path(directory) / LORA_CHECKPOINT))
            if weights:
                weights.pop()  # accelerate would otherwise write the whole UNet

    def _load_hook(self, hook_models: list[torch.nn.Module], directory: str) -> None:
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        while hook_models:
            model = self.accelerator.unwrap_model(hook_models.pop())
            state = load_file(str(Path(directory) / LORA_CHECKPOINT))  # copied onto the params device
            result = set_peft_model_state_dict(model, state)
            if getattr(result, "unexpected_keys", None):
                raise ValueError(
                    f"{directory}: checkpoint does not fit this LoRA ({result.unexpected_keys[:3]})"
                )

    def resume(self) -> None:
        """Restore adapters, optimizer, scheduler and RNG from --resume; the data position follows from
        the step. Refuses a checkpoint whose batches would differ (see RESUME_MUST_MATCH)."""
        checkpoint = resolve_resume(self.config.resume, self.out)
        if checkpoint is None:
            return
        state = json.loads((checkpoint / CHECKPOINT_STATE).read_text())
        for name in RESUME_MUST_MATCH:
            if state["run"][name] != self.run_facts[name]:
                saved = state["run"][name]
                bad_value(
                    name, self.run_facts[name], f"{saved}, as in checkpoint {checkpoint} (exact resume)"
                )
        self.accelerator.load_state(str(checkpoint))
        self.global_step = self.start_step = int(state["global_step"])

    def save_checkpoint(self) -> None:
        """accelerate's state plus where the run stands; the state file is written last, so a checkpoint
        interrupted mid-write is never resumed from. Keeps the newest `keep_checkpoints`."""
        config, accelerator = self.config, self.accelerator
        directory = self.out / CHECKPOINTS_DIR / f"step-{self.global_step:07d}"
        accelerator.save_state(str(directory))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            # Informational: resume derives the position from global_step (micro-batches consumed).
            epoch, position = divmod(self.global_step * config.grad_accum, self.batches_per_epoch)
            state = {
                "global_step": self.global_step,
                "epoch": epoch,
                "batch_in_epoch": position,
                "run": self.run_facts,
                "recent_losses": self.losses[-10:],
            }
            (directory / CHECKPOINT_STATE).write_text(json.dumps(state, indent=2) + "\n")
            for old in list_checkpoints(self.out)[: -config.keep_checkpoints or None]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()

    # -- training ------------------------------------------------------------------------------------
    def micro_batches(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(micro-batch number, batch) from the current step on, epoch after epoch, forever. The number
        is the data position: resume starts at global_step * grad_accum."""
        config = self.config
        consumed = self.global_step * config.grad_accum
        while True:
            epoch, position = divmod(consumed, self.batches_per_epoch)
            self.dataset.set_epoch(epoch)
            order = epoch_batches(
                len(self.dataset), config.batch_size, config.seed, epoch, self.rank, self.world
            )
            loader = torch.utils.data.DataLoader(
                self.dataset,
                batch_sampler=order[position:],
                collate_fn=collate,
                num_workers=config.num_workers,
            )
            for batch in loader:
                yield consumed, batch
                consumed += 1

    def train(self, on_step: Callable[[int, float], None] | None = None) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        config, accelerator = self.config, self.accelerator
        if accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
        accelerator.init_trackers(TRACKER_PROJECT, config=_tracker_config(config))
        progress = Progress(
            TextColumn("[bold]train-lora[/bold] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]} lr {task.fields[lr]}"),
            TimeRemainingColumn(),
            disable=not accelerator.is_local_main_process,
        )
        task = progress.add_task(
            config.family or "all families",
            total=config.max_steps,
            completed=self.global_step,
            loss="-",
            lr="-",
        )
        self.unet.train()
        step_loss = 0.0
        with progress:
            for number, batch in self.micro_batches():
                if self.global_step >= config.max_steps:
                    break
                micro = number % config.grad_accum
                generator = _step_generator(config.seed, self.global_step, micro, self.rank)
                with accelerator.accumulate(self.unet):
                    loss = self.models.loss(self.unet, batch, generator)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(self.params, config.max_grad_norm)
                        self.optimizer.step()
                        self.lr_scheduler.step()
                        self.optimizer.zero_grad(set_to_none=True)
                step_loss += accelerator.reduce(loss.detach(), "mean").item() / config.grad_accum
                if not accelerator.sync_gradients:
                    continue
                self.global_step += 1
                self.losses.append(step_loss)
                lr = self.lr_scheduler.get_last_lr()[0]
                accelerator.log({"train/loss": step_loss, "train/lr": lr}, step=self.global_step)
                progress.update(task, completed=self.global_step, loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
                if self.global_step % config.checkpoint_every == 0 and self.global_step < config.max_steps:
                    self.save_checkpoint()
                if on_step is not None:
                    on_step(self.global_step, step_loss)
                step_loss = 0.0

    # -- outputs -------------------------------------------------------------------------------------
    def save_outputs(self) -> None:
        """The diffusers LoRA file, the training card and the attribution (main process only)."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            _save_lora(self.accelerator.unwrap_model(self.unet), self.models.lora_config, self.out)
            _write_card(self)
        self.accelerator.wait_for_everyone()

    def result(self) -> TrainResult:
        return TrainResult(
            output_dir=self.out,
            lora_path=self.out / LORA_WEIGHTS,
            card_path=self.out / "training_card.json",
            losses=list(self.losses),
            start_step=self.start_step,
            global_step=self.global_step,
            seconds=time.time() - self.started,
            accepted=len(self.dataset),
            rejected=len(self.dataset.rejected),
            checkpoints=list_checkpoints(self.out),
        )


def _save_lora(unet: torch.nn.Module, lora_config: Any, out: Path) -> None:
    """diffusers' LoRA format (what `pipe.load_lora_weights(out)` reads), with the peft config as
    metadata so alpha != rank survives loading."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    layers = convert_state_dict_to_diffusers(_lora_state(unet))
    StableDiffusionXLPipeline.save_lora_weights(
        out, unet_lora_layers=layers, unet_lora_adapter_metadata=lora_config.to_dict()
    )


def _versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import peft
    import transformers

    import birdgen

    return {
        "birdgen": birdgen.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "peft": peft.__version__,
    }


def _write_card(trainer: LoraTrainer) -> None:
    """training_card.json (for tools: export reads family and LoRA settings) and .md (for people), plus
    the attribution of every photo used."""
    out, config, dataset, losses = trainer.out, trainer.config, trainer.dataset, trainer.losses
    start_step, global_step, seconds = trainer.start_step, trainer.global_step, time.time() - trainer.started
    attribution = dataset.attribution()
    title = config.family or "all families"
    write_attribution(out, attribution, title=f"birdgen LoRA, {title}")
    final = losses[-1] if losses else None
    tail = losses[-10:]
    card = {
        "kind": "birdgen-lora",
        "family": config.family,
        "lora": {
            "file": LORA_WEIGHTS,
            "rank": config.rank,
            "alpha": config.alpha,
            "dropout": config.dropout,
            "target_modules": list(TARGET_MODULES),
        },
        "base_model": {"model_dir": str(config.model_dir), "dims": trainer.dims.to_dict()},
        "config": config.to_dict(),
        "data": {**dataset.summary(), "attribution_files": ["ATTRIBUTION.md", "attribution.json"]},
        "result": {
            "steps": global_step,
            "resumed_from_step": start_step or None,
            "final_loss": final,
            "mean_loss_last_10": (sum(tail) / len(tail)) if tail else None,
            "losses": list(losses),
            "seconds_this_run": round(seconds, 3),
        },
        "attribution": attribution,
        "versions": _versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / "training_card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    summary = dataset.summary()
    reasons = ", ".join(f"{n} {r}" for r, n in summary["rejected_by_reason"].items()) or "none"
    loss_text = "n/a" if final is None or not math.isfinite(final) else f"{final:.4f}"
    lines = [
        f"# Training card: {title}",
        "",
        f"- LoRA: `{LORA_WEIGHTS}` (rank {config.rank}, alpha {config.alpha}, "
        f"on {', '.join(TARGET_MODULES)} of the UNet)",
        f"- Base model: `{config.model_dir}`",
        f"- Steps: {global_step}" + (f" (resumed from {start_step})" if start_step else ""),
        f"- Final loss: {loss_text}; this run took {seconds:.0f} s",
        f"- Photos: {summary['accepted']} accepted, {summary['rejected']} rejected ({reasons})",
        f"- Licences allowed: {', '.join(summary['licences'])}; attribution in `ATTRIBUTION.md`",
        "",
        "## Settings",
        "",
        *(f"- {k}: `{v}`" for k, v in config.to_dict().items()),
        "",
    ]
    (out / "training_card.md").write_text("\n".join(lines), encoding="utf-8")
