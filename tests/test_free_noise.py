"""FreeNoise context windows against diffusers' own FreeNoise code, piece by piece.

The whole-clip parity (served windows vs AnimateDiffSDXLPipeline with FreeNoise) is in
test_animation; here: the windows, the shuffled noise and one windowed temporal block.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from birdgen.free_noise import (
    CONTEXT_LENGTH,
    CONTEXT_STRIDE,
    context_windows,
    pyramid_weights,
    shuffle_context_noise,
)


def test_a_clip_of_one_window_is_plain_attention() -> None:
    frames, blend = context_windows(16)
    assert frames.tolist() == [list(range(16))]
    assert blend.shape == (16, 1, 16) and np.array_equal(blend[:, 0], np.eye(16))


def test_windows_slide_by_the_stride_and_blend_with_pyramid_weights() -> None:
    frames, blend = context_windows(24)
    assert frames[:, 0].tolist() == [0, 4, 8] and frames[:, -1].tolist() == [15, 19, 23]
    pyramid = pyramid_weights(16)
    assert pyramid_weights(4) == [1, 2, 2, 1] and pyramid_weights(5) == [1, 2, 3, 2, 1]
    # Frame 2 lies only in window 0; frame 10 at positions 10, 6 and 2 of windows 0, 1 and 2.
    assert blend[2].tolist() == [[0.0] * 2 + [1.0] + [0.0] * 13] + [[0.0] * 16] * 2
    shares = [pyramid[10], pyramid[6], pyramid[2]]
    np.testing.assert_allclose(blend[10, [0, 1, 2], [10, 6, 2]], np.array(shares) / sum(shares), rtol=1e-6)


def test_a_tail_window_adds_only_the_frames_no_window_covered() -> None:
    frames, blend = context_windows(26)
    assert frames[:, 0].tolist() == [0, 4, 8, 10]  # the tail window ends on the last frame
    assert blend[:, 3].sum(axis=0).tolist() == [0.0] * 14 + [1.0, 1.0]  # it gives frames 24 and 25 only
    assert blend[24, 3, 14] == blend[25, 3, 15] == 1.0


def test_every_frame_of_every_clip_length_is_blended_whole() -> None:
    for count in range(2, 121):
        frames, blend = context_windows(count)
        assert frames.min() == 0 and frames.max() == count - 1
        assert frames.shape[1] == min(count, CONTEXT_LENGTH) and blend.shape == (count, *frames.shape)
        np.testing.assert_allclose(blend.sum(axis=(1, 2)), 1.0, rtol=1e-6, err_msg=str(count))
        holds = np.zeros(blend.shape, bool)
        holds[frames, *np.indices(frames.shape)] = True
        assert not blend[~holds].any(), count  # a window gives only the frames it holds


@pytest.mark.parametrize("count", [16, 24, 26, 37, 120])
def test_shuffled_context_noise_is_diffusers_draw_for_draw(count: int) -> None:
    from diffusers.pipelines.free_noise_utils import AnimateDiffFreeNoiseMixin

    settings = SimpleNamespace(
        vae_scale_factor=8,
        _free_noise_context_length=CONTEXT_LENGTH,
        _free_noise_context_stride=CONTEXT_STRIDE,
        _free_noise_noise_type="shuffle_context",
    )
    generator = torch.Generator().manual_seed(7)
    want = AnimateDiffFreeNoiseMixin._prepare_latents_free_noise(
        settings, 1, 4, count, 64, 64, torch.float32, "cpu", generator
    )
    mine = torch.Generator().manual_seed(7)
    got = shuffle_context_noise(torch.randn((1, 4, count, 8, 8), generator=mine), mine)
    assert torch.equal(got, want)
    assert torch.equal(torch.rand(3, generator=mine), torch.rand(3, generator=generator))  # same draws left
    if count >= CONTEXT_LENGTH + CONTEXT_STRIDE:  # frames 16..19 are frames 0..3, shuffled
        first, repeat = got[0, 0, :CONTEXT_STRIDE, 0, 0], got[0, 0, CONTEXT_LENGTH : CONTEXT_LENGTH + 4, 0, 0]
        assert torch.equal(first.sort().values, repeat.sort().values) and not torch.equal(first, repeat)


@pytest.fixture(scope="module")
def temporal_block(tiny_model: Path) -> torch.nn.Module:
    """One of the tiny motion adapter's temporal transformer blocks (positional embedding included)."""
    from diffusers import MotionAdapter

    adapter = MotionAdapter.from_pretrained(tiny_model / "motion_adapter")
    return adapter.down_blocks[0].motion_modules[0].transformer_blocks[0].eval()


def diffusers_free_noise(block: torch.nn.Module, weighting: str) -> torch.nn.Module:
    """diffusers' FreeNoiseTransformerBlock with `block`'s weights, as enable_free_noise builds it."""
    from diffusers.models.attention import FreeNoiseTransformerBlock

    free_noise = FreeNoiseTransformerBlock(
        dim=block.dim,
        num_attention_heads=block.num_attention_heads,
        attention_head_dim=block.attention_head_dim,
        cross_attention_dim=block.cross_attention_dim,
        activation_fn=block.activation_fn,
        attention_bias=block.attention_bias,
        double_self_attention=block.double_self_attention,
        positional_embeddings=block.positional_embeddings,
        num_positional_embeddings=block.num_positional_embeddings,
        weighting_scheme=weighting,
    )
    free_noise.load_state_dict(block.state_dict())
    return free_noise.eval()


def windowed(block: torch.nn.Module, count: int, blend: list[float] | None = None) -> torch.nn.Module:
    from birdgen.engines.modules import ContextWindowBlock, ContextWindows

    windows = ContextWindows()
    frames, mixing = context_windows(count, blend=blend)
    windows.frames, windows.blend = torch.from_numpy(frames), torch.from_numpy(mixing)
    return ContextWindowBlock(block, windows)


@torch.no_grad()
def test_windowed_block_is_diffusers_free_noise_block(temporal_block: torch.nn.Module) -> None:
    x = torch.randn(6, 24, temporal_block.dim, generator=torch.Generator().manual_seed(0))
    want = diffusers_free_noise(temporal_block, "pyramid")(x)
    torch.testing.assert_close(windowed(temporal_block, 24)(x), want, rtol=0, atol=1e-5)
    assert (want - temporal_block(x)).abs().max() > 1e-3  # windows differ from attending all 24 at once
    # One window: exactly the plain block.
    x16 = x[:, :16]
    assert torch.equal(windowed(temporal_block, 16)(x16), temporal_block(x16))


@torch.no_grad()
def test_tail_window_blends_as_free_noise_defines_it(temporal_block: torch.nn.Module) -> None:
    """26 frames: windows at 0, 4, 8 and a tail window at 10 that alone covers frames 24 and 25."""
    x = torch.randn(6, 26, temporal_block.dim, generator=torch.Generator().manual_seed(1))
    flat = diffusers_free_noise(temporal_block, "flat")(x)  # one weight per window: diffusers is right
    torch.testing.assert_close(windowed(temporal_block, 26, blend=[1.0] * 16)(x), flat, rtol=0, atol=1e-5)
    # Frames only the tail covers are that window's output whatever the blend weights ...
    mine = windowed(temporal_block, 26)(x)
    torch.testing.assert_close(mine[:, 24:], flat[:, 24:], rtol=0, atol=1e-5)
    # ... but diffusers' pyramid blend divides the last frame by the wrong weight (2 instead of 1).
    theirs = diffusers_free_noise(temporal_block, "pyramid")(x)
    torch.testing.assert_close(mine[:, :24], theirs[:, :24], rtol=0, atol=1e-5)
    assert (theirs[:, 25] - flat[:, 25]).abs().max() > 1e-2
