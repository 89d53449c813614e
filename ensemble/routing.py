"""Which UNet draws a request: the family's fused UNet when the repository has one, else the base.

The repository on disk is the source of truth, so a family exported while the server runs is
picked up without reloading the entry model (its UNet model is then loaded on first use).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from birdgen.contracts import BASE_UNET, LORA_FILE, family_model


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
        family, source = self.catalogue.family_for(request)
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
