"""Which UNet draws a request: the family's fused UNet when the repository has one, else the base.

The repository on disk is the source of truth, so a family exported while the server runs is
picked up without reloading the entry model (its UNet model is then loaded on first use).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASE_UNET = "unet"
MOTION_UNET = "motion_unet"
LORA_FILE = "lora.json"


def family_model(family: str, base: str = BASE_UNET) -> str:
    """Triton model name of a family's fused UNet (`base` = motion_unet: its AnimateDiff twin)."""
    return f"{base}_{family.lower()}"


def family_of(model: str) -> str | None:
    """The family suffix of a family UNet's model name (unet_x or motion_unet_x), else None."""
    for base in (MOTION_UNET, BASE_UNET):
        if model.startswith(f"{base}_"):
            return model[len(base) + 1 :]
    return None


@dataclass(frozen=True)
class UnetChoice:
    model: str
    family: str | None
    family_source: str  # "request", "catalogue" or "unknown"


class FamilyRouter:
    def __init__(self, repository: Path, catalogue: Any) -> None:
        self.repository = Path(repository)
        self.catalogue = catalogue

    def choose(self, request: Any, base: str = BASE_UNET) -> UnetChoice:
        """The UNet for `request`: images from `unet` models, clips from `motion_unet` ones."""
        family, source = self.catalogue.resolve_group(request)
        model = family_model(family, base) if family else base
        if model != base and not self.versions(model):
            model = base  # a known family without a trained LoRA yet: the base model draws it
        return UnetChoice(model, family, source)

    def versions(self, model: str) -> list[int]:
        """Version folders on disk, newest first."""
        folder = self.repository / model
        if not (folder / "config.pbtxt").is_file():
            return []
        return sorted(
            (int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True
        )

    def lora(self, model: str, version: int) -> dict[str, Any] | None:
        """What export recorded about the LoRA fused into this version (None for the base UNet)."""
        path = self.repository / model / str(version) / LORA_FILE
        return json.loads(path.read_text()) if path.is_file() else None
