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
LORA_FILE = "lora.json"


def family_model(family: str) -> str:
    """Triton model name of a family's fused UNet."""
    return f"unet_{family.lower()}"


@dataclass(frozen=True)
class UnetChoice:
    model: str
    family: str | None
    family_source: str  # "request", "catalogue" or "unknown"


class FamilyRouter:
    def __init__(self, repository: Path, catalogue: Any) -> None:
        self.repository = Path(repository)
        self.catalogue = catalogue

    def choose(self, request: Any) -> UnetChoice:
        family, source = self.catalogue.resolve_group(request)
        model = family_model(family) if family else BASE_UNET
        if model != BASE_UNET and not self.versions(model):
            model = BASE_UNET  # a known family without a trained LoRA yet: the base model draws it
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
