"""ControlNet settings of an image request, resolved: which nets run, on which steps, at what scale.

Why one module: the request (birdgen.schema) says what a client asked for; the pipeline needs, per
ControlNet kind and per denoising step, the scale to pass, and the metadata records what was applied.
Both read the same numbers from here, and the step rule is diffusers' own (`controlnet_keep` in
StableDiffusionXLControlNetPipeline), so served images match the reference pipeline. No torch, no
pydantic: the client, the gateway and the entry models can all import it. Docs: docs/controlnet.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from birdgen.contracts import CONTROLNET_KINDS


def controlnet_keep(steps: int, start: float, end: float) -> list[float]:
    """Per step i of `steps`, 1.0 when a net with the window start..end runs, else 0.0.

    diffusers' expression, term for term (pipeline_controlnet_sd_xl.py, "Create tensor stating which
    controlnets to keep"): 1.0 - float(i / n < start or (i + 1) / n > end). A step runs when it lies
    wholly inside the window, so at 1 step only start 0 / end 1 keeps it.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return [1.0 - float(i / steps < start or (i + 1) / steps > end) for i in range(steps)]


@dataclass(frozen=True)
class ControlSettings:
    """One ControlNet of a request, defaults filled in: its kind, its source and its window.

    Exactly one of `template` (a vocabulary pose, drawn by birdgen.control_templates) and `image`
    (the client's base64 text, decoded by the pipeline with input_image.decode_input_image_base64,
    naming `image_field`) is set; `image_sha256`/`image_bytes` describe the decoded bytes of an image.
    """

    kind: str
    scale: float
    start: float
    end: float
    template: str | None = None
    image: str | None = field(default=None, repr=False)  # up to ~11 MB of text: kept out of reprs
    image_sha256: str | None = None
    image_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in CONTROLNET_KINDS:
            raise ValueError(f"kind {self.kind!r} is not one of {', '.join(CONTROLNET_KINDS)}")
        if (self.template is None) == (self.image is None):
            raise ValueError(f"control.{self.kind}: exactly one of template and image")
        if not 0 <= self.start < self.end <= 1:
            raise ValueError(f"control.{self.kind}: need 0 <= start < end <= 1, got {self.start}, {self.end}")

    @property
    def source(self) -> str:
        """ "template" or "image": where the control picture comes from."""
        return "template" if self.template is not None else "image"

    @property
    def image_field(self) -> str:
        """The request field a bad image is reported for (control.<kind>.image)."""
        return f"control.{self.kind}.image"

    def keep(self, steps: int) -> list[float]:
        """controlnet_keep of this net's window: 1.0 on the steps it runs, 0.0 elsewhere."""
        return controlnet_keep(steps, self.start, self.end)

    def step_scales(self, steps: int) -> list[float]:
        """The conditioning scale of each step, as diffusers computes it (scale × keep, Python floats)."""
        return [self.scale * keep for keep in self.keep(steps)]

    def active(self, steps: int) -> bool:
        """Whether this net changes any step: a nonzero scale on at least one kept step."""
        return any(scale != 0 for scale in self.step_scales(steps))

    def metadata(self, steps: int) -> dict[str, Any]:
        """What a result's metadata records for this net: its source (the template, or the image's
        SHA-256 and size, never the picture), scale, window and steps_applied (1 where it ran)."""
        source: dict[str, Any] = (
            {"template": self.template}
            if self.template is not None
            else {"image_sha256": self.image_sha256, "image_bytes": self.image_bytes}
        )
        return {
            "source": self.source,
            **source,
            "scale": self.scale,
            "start": self.start,
            "end": self.end,
            "steps_applied": [int(keep) for keep in self.keep(steps)],
        }


def any_active(settings: Iterable[ControlSettings], steps: int) -> bool:
    """Whether any net changes any step. When none does the request is drawn as an uncontrolled one
    (plain UNet, no ControlNet stage): a UNet given zero residuals returns exactly its plain output."""
    return any(setting.active(steps) for setting in settings)
