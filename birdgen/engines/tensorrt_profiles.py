"""TensorRT optimization profiles of a stage, and the Triton configs that host a plan or ONNX
Runtime's TensorRT execution provider with them.

Why apart: profiles follow from the stage spec alone, so they (and the configs built on them) are
plain Python, tested on every machine; the native plan build and the ORT route both read them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from birdgen.stages import CAPTURED_SIZES_PX, StageSpec, captured_sizes

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    """One TensorRT optimization profile: (min, opt, max) full shapes, batch axis included, per input."""

    name: str
    shapes: dict[str, tuple[Shape, Shape, Shape]]

    def covers(self, shapes: Mapping[str, Shape]) -> bool:
        return all(
            all(lo <= s <= hi for lo, s, hi in zip(low, shapes[n], high, strict=True))
            for n, (low, _, high) in self.shapes.items()
        )


def profiles(spec: StageSpec, sizes_px: Sequence[int] = CAPTURED_SIZES_PX) -> list[Profile]:
    """The dynamic profile (the spec's axis ranges; tuned at COMMON_SIZE_PX) first, then one profile
    per hot square size (`sizes_px`, where the stage accepts it) with every named axis pinned.

    The batch axis stays 1..max_batch_size in every profile, since Triton's dynamic batcher picks it;
    TensorRT tunes at batch 1 (a request alone). Triton picks, per request, a profile of the instance
    that covers its shapes; the dynamic one first keeps every shape servable by profile 0 alone.
    """
    batch = (1, 1, spec.max_batch_size)
    missing = sorted(
        {d for t in spec.inputs for d in t.dims if isinstance(d, str)} - spec.dynamic_axes.keys()
    )
    if missing:
        raise ValueError(f"{spec.name}: inputs use axes {missing} that the spec gives no range")

    def profile(name: str, axes: Mapping[str, tuple[int, int, int]]) -> Profile:
        shapes = {
            t.name: tuple((batch[i], *t.concrete({a: r[i] for a, r in axes.items()})) for i in range(3))
            for t in spec.inputs
        }
        return Profile(name, shapes)  # type: ignore[arg-type]

    found = [profile("dynamic", spec.dynamic_axes)]
    if spec.dynamic_axes:
        for sizes in captured_sizes(spec, sizes_px):
            label = "x".join(str(sizes[a]) for a in ("latent_height", "latent_width"))
            found.append(profile(f"static_{label}", {a: (v, v, v) for a, v in sizes.items()}))
    return found


def tensorrt_hosting(spec: StageSpec, hot_sizes_px: Sequence[int] = CAPTURED_SIZES_PX) -> dict[str, Any]:
    """Triton hosting of a plan (for `stage_config`): the native platform on the GPU, every profile
    available to the instance (Triton picks one that fits each request's shapes)."""
    count = len(profiles(spec, hot_sizes_px))
    return {"platform": "tensorrt_plan", "gpu": True, "profiles": [str(i) for i in range(count)]}


def ort_shape_ranges(profile: Profile) -> dict[str, str]:
    """ONNX Runtime's TensorRT EP explicit profile, trt_profile_{min,opt,max}_shapes: "name:1x4x64x64,..."."""
    return {
        f"trt_profile_{point}_shapes": ",".join(
            f"{name}:{'x'.join(map(str, shapes[i]))}" for name, shapes in profile.shapes.items()
        )
        for i, point in enumerate(("min", "opt", "max"))
    }


def ort_tensorrt_optimization(spec: StageSpec, cache_path: str, workspace_bytes: int = 8 << 30) -> Any:
    """ModelConfig.optimization for Triton's native `onnxruntime_onnx` platform running the same
    model.onnx through ONNX Runtime's TensorRT execution provider (fp16, engine and timing caches)."""
    from tritonclient.grpc import model_config_pb2 as mc

    optimization = mc.ModelOptimizationPolicy()
    accelerator = optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
    parameters = {
        "precision_mode": "FP16",
        "max_workspace_size_bytes": str(workspace_bytes),
        "trt_engine_cache_enable": "true",
        "trt_engine_cache_path": cache_path,
        "trt_timing_cache_enable": "true",
        "trt_timing_cache_path": cache_path,
    }
    if spec.dynamic_axes or spec.max_batch_size > 1:
        parameters |= ort_shape_ranges(profiles(spec)[0])
    accelerator.parameters.update(parameters)
    return optimization


def ort_tensorrt_config(spec: StageSpec, dims: Any, cache_path: str, instances: int = 1) -> Any:
    """A stage's config.pbtxt for `onnxruntime_onnx` with the TensorRT accelerator (KIND_GPU)."""
    from birdgen.triton_config import stage_config

    config = stage_config(spec, dims, {"platform": "onnxruntime_onnx", "gpu": True}, instances)
    config.optimization.CopyFrom(ort_tensorrt_optimization(spec, cache_path))
    return config
