"""One contract per engine stage: tensor names, types and shapes.

Export (ONNX axes), config.pbtxt generation, the ONNX checks, the engine loaders and the scheduler's
BLS calls all read these specs, so a shape is spelled once. The batch axis is implicit (first) and
dynamic: Triton's dynamic batcher merges requests along it. No torch here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from birdgen.free_noise import CONTEXT_LENGTH, context_windows
from birdgen.model_folder import ModelDims
from birdgen.schema import LIMITS

# Triton datatype names and their numpy types.
NUMPY_TYPES: dict[str, type[np.generic]] = {
    "FP32": np.float32,
    "FP16": np.float16,
    "INT64": np.int64,
    "UINT8": np.uint8,
}

# The image size engines are tuned and warmed up for (TensorRT's "opt" profile point).
COMMON_SIZE_PX = 512
# Square image sizes engines that prepare work per shape (CUDA graphs) prepare at load: SDXL-Turbo's
# own size and SDXL's. Other sizes still run, without that preparation.
CAPTURED_SIZES_PX = (COMMON_SIZE_PX, 1024)


# The motion UNet's FreeNoise inputs: each window's frame indices, and how windows blend into frames.
CONTEXT_INPUTS = ("context_frames", "context_blend")


@dataclass(frozen=True)
class TensorSpec:
    """A tensor without its batch axis; a str dim is a named dynamic axis."""

    name: str
    dtype: str
    dims: tuple[int | str, ...]

    def triton_dims(self) -> list[int]:
        return [d if isinstance(d, int) else -1 for d in self.dims]

    def concrete(self, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else sizes[d] for d in self.dims)


@dataclass(frozen=True)
class StageSpec:
    """One engine stage: what export writes, what Triton serves, what the scheduler calls."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    # Batch sizes the dynamic batcher should aim for and how long it may hold a request to form them.
    # No stage waits: requests that queue while an instance is busy still form the next batch, so
    # batches grow with load by themselves, and a wait would only delay a request finding the
    # instance idle (at concurrency 1 the UNet's former 2 ms per step was most of Triton's overhead).
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    dynamic_axes: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # name -> (min, opt, max)
    # Outputs a pure function of inputs that repeat across requests (token ids of a closed prompt
    # vocabulary): Triton's response cache may answer them. Latents never repeat, so only the text
    # encoders are.
    cacheable: bool = False

    def sample_inputs(
        self, batch: int, sizes: dict[str, int], vocab_size: int, seed: int = 0
    ) -> dict[str, np.ndarray]:
        """Random inputs of the right types and shapes: for export tracing, checks and warmup."""
        rng = np.random.default_rng(seed)
        out: dict[str, np.ndarray] = {}
        windows = dict(zip(CONTEXT_INPUTS, context_windows(sizes.get("frames", CONTEXT_LENGTH)), strict=True))
        for t in self.inputs:
            shape = (batch, *t.concrete(sizes))
            if t.name in windows:  # real windows: indices must stay inside the clip
                out[t.name] = np.broadcast_to(windows[t.name], shape).copy()
            elif t.dtype == "INT64":
                out[t.name] = rng.integers(0, vocab_size, size=shape, dtype=np.int64)
            elif t.name == "timestep":
                out[t.name] = rng.uniform(1, 999, size=shape).astype(np.float32)
            else:
                out[t.name] = rng.standard_normal(size=shape).astype(NUMPY_TYPES[t.dtype])
        return out


def stage_specs(dims: ModelDims) -> dict[str, StageSpec]:
    """The four engine stages of SDXL, sized for `dims`."""
    tokens, latent, factor = dims.max_tokens, dims.latent_channels, dims.vae_scale_factor
    latent_hw = {
        "latent_height": (LIMITS.height.min // factor, COMMON_SIZE_PX // factor, LIMITS.height.max // factor),
        "latent_width": (LIMITS.width.min // factor, COMMON_SIZE_PX // factor, LIMITS.width.max // factor),
    }
    latent_spec = (latent, "latent_height", "latent_width")
    specs = [
        StageSpec(
            name="text_encoder",
            inputs=(TensorSpec("input_ids", "INT64", (tokens,)),),
            outputs=(TensorSpec("hidden_states", "FP32", (tokens, dims.text_hidden)),),
            max_batch_size=8,
            preferred_batch_sizes=(4, 8),
            cacheable=True,
        ),
        StageSpec(
            name="text_encoder_2",
            inputs=(TensorSpec("input_ids", "INT64", (tokens,)),),
            outputs=(
                TensorSpec("hidden_states", "FP32", (tokens, dims.text_hidden_2)),
                TensorSpec("text_embeds", "FP32", (dims.pooled_dim,)),
            ),
            max_batch_size=8,
            preferred_batch_sizes=(4, 8),
            cacheable=True,
        ),
        StageSpec(
            name="unet",
            inputs=(
                TensorSpec("sample", "FP32", latent_spec),
                TensorSpec("timestep", "FP32", (1,)),
                TensorSpec("encoder_hidden_states", "FP32", (tokens, dims.cross_attention_dim)),
                TensorSpec("text_embeds", "FP32", (dims.pooled_dim,)),
                TensorSpec("time_ids", "FP32", (dims.time_ids_dim,)),
            ),
            outputs=(TensorSpec("noise_pred", "FP32", latent_spec),),
            max_batch_size=8,
            # Concurrent requests at the same size and step merge here.
            preferred_batch_sizes=(4, 8),
            dynamic_axes=latent_hw,
        ),
        StageSpec(
            name="vae_decoder",
            inputs=(TensorSpec("latent", "FP32", latent_spec),),
            # Ready pixels (uint8, HWC): 4x less data out of the decoder than float CHW.
            outputs=(TensorSpec("image", "UINT8", ("image_height", "image_width", 3)),),
            max_batch_size=4,
            preferred_batch_sizes=(2, 4),
            dynamic_axes=latent_hw,
        ),
    ]
    return {s.name: s for s in specs}


def motion_unet_spec(dims: ModelDims, max_frames: int) -> StageSpec:
    """AnimateDiff's motion UNet: the SDXL UNet with motion modules, one clip (C, frames, h, w) per item.

    Frames fold into the UNet's own batch inside the engine; one item per execution because the
    dynamo-exported graph specialises that batch fold (a clip of 16 frames is 16 images of work, so
    merging clips across requests gains little). Prompt embeddings come once per clip and are
    repeated per frame inside, as AnimateDiffSDXLPipeline does before its UNet call. The clip's
    FreeNoise context windows (frame indices and blend, birdgen/free_noise.py) come as inputs, so
    one graph serves every clip length.
    """
    unet = stage_specs(dims)["unet"]
    clip = (dims.latent_channels, "frames", "latent_height", "latent_width")
    windows = ("windows", "window_length")
    most_windows = len(context_windows(max_frames)[0])
    return dataclasses.replace(
        unet,
        name="motion_unet",
        inputs=(
            TensorSpec("sample", "FP32", clip),
            *unet.inputs[1:],
            TensorSpec(CONTEXT_INPUTS[0], "INT64", windows),
            TensorSpec(CONTEXT_INPUTS[1], "FP32", ("frames", *windows)),
        ),
        outputs=(TensorSpec("noise_pred", "FP32", clip),),
        max_batch_size=1,
        preferred_batch_sizes=(),
        dynamic_axes={
            **unet.dynamic_axes,
            "frames": (2, CONTEXT_LENGTH, max_frames),
            "windows": (1, 1, most_windows),
            "window_length": (2, CONTEXT_LENGTH, CONTEXT_LENGTH),
        },
    )


def repository_specs(info: dict) -> dict[str, StageSpec]:
    """The stages an exported repository serves, from its manifest.json or pipeline.json."""
    specs = stage_specs(ModelDims.from_dict(info["dims"]))
    if info.get("motion_max_frames"):
        specs["motion_unet"] = motion_unet_spec(ModelDims.from_dict(info["dims"]), info["motion_max_frames"])
    return specs


def image_sizes(dims: ModelDims, latent_height: int, latent_width: int, frames: int = 0) -> dict[str, int]:
    """All named axes for one latent size (and clip length, with its context windows)."""
    frames = frames or CONTEXT_LENGTH
    windows, length = context_windows(frames)[0].shape
    return {
        "frames": frames,
        "windows": windows,
        "window_length": length,
        "latent_height": latent_height,
        "latent_width": latent_width,
        "image_height": latent_height * dims.vae_scale_factor,
        "image_width": latent_width * dims.vae_scale_factor,
    }


def captured_sizes(spec: StageSpec, sizes_px: Sequence[int] = CAPTURED_SIZES_PX) -> list[dict[str, int]]:
    """The named-axis sizes a per-shape engine prepares at load: each square size in `sizes_px` the
    stage accepts, at the default clip length; one empty entry for a stage without named axes.

    No ModelDims here (engines load from the spec alone): the spec's opt point is COMMON_SIZE_PX in
    latents, which gives the VAE factor.
    """
    if "latent_height" not in spec.dynamic_axes:
        return [{}]
    low, opt, high = spec.dynamic_axes["latent_height"]
    factor = COMMON_SIZE_PX // opt
    clip: dict[str, int] = {}
    if "frames" in spec.dynamic_axes:
        windows, length = context_windows(CONTEXT_LENGTH)[0].shape
        clip = {"frames": CONTEXT_LENGTH, "windows": windows, "window_length": length}
    return [
        {"latent_height": px // factor, "latent_width": px // factor, **clip}
        for px in sizes_px
        if low <= px // factor <= high
    ]
