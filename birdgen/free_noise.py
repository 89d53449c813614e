"""FreeNoise context windows: clips longer than the motion module's window, without stretching frames.

AnimateDiff's motion modules were trained on 16-frame clips. For longer clips FreeNoise (diffusers'
AnimateDiffFreeNoiseMixin, arXiv 2310.15169) runs each temporal transformer block over sliding
windows of 16 frames (stride 4) and blends the overlaps with pyramid weights, and draws the initial
noise of later frames as shuffled copies of earlier windows so the clip stays coherent. Everything
else in the UNet already works per frame.

The windows are computed here, on the host, and handed to the motion UNet engine as two tensors
(frame indices and blend weights per window), so one exported graph serves every clip length.
This module has no torch import at load: `birdgen.stages` builds sample windows from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# diffusers' enable_free_noise defaults: the motion module's training length, a quarter of it apart.
CONTEXT_LENGTH = 16
CONTEXT_STRIDE = 4


def pyramid_weights(length: int) -> list[float]:
    """FreeNoise's "pyramid" blend weights (1, 2, ..., 2, 1): window centres count most."""
    ramp = list(range(1, (length + 1) // 2 + 1))
    mirrored = ramp[::-1] if length % 2 == 0 else ramp[-2::-1]
    return [float(w) for w in ramp + mirrored]


def context_windows(
    frames: int,
    length: int = CONTEXT_LENGTH,
    stride: int = CONTEXT_STRIDE,
    blend: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A clip's windows: frame indices (windows, length) and the blend (frames, windows, length).

    `blend[f, w, i]` is how much position i of window w contributes to frame f: its blend weight
    divided by the total weight frame f receives, 0 where window w does not hold frame f. The
    engine applies it as one matrix product rather than a scatter-add, whose duplicate indices race
    in ONNX Runtime's multi-threaded ScatterND (wrong sums, different from run to run).

    A clip no longer than the window is one window of weight 1 (plain temporal attention, bit for
    bit). Longer clips get FreeNoise's windows: starts 0, stride, 2·stride, ... and, when the last
    one stops short of the end, a tail window ending on the last frame that contributes only the
    frames no earlier window covered. `blend` gives the weight of each position in a window:
    pyramid by default, as in diffusers.

    diffusers (0.42.1) normalises a tail window's frames by one weight, the first of them, rather
    than by each frame's own: with pyramid weights the last frame of, say, a 26-frame clip comes
    out at half strength. Here each frame is divided by the weights it actually received, which is
    FreeNoise's definition; the two agree whenever the windows fit the clip (frames - 16 a multiple
    of 4).
    """
    if frames <= length:
        return np.arange(frames, dtype=np.int64)[None], np.eye(frames, dtype=np.float32)[:, None]
    starts = list(range(0, frames - length + 1, stride))
    per_position = np.asarray(pyramid_weights(length) if blend is None else blend, np.float64)
    weights = [per_position] * len(starts)
    covered = starts[-1] + length
    if covered < frames:
        starts.append(frames - length)
        tail = per_position.copy()
        tail[: length - (frames - covered)] = 0.0
        weights.append(tail)
    indices = np.array([range(s, s + length) for s in starts], np.int64)
    mixing = np.zeros((frames, *indices.shape))
    window, position = np.indices(indices.shape)
    mixing[indices, window, position] = np.stack(weights)
    mixing /= mixing.sum(axis=(1, 2), keepdims=True)
    return indices, mixing.astype(np.float32)


def shuffle_context_noise(
    latents: Any, generator: Any, length: int = CONTEXT_LENGTH, stride: int = CONTEXT_STRIDE
) -> Any:
    """FreeNoise's "shuffle_context" noise on (B, C, frames, h, w) latents, in place.

    Frames past the first window repeat earlier frames in a shuffled order, window by window, drawn
    from `generator` right after the initial noise exactly as diffusers'
    `_prepare_latents_free_noise` does, so the same seed gives the same clip.
    """
    import torch

    frames = latents.shape[2]
    for i in range(length, frames, stride):
        start = max(0, i - length)
        end = min(frames, start + stride)
        indices = torch.arange(start, end)[torch.randperm(end - start, generator=generator)]
        count = min(frames, i + len(indices)) - i
        latents[:, :, i : i + count] = latents[:, :, indices[:count]]
    return latents
