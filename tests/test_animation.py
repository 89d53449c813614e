"""AnimateDiff clips: the motion UNet engine and the clip pipeline against AnimateDiffSDXLPipeline.

Tolerance as for images (at most 1 uint8 level on at most 0.1% of values), for the same reason:
ONNX Runtime and torch reorder float sums, which only flips values sitting on a rounding boundary.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from birdgen.media import read_animation
from birdgen.schema import AnimationRequest
from tests.conftest import ROBIN
from tests.test_parity import assert_close_to_reference

CLIP = {k: v for k, v in ROBIN.items() if k not in ("pose", "format", "steps")} | {"behaviour": "flying"}


@pytest.fixture(scope="module")
def reference(tiny_model: Path):  # type: ignore[no-untyped-def]
    from diffusers import AnimateDiffSDXLPipeline, MotionAdapter, StableDiffusionXLPipeline

    from birdgen.export.modules import motion_unet

    sd = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    adapter = MotionAdapter.from_pretrained(tiny_model / "motion_adapter")
    parts = {k: getattr(sd, k) for k in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")}
    pipe = AnimateDiffSDXLPipeline(
        **parts, unet=motion_unet(sd.unet, adapter), motion_adapter=adapter, scheduler=sd.scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_diffusers_from_unet2d_forgets_the_sdxl_text_time_embedding(tiny_model: Path) -> None:
    """Why birdgen builds its motion UNet with export.modules.motion_unet (and the reference too)."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    from birdgen.export.modules import motion_unet

    unet2d = UNet2DConditionModel.from_pretrained(tiny_model / "unet")
    adapter = MotionAdapter.from_pretrained(tiny_model / "motion_adapter")
    weight = unet2d.add_embedding.linear_1.weight
    assert not torch.equal(UNetMotionModel.from_unet2d(unet2d, adapter).add_embedding.linear_1.weight, weight)
    assert torch.equal(motion_unet(unet2d, adapter).add_embedding.linear_1.weight, weight)


@pytest.mark.parametrize("steps", [1, 2])
def test_clip_matches_animatediff_sdxl_pipeline(animation_pipeline, reference, steps: int) -> None:
    request = AnimationRequest(**CLIP, steps=steps, format="webp")
    result = animation_pipeline(request)
    assert result.frames.shape == (16, 256, 256, 3) and request.num_frames == 16
    frames = reference(
        result.metadata["prompt"],
        num_frames=16,
        width=256,
        height=256,
        num_inference_steps=steps,
        guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(request.resolved_seed()),
        output_type="np",
    ).frames[0]
    want = (frames * 255).round().astype(np.uint8)
    assert_close_to_reference(result.frames, want)
    assert np.abs(result.frames[0].astype(int) - result.frames[-1].astype(int)).mean() > 1  # it moves


def test_clip_files_carry_frames_timing_and_label(animation_pipeline) -> None:
    request = AnimationRequest(**CLIP, steps=1, duration_seconds=2, fps=8, format="both")
    result = animation_pipeline(request)
    assert set(result.files) == {"webp", "gif", "poster"}
    for fmt in ("webp", "gif"):
        info = read_animation(result.files[fmt])
        assert info.frame_count == 16 and info.loop == 0 and abs(info.total_ms - 2000) <= 10
        assert info.metadata["behaviour"] == "flying" and info.metadata["frames"] == 16
    assert len(result.files["webp"]) < len(result.files["gif"])
    assert result.files["poster"][:8] == b"\x89PNG\r\n\x1a\n"
