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

from birdgen.contracts import (
    CONTROLLED_UNET,
    SVD_IMAGE_ENCODER,
    SVD_UNET,
    SVD_VAE_DECODER,
    SVD_VAE_ENCODER,
    controlnet_model,
)
from birdgen.free_noise import CONTEXT_LENGTH, context_windows
from birdgen.model_folder import ModelDims, SvdDims
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
# A ControlNet stage's own inputs: the control image (uint8 HWC, as the VAE decoder's output) and one
# conditioning scale per batch item.
CONTROL_IMAGE, CONTROL_SCALE = "controlnet_cond", "conditioning_scale"
# Stable Video Diffusion (docs/svd.md): the longest clip (img2vid-xt's 25 frames, limits.yaml's
# svd.max_frames), the request's default decode chunk (the decoder's opt point), and the chunk sample
# inputs use where none is asked for (small: a decode costs chunk full-size frames).
SVD_MAX_FRAMES = 25
SVD_DEFAULT_CHUNK = 8
SAMPLE_CHUNK = 2
# The spatial axes: the latent, the image (VAE factor times the latent), and the latent divided by 2**k at
# each UNet downsampling k >= 1 (`latent_height_2`, `latent_height_4`, ...: the ControlNet residuals).
DIRECTIONS = ("height", "width")


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
    # Inputs whose random sample values must lie in a range to be plausible (the SVD UNet's timestep
    # and added_time_ids): name -> (low, high), each broadcast over the tensor's last axis. Only the
    # sample values depend on it, not the engine, so it stays out of repr (the export cache key).
    sample_ranges: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = field(
        default_factory=dict, repr=False, compare=False
    )

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
            elif t.dtype == "UINT8":  # pixels
                out[t.name] = rng.integers(0, 256, size=shape, dtype=np.uint8)
            elif t.name in self.sample_ranges:
                low, high = self.sample_ranges[t.name]
                out[t.name] = rng.uniform(low, high, size=shape).astype(NUMPY_TYPES[t.dtype])
            elif t.name == "timestep":
                out[t.name] = rng.uniform(1, 999, size=shape).astype(np.float32)
            elif t.name == CONTROL_SCALE:  # the request range (limits.yaml control.scale)
                out[t.name] = rng.uniform(0, 2, size=shape).astype(np.float32)
            else:
                out[t.name] = rng.standard_normal(size=shape).astype(NUMPY_TYPES[t.dtype])
        return out


def _latent_axes(dims: ModelDims | SvdDims) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of the latent axes: limits.yaml's image sizes over the VAE factor."""
    factor = dims.vae_scale_factor
    return {
        "latent_height": (LIMITS.height.min // factor, COMMON_SIZE_PX // factor, LIMITS.height.max // factor),
        "latent_width": (LIMITS.width.min // factor, COMMON_SIZE_PX // factor, LIMITS.width.max // factor),
    }


def scaled_axis(direction: str, scale: int) -> str:
    """The latent axis of `direction` divided by `scale` (1: the latent axis itself)."""
    return f"latent_{direction}" if scale == 1 else f"latent_{direction}_{scale}"


def spatial_sizes(latent_height: int, latent_width: int, vae_factor: int, levels: int) -> dict[str, int]:
    """Every spatial axis for one latent size: the latent, the image, and the latent at each of the
    UNet's `levels` (halved per downsampling, as its stride-2 convolutions do for the sizes requests use)."""
    sizes: dict[str, int] = {}
    for direction, latent in zip(DIRECTIONS, (latent_height, latent_width), strict=True):
        sizes[f"image_{direction}"] = latent * vae_factor
        for k in range(levels):
            sizes[scaled_axis(direction, 2**k)] = -(-latent // 2**k)
    return sizes


def _control_axes(dims: ModelDims) -> dict[str, tuple[int, int, int]]:
    """The spatial axes of the ControlNet stages with their ranges: the latent's divided down the levels,
    and the image's (the latent's times the VAE factor)."""
    if not dims.unet_channels or not dims.unet_layers:
        raise ValueError(
            "these model dims have no unet_channels/unet_layers (a manifest written before ControlNet "
            "support): re-export the repository to serve ControlNets"
        )
    latent = _latent_axes(dims)
    axes: dict[str, tuple[int, int, int]] = {}
    for direction in DIRECTIONS:
        low, opt, high = latent[f"latent_{direction}"]
        for k in range(len(dims.unet_channels)):
            axes[scaled_axis(direction, 2**k)] = (low // 2**k, opt // 2**k, high // 2**k)
        factor = dims.vae_scale_factor
        axes[f"image_{direction}"] = (low * factor, opt * factor, high * factor)
    return axes


def stage_specs(dims: ModelDims) -> dict[str, StageSpec]:
    """The four engine stages of SDXL, sized for `dims`."""
    tokens, latent = dims.max_tokens, dims.latent_channels
    latent_hw = _latent_axes(dims)
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


def control_residuals(dims: ModelDims) -> tuple[TensorSpec, ...]:
    """The ControlNet residuals, in diffusers' order (down_block_res_samples, then the mid block's).

    `conv_in` first, then for each level k one tensor per layer (C_k at the level's resolution) and,
    below the last level, the level's downsample output (C_k at the next level's); the mid residual
    at the coarsest level: 1 + levels x layers + (levels - 1) down residuals (docs/controlnet.md).
    """
    _control_axes(dims)  # refuses dims without the UNet's widths
    channels, layers = dims.unet_channels, dims.unet_layers

    def at(level: int, width: int) -> tuple[int | str, ...]:
        return (width, scaled_axis("height", 2**level), scaled_axis("width", 2**level))

    shapes = [at(0, channels[0])]
    for level, width in enumerate(channels):
        shapes += [at(level, width)] * layers
        if level < len(channels) - 1:
            shapes.append(at(level + 1, width))
    down = [TensorSpec(f"down_residual_{i}", "FP32", shape) for i, shape in enumerate(shapes)]
    return (*down, TensorSpec("mid_residual", "FP32", at(len(channels) - 1, channels[-1])))


def controlnet_spec(dims: ModelDims, kind: str) -> StageSpec:
    """A `kind` ControlNet (contracts.controlnet_model): the UNet's inputs plus the control image (uint8
    HWC at the request size) and one conditioning scale per item; out come the scaled residuals.

    It batches like the UNet (requests at different steps and scales merge)."""
    unet = stage_specs(dims)["unet"]
    return dataclasses.replace(
        unet,
        name=controlnet_model(kind),
        inputs=(
            *unet.inputs,
            TensorSpec(CONTROL_IMAGE, "UINT8", ("image_height", "image_width", 3)),
            TensorSpec(CONTROL_SCALE, "FP32", (1,)),
        ),
        outputs=control_residuals(dims),
        dynamic_axes=_control_axes(dims),
    )


def controlled_unet_spec(dims: ModelDims) -> StageSpec:
    """The UNet taking every ControlNet residual (summed over the active nets) besides its own inputs."""
    unet = stage_specs(dims)["unet"]
    axes = {k: v for k, v in _control_axes(dims).items() if not k.startswith("image_")}
    return dataclasses.replace(
        unet, name=CONTROLLED_UNET, inputs=(*unet.inputs, *control_residuals(dims)), dynamic_axes=axes
    )


def control_stage_specs(dims: ModelDims, kinds: Sequence[str]) -> dict[str, StageSpec]:
    """The ControlNet stages of `kinds` (in that order), then the controlled UNet; {} without kinds."""
    if not kinds:
        return {}
    specs = {controlnet_model(kind): controlnet_spec(dims, kind) for kind in kinds}
    return {**specs, CONTROLLED_UNET: controlled_unet_spec(dims)}


def scaled_axes(spec: StageSpec) -> dict[str, tuple[str, int]]:
    """For a spec with axes scaled from the latent (`latent_height_4`, `image_height`, ...): each
    spatial axis as (root, multiple), the root being the coarsest latent axis of its direction, so
    `latent_height` = (`latent_height_4`, 4) and `image_height` = (`latent_height_4`, 32) at a VAE factor
    of 8. {} for specs with the latent axes alone (unet, vae_decoder, motion_unet).

    The VAE factor comes from the ranges' opt points (engines load from the spec alone).
    """
    axes = spec.dynamic_axes
    found: dict[str, tuple[str, int]] = {}
    for direction in DIRECTIONS:
        scales = [s for s in (2**k for k in range(1, 16)) if scaled_axis(direction, s) in axes]
        if not scales:
            continue
        coarsest = max(scales)
        root = scaled_axis(direction, coarsest)
        for scale in (1, *scales):
            found[scaled_axis(direction, scale)] = (root, coarsest // scale)
        image = f"image_{direction}"
        if image in axes:
            factor = axes[image][1] // axes[f"latent_{direction}"][1]
            found[image] = (root, coarsest * factor)
    return found


def svd_stage_specs(svd: SvdDims, max_frames: int, max_chunk: int = 0) -> dict[str, StageSpec]:
    """Stable Video Diffusion's four stages (docs/svd.md, "Stage split"), clips of 2..`max_frames`
    frames decoded in chunks of 1..`max_chunk` frames (default: a whole clip at once)."""
    if max_frames < 2:
        raise ValueError(f"SVD max_frames {max_frames}: a clip has at least 2 frames")
    max_chunk = max_chunk or max_frames
    channels, embed, clip = svd.latent_channels, svd.image_embed_dim, svd.clip_size
    latent_hw = _latent_axes(svd)
    factor = svd.vae_scale_factor
    image_hw = {f"image_{d}": tuple(v * factor for v in latent_hw[f"latent_{d}"]) for d in DIRECTIONS}
    frames = {"frames": (2, min(svd.default_frames, max_frames), max_frames)}
    chunk = {"chunk": (1, min(SVD_DEFAULT_CHUNK, max_chunk), max_chunk)}
    latent = (channels, "latent_height", "latent_width")
    clip_latent = ("frames", *latent)
    specs = [
        StageSpec(
            name=SVD_IMAGE_ENCODER,
            inputs=(TensorSpec("pixel_values", "FP32", (3, clip, clip)),),
            outputs=(TensorSpec("image_embeds", "FP32", (embed,)),),
            max_batch_size=8,
            preferred_batch_sizes=(4, 8),
        ),
        StageSpec(
            name=SVD_VAE_ENCODER,
            inputs=(TensorSpec("image", "FP32", (3, "image_height", "image_width")),),
            outputs=(TensorSpec("image_latents", "FP32", latent),),
            max_batch_size=4,
            preferred_batch_sizes=(2, 4),
            dynamic_axes={**latent_hw, **image_hw},  # type: ignore[dict-item]
        ),
        StageSpec(
            name=SVD_UNET,
            inputs=(
                TensorSpec("sample", "FP32", clip_latent),
                TensorSpec("image_latents", "FP32", latent),
                TensorSpec("timestep", "FP32", (1,)),
                TensorSpec("image_embeds", "FP32", (embed,)),
                TensorSpec("added_time_ids", "FP32", (svd.added_time_ids,)),
            ),
            outputs=(TensorSpec("noise_pred", "FP32", clip_latent),),
            max_batch_size=4,
            # A clip's CFG halves, and concurrent clips of one size and length, merge here.
            preferred_batch_sizes=(2, 4),
            dynamic_axes={**frames, **latent_hw},
            # EDM timesteps 0.25 ln sigma for sigma in [0.002, 700]; fps - 1, motion bucket, noise
            # augmentation within the request limits.
            sample_ranges={"timestep": ((-1.6,), (1.7,)), "added_time_ids": ((4, 1, 0), (29, 255, 1))},
        ),
        StageSpec(
            name=SVD_VAE_DECODER,
            inputs=(TensorSpec("latent", "FP32", ("chunk", *latent)),),
            outputs=(TensorSpec("image", "UINT8", ("chunk", "image_height", "image_width", 3)),),
            max_batch_size=4,
            preferred_batch_sizes=(2, 4),
            dynamic_axes={**chunk, **latent_hw},
        ),
    ]
    return {s.name: s for s in specs}


def svd_info(svd: SvdDims, max_frames: int) -> dict:
    """What manifest.json and pipeline.json record of the SVD stages (`"svd"`; null without them)."""
    return {**svd.to_dict(), "max_frames": max_frames}


def svd_from_info(info: dict) -> tuple[SvdDims, int] | None:
    """The SvdDims and max frames a manifest or pipeline.json records; None when exported without SVD."""
    svd = info.get("svd")
    if not svd:
        return None
    svd = dict(svd)
    max_frames = int(svd.pop("max_frames"))
    return SvdDims.from_dict(svd), max_frames


def repository_specs(info: dict) -> dict[str, StageSpec]:
    """The stages an exported repository serves, from its manifest.json or pipeline.json."""
    dims = ModelDims.from_dict(info["dims"])
    specs = stage_specs(dims)
    if info.get("motion_max_frames"):
        specs["motion_unet"] = motion_unet_spec(dims, info["motion_max_frames"])
    specs |= control_stage_specs(dims, tuple(info.get("controlnets", ())))
    svd = svd_from_info(info)
    if svd is not None:
        specs |= svd_stage_specs(*svd)
    return specs


def image_sizes(
    dims: ModelDims | SvdDims, latent_height: int, latent_width: int, frames: int = 0, chunk: int = 0
) -> dict[str, int]:
    """All named axes for one latent size (and clip length, with its context windows, and SVD decode
    chunk: SAMPLE_CHUNK frames unless given)."""
    frames = frames or CONTEXT_LENGTH
    windows, length = context_windows(frames)[0].shape
    spatial = spatial_sizes(latent_height, latent_width, dims.vae_scale_factor, dims.unet_levels)
    return {
        "frames": frames,
        "windows": windows,
        "window_length": length,
        "chunk": chunk or min(frames, SAMPLE_CHUNK),
        **spatial,
    }


def captured_sizes(spec: StageSpec, sizes_px: Sequence[int] = CAPTURED_SIZES_PX) -> list[dict[str, int]]:
    """The named-axis sizes a per-shape engine prepares at load: each square size in `sizes_px` the
    stage accepts, at the default clip length; one empty entry for a stage without named axes. Each
    entry has the spec's own axes (the scaled and image ones of the ControlNet stages included).

    No ModelDims here (engines load from the spec alone): the spec's opt point is COMMON_SIZE_PX in
    latents, which gives the VAE factor, and its scaled axes give the levels.
    """
    axes = spec.dynamic_axes
    if "latent_height" not in axes:
        return [{}]
    low, opt, high = axes["latent_height"]
    factor = COMMON_SIZE_PX // opt
    levels = 1 + max((k for k in range(1, 16) if scaled_axis("height", 2**k) in axes), default=0)
    clip: dict[str, int] = {}
    if "frames" in axes:  # the opt point: the default clip length (motion_unet's context window)
        frames = axes["frames"][1]
        windows, length = context_windows(frames)[0].shape
        clip = {"frames": frames, "windows": windows, "window_length": length}
    if "chunk" in axes:
        clip["chunk"] = axes["chunk"][1]
    found = []
    for px in sizes_px:
        if low <= px // factor <= high:
            spatial = spatial_sizes(px // factor, px // factor, factor, levels)
            found.append({**{a: v for a, v in spatial.items() if a in axes}, **clip})
    return found
