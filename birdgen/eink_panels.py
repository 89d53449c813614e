"""The e-ink panels and palettes of `data/eink_panels.yaml`, as typed objects validated at load.

Apart from birdgen.eink (which renders) so that birdgen.schema can check a request's e-ink fields
against them without importing the renderer; no torch, no numpy beyond a palette's colour table.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from birdgen.prompts import DATA_DIR, load_data_file

DEFAULT_PANELS = DATA_DIR / "eink_panels.yaml"
# The first of each is the default.
DITHERS = ("floyd-steinberg", "ordered", "none")
FITS = ("subject", "cover", "contain")
_KEY = r"^[a-z0-9]+(-[a-z0-9]+)*$"  # panel, palette and colour names
_WHITE = "white"

Channel = Annotated[int, Field(ge=0, le=255)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Colour(_Strict):
    name: str = Field(pattern=_KEY)
    rgb: list[Channel] = Field(min_length=3, max_length=3)


class Palette(_Strict):
    """The inks of one panel mode, in buffer-value order, and the driver library that shows them."""

    bits_per_pixel: Literal[1, 2, 4]
    library: str = Field(min_length=1)  # Arduino library: GxEPD2, GxEPD2_4G
    display_class: str = Field(min_length=1)  # its display template: GxEPD2_BW, GxEPD2_4G_4G, GxEPD2_7C
    colours: list[Colour] = Field(min_length=2)

    @model_validator(mode="after")
    def _codes_fit(self) -> Palette:
        names = [c.name for c in self.colours]
        if len(set(names)) != len(names):
            raise ValueError(f"colour names must be unique, got {names}")
        if len(names) > 1 << self.bits_per_pixel:
            raise ValueError(f"{len(names)} colours do not fit {self.bits_per_pixel} bits per pixel")
        if _WHITE not in names:
            raise ValueError("a palette needs 'white' (letterbox bars and row padding)")
        return self

    @property
    def rgb(self) -> np.ndarray:
        """(N, 3) float32 colours; row i is buffer value i."""
        return np.array([c.rgb for c in self.colours], dtype=np.float32)

    @property
    def is_grey(self) -> bool:
        return all(len(set(c.rgb)) == 1 for c in self.colours)

    @property
    def white_value(self) -> int:
        return next(i for i, c in enumerate(self.colours) if c.name == _WHITE)

    @property
    def ordered_spread(self) -> float:
        """How far (per channel) the Bayer map moves a pixel: the smallest gap between two inks / sqrt 3.

        Exactly one step for evenly spaced greys (255 for bw, 85 for grey4), so any flat tone becomes
        a mix of the two inks around it. Never more: a pixel of pure ink moved by less than that
        stays nearest to its own ink (on the 7-colour palette, the widest gap would turn pure red
        partly orange).
        """
        rgb = self.rgb
        distance = np.sqrt(((rgb[:, None] - rgb[None]) ** 2).sum(-1))
        np.fill_diagonal(distance, np.inf)
        return float(distance.min() / math.sqrt(3))


class Panel(_Strict):
    """One e-paper panel: the picture size its buffer holds and the palettes it can show."""

    model: str = Field(min_length=1)  # Good Display part number
    driver: str = Field(min_length=1)  # GxEPD2 driver class
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    rotation: Literal[0, 1, 2, 3]  # GxEPD2 setRotation() under which the picture is upright
    palettes: list[str] = Field(min_length=1)  # the first is the default


class EinkPresets(_Strict):
    """The validated eink_panels.yaml."""

    palettes: dict[str, Palette] = Field(min_length=1)
    panels: dict[str, Panel] = Field(min_length=1)

    @model_validator(mode="after")
    def _names_and_references(self) -> EinkPresets:
        for section in ("palettes", "panels"):
            for key in getattr(self, section):
                if not re.fullmatch(_KEY, key):
                    raise ValueError(f"{section}.{key}: names are lower-case words joined by '-'")
        for name, panel in self.panels.items():
            unknown = [p for p in panel.palettes if p not in self.palettes]
            if unknown or len(set(panel.palettes)) != len(panel.palettes):
                raise ValueError(
                    f"panels.{name}.palettes: {panel.palettes} must be distinct names from "
                    f"{', '.join(self.palettes)}"
                )
        return self

    @classmethod
    def load(cls, path: Path | None = None) -> EinkPresets:
        """The presets from `path`, or the bundled ones (read once per process)."""
        return _load_default() if path is None else load_data_file(path, cls)


@functools.cache
def _load_default() -> EinkPresets:
    return load_data_file(DEFAULT_PANELS, EinkPresets)


PRESETS = EinkPresets.load()
