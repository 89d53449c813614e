"""AnimateDiff clips: the motion UNet engine and the clip pipeline against AnimateDiffSDXLPipeline.

Tolerance as for images (at most 1 uint8 level on at most 0.1% of values), for the same reason:
ONNX Runtime and torch reorder float sums, which only flips values sitting on a rounding boundary.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from birdgen.media import read_animation
from birdgen.schema import AnimationRequest
from tests.conftest import CLIP
from tests.test_parity import assert_close_to_reference


def animatediff_sdxl(tiny_model: Path, free_noise: bool = False):  # type: ignore[no-untyped-def]
    """AnimateDiffSDXLPipeline on the tiny folder; with FreeNoise, diffusers' own FreeNoise mixin
    (which diffusers wires into its SD 1.5 AnimateDiff pipelines only) with its defaults."""
    from diffusers import AnimateDiffSDXLPipeline, MotionAdapter, StableDiffusionXLPipeline
    from diffusers.pipelines.free_noise_utils import AnimateDiffFreeNoiseMixin

    from birdgen.engines.modules import motion_unet

    class FreeNoiseSDXLPipeline(AnimateDiffSDXLPipeline, AnimateDiffFreeNoiseMixin):
        pass

    sd = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    adapter = MotionAdapter.from_pretrained(tiny_model / "motion_adapter")
    parts = {k: getattr(sd, k) for k in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")}
    pipe = FreeNoiseSDXLPipeline(
        **parts, unet=motion_unet(sd.unet, adapter), motion_adapter=adapter, scheduler=sd.scheduler
    )
    if free_noise:
        pipe.enable_free_noise()  # 16-frame windows, stride 4, pyramid blend, shuffled context noise
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference(tiny_model: Path):  # type: ignore[no-untyped-def]
    return animatediff_sdxl(tiny_model)


def reference_clip(pipe, result, steps: int, frames: int, free_noise: bool = False) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The diffusers clip for `result`'s prompt and seed, as uint8 frames."""
    generator = torch.Generator("cpu").manual_seed(result.metadata["seed"])
    latents = None
    if free_noise:  # AnimateDiffSDXLPipeline's prepare_latents knows no FreeNoise: draw it as diffusers does
        latents = pipe._prepare_latents_free_noise(1, 4, frames, 256, 256, torch.float32, "cpu", generator)
    frames_out = pipe(
        result.metadata["prompt"],
        num_frames=frames,
        width=256,
        height=256,
        num_inference_steps=steps,
        guidance_scale=0.0,
        generator=generator,
        latents=latents,
        output_type="np",
    ).frames[0]
    return (frames_out * 255).round().astype(np.uint8)


def test_diffusers_from_unet2d_forgets_the_sdxl_text_time_embedding(tiny_model: Path) -> None:
    """Why birdgen builds its motion UNet with engines.modules.motion_unet (and the reference too)."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    from birdgen.engines.modules import motion_unet

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
    assert_close_to_reference(result.frames, reference_clip(reference, result, steps, 16))
    assert np.abs(result.frames[0].astype(int) - result.frames[-1].astype(int)).mean() > 1  # it moves


def test_long_clip_matches_animatediff_with_free_noise(animation_pipeline, tiny_model: Path) -> None:
    """24 frames: three 16-frame context windows (stride 4) in the motion UNet, shuffled noise."""
    request = AnimationRequest(**CLIP, steps=2, duration_seconds=3, fps=8, format="webp")
    result = animation_pipeline(request)
    assert result.frames.shape == (24, 256, 256, 3)
    want = reference_clip(animatediff_sdxl(tiny_model, free_noise=True), result, 2, 24, free_noise=True)
    assert_close_to_reference(result.frames, want)
    # Not the plain 24-frame clip: the windows and the noise are FreeNoise's.
    plain = reference_clip(animatediff_sdxl(tiny_model), result, 2, 24)
    assert np.abs(plain.astype(int) - want.astype(int)).mean() > 1


def test_clip_files_carry_frames_timing_and_label(animation_pipeline) -> None:
    request = AnimationRequest(**CLIP, steps=1, duration_seconds=2, fps=8, format="both", poster_frame=5)
    result = animation_pipeline(request)
    assert set(result.files) == {"webp", "gif", "poster"}
    poster = np.asarray(Image.open(BytesIO(result.files["poster"])).convert("RGB"))
    assert np.array_equal(poster, result.frames[5]) and result.metadata["poster_frame"] == 5
    for fmt in ("webp", "gif"):
        info = read_animation(result.files[fmt])
        assert info.frame_count == 16 and info.loop == 0 and abs(info.total_ms - 2000) <= 10
        assert info.metadata["behaviour"] == "flying" and info.metadata["frames"] == 16
    assert len(result.files["webp"]) < len(result.files["gif"])
    assert result.files["poster"][:8] == b"\x89PNG\r\n\x1a\n"
