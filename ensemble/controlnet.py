"""ControlNet guidance inside the image pipeline: a request's control pictures, and each step's residuals.

What StableDiffusionXLControlNetPipeline does at guidance 0, split over Triton models: each active
ControlNet is its own stage (`controlnet_<kind>`, batched across requests like the UNet), called with
the step's UNet inputs, the request-size control picture and that step's scale; their residuals are
summed in CONTROLNET_KINDS order (MultiControlNetModel's) and go into `controlled_unet`. A net whose
scale is 0 on a step is not called (its residuals would be zeros), and a request on which no net is
active at any step is drawn by the plain UNet: a UNet given zero residuals returns exactly its plain
output, so "scale 0 equals no control" holds byte for byte. Design: docs/controlnet.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from birdgen.contracts import controlnet_model
from birdgen.control import ControlSettings
from birdgen.control_templates import render_template
from birdgen.input_image import decode_input_image_base64
from birdgen.model_folder import ModelDims
from birdgen.request_error import RequestError
from birdgen.stages import CONTROL_IMAGE, CONTROL_SCALE, control_residuals, image_sizes

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ActiveControl:
    """One ControlNet that changes at least one step of a request."""

    kind: str
    picture: torch.Tensor  # uint8 (1, height, width, 3): the control picture at the request's size
    scales: list[float]  # per step: the scale × keep diffusers passes (0.0 where the net is off)


def control_picture(setting: ControlSettings, width: int, height: int) -> np.ndarray:
    """The control picture of `setting` at the request's size, uint8 (height, width, 3): the client's
    image decoded and resized as diffusers' control image processor does (RGB, Lanczos), or the
    bundled template of the pose drawn for that size. A bad image raises RequestError naming
    `control.<kind>.image`."""
    if setting.template is not None:
        picture = render_template(setting.kind, setting.template, width, height)
    else:
        assert setting.image is not None
        picture = decode_input_image_base64(setting.image, setting.image_field, width, height)
    return np.asarray(picture, dtype=np.uint8)


def prepare_controls(
    request: Any, exported: Sequence[str], settings: Sequence[ControlSettings] | None = None
) -> list[ActiveControl]:
    """The request's active ControlNets, every control picture checked first (a bad image is refused
    even at scale 0); [] when no net changes any step, so the request takes the plain path.
    `settings`: the request's `control_settings()` when the caller has them already."""
    settings = request.control_settings() if settings is None else settings
    for setting in settings:
        if setting.kind not in exported:
            raise RequestError(
                f"control.{setting.kind}",
                setting.source,
                f"the ControlNet kinds this deployment exported: {', '.join(exported) or 'none'}",
            )
    pictures = {s.kind: control_picture(s, request.width, request.height) for s in settings}
    return [
        ActiveControl(s.kind, torch.from_numpy(pictures[s.kind].copy())[None], s.step_scales(request.steps))
        for s in settings
        if s.active(request.steps)
    ]


def control_metadata(settings: Sequence[ControlSettings], steps: int) -> dict[str, Any]:
    """What the result records per requested net: source (template, or the image's digest), scale,
    window and the steps it ran on."""
    return {s.kind: s.metadata(steps) for s in settings}


def residual_function(
    run_many: Callable[[Sequence[tuple[str, Tensors]]], list[Tensors]],
    controls: Sequence[ActiveControl],
    dims: ModelDims,
    device: torch.device,
) -> Callable[[int, Tensors], Tensors]:
    """`residuals(step_index, unet_inputs)`: the summed ControlNet residuals of that step, from one
    concurrent call per net active on it; zeros (allocated once) on a step where none is."""
    pictures = [c.picture.to(device) for c in controls]
    zeros: Tensors = {}

    def residuals(step: int, inputs: Tensors) -> Tensors:
        calls = [
            (
                controlnet_model(control.kind),
                {
                    **inputs,
                    CONTROL_IMAGE: picture,
                    CONTROL_SCALE: torch.tensor([[control.scales[step]]], dtype=torch.float32, device=device),
                },
            )
            for control, picture in zip(controls, pictures, strict=True)
            if control.scales[step] != 0
        ]
        if not calls:
            if not zeros:
                _, _, h, w = inputs["sample"].shape
                sizes = image_sizes(dims, h, w)
                for spec in control_residuals(dims):
                    zeros[spec.name] = torch.zeros(
                        (1, *spec.concrete(sizes)), dtype=torch.float32, device=device
                    )
            return zeros
        outputs = run_many(calls)
        total = outputs[0]
        for more in outputs[1:]:  # MultiControlNetModel's order: the first net's, plus each next one's
            total = {name: total[name] + more[name] for name in total}
        return total

    return residuals
