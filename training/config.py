"""The settings of one LoRA training run: one dataclass, its defaults and its checks, with no torch.

The CLI reads its flags and their defaults from here (so `birdgen --help` stays fast and the defaults
exist once), `train_lora` takes it, and the training card records it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NoReturn

DEFAULT_LICENCES = ("CC0", "CC-BY")
# Variance of the Laplacian of the grey image at training scale (0..255 levels). Sharp, textured photos
# score in the hundreds or more; a photo blurred past usefulness scores in the tens. Tune per dataset:
# rejections report the measured value.
DEFAULT_MIN_SHARPNESS = 50.0
DEFAULT_JITTER = 0.1
MIXED_PRECISION = ("no", "fp16", "bf16")
LOGGERS = ("tensorboard", "wandb", "mlflow", "none")


def bad_value(name: str, value: object, allowed: str) -> NoReturn:
    raise ValueError(f"invalid {name!r}: got {value!r}; allowed: {allowed}")


@dataclass
class TrainConfig:
    """Everything one LoRA training run needs; the CLI flags map 1:1 onto these fields."""

    model_dir: Path
    data_dir: Path
    output_dir: Path
    family: str | None = None
    rank: int = 64
    alpha: float = 64.0
    dropout: float = 0.0
    lr: float = 1e-4
    warmup_steps: int = 100
    max_steps: int = 2000
    batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 1e-2
    mixed_precision: str = "no"
    resolution: int = 512
    checkpoint_every: int = 250
    keep_checkpoints: int = 3
    resume: str | None = None  # None, "latest" (fresh start when there is none yet) or a checkpoint dir
    seed: int = 0
    log_with: str = "tensorboard"
    num_workers: int = 0
    # Dataset gates and augmentation (see birdgen.training.dataset).
    licences: tuple[str, ...] = DEFAULT_LICENCES
    min_side: int | None = None
    min_sharpness: float = DEFAULT_MIN_SHARPNESS
    flip: bool = True
    random_crop: bool = True
    jitter: float = DEFAULT_JITTER

    def __post_init__(self) -> None:
        self.model_dir = Path(self.model_dir)
        self.data_dir = Path(self.data_dir)
        self.output_dir = Path(self.output_dir)
        self.licences = tuple(self.licences)

    def validate(self) -> None:
        """Raise ValueError naming the field, the value and what is allowed."""
        counts = ("rank", "max_steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints")
        for name in (*counts, "resolution"):
            if getattr(self, name) < 1:
                bad_value(name, getattr(self, name), "an integer >= 1")
        for name in ("warmup_steps", "seed", "num_workers"):
            if getattr(self, name) < 0:
                bad_value(name, getattr(self, name), "an integer >= 0")
        if not self.alpha > 0:
            bad_value("alpha", self.alpha, "a number > 0")
        if not 0 <= self.dropout < 1:
            bad_value("dropout", self.dropout, "0 <= dropout < 1")
        if not self.lr > 0:
            bad_value("lr", self.lr, "a number > 0")
        if not self.max_grad_norm > 0:
            bad_value("max_grad_norm", self.max_grad_norm, "a number > 0")
        if self.mixed_precision not in MIXED_PRECISION:
            bad_value("mixed_precision", self.mixed_precision, ", ".join(MIXED_PRECISION))
        if self.log_with not in LOGGERS:
            bad_value("log_with", self.log_with, ", ".join(LOGGERS))

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }
