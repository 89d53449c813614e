"""TensorRT engines: fp16 plans built from the exported ONNX, hosted by Triton's `tensorrt_plan` platform.

Most of this module needs no TensorRT, and is tested everywhere: the ONNX preparation (polygraphy /
onnx-graphsurgeon), the fp16-safety report, the optimization profiles derived from the stage spec, the
plan cache key, the refit weight map (fused UNet state dict -> ONNX initializers) and the Triton
configs, for the native plan and for ONNX Runtime's TensorRT execution provider. Only `build_plan` and
`TensorRtKind.build`/`load` import tensorrt: TensorRT is not installable on a machine without NVIDIA's
stack, so those run in NVIDIA's container (nvcr.io/nvidia/tritonserver, or nvcr.io/nvidia/tensorrt).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from birdgen.engines.base import Engine, EngineKind
from birdgen.engines.onnx_weights import (
    onnx_weights,
    refit_weight_map,
    structure_sha256,
)
from birdgen.stages import CAPTURED_SIZES_PX, StageSpec, captured_sizes

if TYPE_CHECKING:
    import onnx

PLAN_FILE = "model.plan"  # Triton's default file name for the tensorrt_plan platform
PREPARED_ONNX = "prepared.onnx"
REFIT_MAP_FILE = "refit_map.json"  # refittable plans: state-dict name -> initializer, transpose
# Largest finite float16, and the smallest positive (subnormal) one: below it a weight becomes 0.
FP16_MAX = 65504.0
FP16_TINY = 2.0**-24
NOT_IMPORTABLE = "tensorrt is not importable here ({error}); build TensorRT engines in NVIDIA's container"


class TensorRtUnavailable(ValueError):
    """TensorRT cannot be imported on this machine (a ValueError, like any unusable engine choice)."""


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as exc:
        raise TensorRtUnavailable(NOT_IMPORTABLE.format(error=exc)) from None
    return tensorrt


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


@dataclass(frozen=True)
class TensorRtSettings:
    """What a plan is a function of, besides its ONNX file, the GPU and the TensorRT version."""

    fp16: bool = True
    refittable: bool = False  # family UNets: new LoRA weights without a rebuild (see refit_weight_map)
    hot_sizes_px: tuple[int, ...] = CAPTURED_SIZES_PX
    workspace_bytes: int | None = None  # None: TensorRT's default (the GPU's memory)
    timing_cache: str = ""  # path of the persisted timing cache; empty: <cache dir>/timing.cache
    cache_dir: str = str(Path.home() / ".cache" / "birdgen" / "tensorrt")


def plan_cache_key(onnx_sha256: str, settings: Mapping[str, Any], gpu_name: str, trt_version: str) -> str:
    """A plan is reusable when all four are equal: an engine is specific to its GPU model and
    TensorRT version, and fp16/profiles/refit change what is built. Paths (the cache files) do not."""
    kept = {k: v for k, v in settings.items() if k not in ("timing_cache", "cache_dir")}
    payload = {"onnx": onnx_sha256, "settings": kept, "gpu": gpu_name, "tensorrt": trt_version}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()


def prepare_onnx(path: Path, out: Path) -> Path:
    """The exported ONNX made ready for TensorRT's parser: constants folded (polygraphy, through
    onnx-graphsurgeon and ONNX Runtime), dead nodes removed, nodes sorted, shapes inferred.

    Initializer names survive (so the refit map holds for the prepared file too). Models past
    protobuf's 2 GB limit keep their weights in an external data file beside `out`.
    """
    import onnx
    import onnx_graphsurgeon as gs
    from polygraphy.backend.onnx import fold_constants

    model = onnx.load(str(path))
    model = fold_constants(model, num_passes=2, error_ok=False)
    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    large = model.ByteSize() > 1_800_000_000
    onnx.save(model, str(out), save_as_external_data=large, location=f"{out.name}.data" if large else None)
    return out


@dataclass(frozen=True)
class Fp16Issue:
    """A constant that fp16 cannot hold: `overflow` values past ±65504 become inf, `underflow`
    nonzero values below 2^-24 become 0 (`fraction` of the tensor's nonzero values)."""

    name: str
    kind: str
    count: int
    fraction: float
    max_abs: float


def fp16_report(model: onnx.ModelProto, underflow_fraction: float = 0.01) -> list[Fp16Issue]:
    """Float constants (initializers and Constant nodes) that lose values in fp16. Any overflow is
    reported; underflow only past `underflow_fraction` of a tensor's nonzero values (a few tiny weights
    flushing to zero is normal and harmless)."""
    from onnx import numpy_helper

    tensors = list(model.graph.initializer) + [
        a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"
    ]
    issues = []
    for tensor in tensors:
        values = numpy_helper.to_array(tensor)
        if values.dtype not in (np.float32, np.float64) or values.size == 0:
            continue
        magnitude = np.abs(values.astype(np.float64))
        nonzero = max(int(np.count_nonzero(magnitude)), 1)
        over = int(np.count_nonzero(magnitude > FP16_MAX))
        under = int(np.count_nonzero((magnitude > 0) & (magnitude < FP16_TINY)))
        peak = float(magnitude.max())
        if over:
            issues.append(Fp16Issue(tensor.name, "overflow", over, over / values.size, peak))
        if under / nonzero > underflow_fraction:
            issues.append(Fp16Issue(tensor.name, "underflow", under, under / nonzero, peak))
    return issues


def write_refit_map(onnx_path: Path, module: Any, out: Path) -> Path:
    """The refit map of the weights a family LoRA touches (training's target modules), as JSON."""
    import onnx

    from birdgen.engines.modules import TARGET_MODULES

    names = [
        f"{name}.weight"
        for name, _ in module.named_modules()
        if any(name.endswith(f".{target}") for target in TARGET_MODULES)
    ]
    mapping = refit_weight_map(onnx.load(str(onnx_path), load_external_data=False), names)
    out.write_text(json.dumps({k: asdict(v) for k, v in mapping.items()}, indent=2, sort_keys=True) + "\n")
    return out


def refit_plan(plan: bytes, weights: Mapping[str, np.ndarray]) -> bytes:
    """A refittable plan with *every* refittable weight set from `weights` (initializer names), then
    serialized again: TensorRT 10's `Refitter`.

    Setting all of them, not only the ones a LoRA touches, is what makes A -> B -> A give A's output
    exactly: nothing of the previous weights survives (the TensorRT demo's partial refit leaves a
    blend, NVIDIA/TensorRT issue 3628). Raises naming the weights `weights` lacks.
    """
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    if engine is None:
        raise RuntimeError("TensorRT cannot deserialize the plan (another GPU or TensorRT version?)")
    refitter = trt.Refitter(engine, logger)
    names = list(refitter.get_all_weights())
    missing = sorted(set(names) - set(weights))
    if missing:
        raise ValueError(f"refit: {len(missing)} weights of the plan are not in this export: {missing[:5]}")
    arrays = [np.ascontiguousarray(weights[name]) for name in names]  # alive until the refit is done
    for name, array in zip(names, arrays, strict=True):
        refitter.set_named_weights(name, trt.Weights(array))
    if list(refitter.get_missing_weights()) or not refitter.refit_cuda_engine():
        raise RuntimeError("TensorRT refit failed (see the TensorRT log above)")
    return bytes(engine.serialize())


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


def build_plan(
    onnx_path: Path, plan_path: Path, found: Sequence[Profile], settings: TensorRtSettings, cache: Path
) -> Path:
    """TensorRT 10 builder: parse the ONNX, add the profiles, build with the persisted timing cache."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT cannot parse it: {errors}")
    config = builder.create_builder_config()
    if settings.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if settings.refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    if settings.workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    for found_profile in found:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in found_profile.shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    timing = config.create_timing_cache(cache.read_bytes() if cache.is_file() else b"")
    config.set_timing_cache(timing, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"{onnx_path}: TensorRT build failed (see the TensorRT log above)")
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    plan_path.write_bytes(bytes(plan))
    return plan_path


class TensorRtEngine(Engine):
    """A plan run through polygraphy's TrtRunner (the export check; Triton serves the plan itself).
    Profile 0 is the dynamic one, so it runs every shape. fp16 tolerances apply to its outputs."""

    def __init__(self, plan: Path, tolerance: Mapping[str, float]) -> None:
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        self.runner = TrtRunner(EngineFromBytes(BytesFromPath(str(plan))))
        self.runner.activate()
        self.tolerance = dict(tolerance)  # read by the exporter's check

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.runner.infer(dict(inputs), copy_outputs_to_host=True)
        return {k: np.asarray(v) for k, v in outputs.items()}


class TensorRtKind(EngineKind):
    """ONNX (the onnxruntime kind's export) -> prepared ONNX -> fp16 plan with the spec's profiles.

    Plans are cached under `cache_dir` by `plan_cache_key`, so a re-export with an unchanged ONNX
    file, settings, GPU and TensorRT reuses the plan; every build shares one timing cache file.
    """

    name = "tensorrt"
    # fp16 differs from the float32 torch module by more than float reordering (export check).
    tolerance: ClassVar[dict[str, float]] = {"FP32": 5e-2, "UINT8": 2}

    def __init__(self, **settings: Any) -> None:
        self.trt = import_tensorrt()  # fail fast, before any export work, where TensorRT is missing
        self.options = TensorRtSettings(**settings)

    @property
    def settings(self) -> dict[str, Any]:
        import torch

        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
        return {**asdict(self.options), "gpu": gpu, "tensorrt": self.trt.__version__}

    def build(
        self, spec: StageSpec, module: Any, sample: Mapping[str, np.ndarray], out_dir: Path
    ) -> list[Path]:
        from birdgen.engines.onnxruntime import export_onnx
        from birdgen.manifest import sha256_file

        settings = self.settings
        cache_dir = Path(self.options.cache_dir)
        timing = Path(self.options.timing_cache) if self.options.timing_cache else cache_dir / "timing.cache"
        with tempfile.TemporaryDirectory(prefix=f"birdgen-trt-{spec.name}-") as work:
            exported = export_onnx(spec, module, sample, Path(work) / "model.onnx")
            key = plan_cache_key(sha256_file(exported), settings, settings["gpu"], settings["tensorrt"])
            cached = cache_dir / f"{spec.name}-{key}.plan"
            if self.options.refittable:
                write_refit_map(exported, module, out_dir / REFIT_MAP_FILE)
            if not cached.is_file():
                prepared = prepare_onnx(exported, Path(work) / PREPARED_ONNX)
                partial = cached.with_suffix(".partial")
                self._plan(spec, prepared, partial, settings, timing)
                partial.replace(cached)
        shutil.copyfile(cached, out_dir / PLAN_FILE)
        return sorted(p for p in out_dir.iterdir() if p.is_file())

    def _plan(
        self, spec: StageSpec, prepared: Path, out: Path, settings: Mapping[str, Any], timing: Path
    ) -> None:
        """The plan of `prepared`, built; or, refittable, a family UNet without a build: the plan of the
        same graph (the base UNet's, or an earlier family's), kept in the plan cache under the graph's
        structure hash, with every weight set from this export. Seconds instead of a build."""
        same_graph = None
        if self.options.refittable:
            import onnx

            model = onnx.load(str(prepared))
            key = plan_cache_key(structure_sha256(model), settings, settings["gpu"], settings["tensorrt"])
            same_graph = Path(self.options.cache_dir) / f"refittable-{key}.plan"
            if same_graph.is_file():
                out.write_bytes(refit_plan(same_graph.read_bytes(), onnx_weights(model)))
                return
        build_plan(prepared, out, profiles(spec, self.options.hot_sizes_px), self.options, timing)
        if same_graph is not None:
            shutil.copyfile(out, same_graph)

    def load(self, spec: StageSpec, version_dir: Path, device: str = "cuda") -> Engine:
        return TensorRtEngine(version_dir / PLAN_FILE, self.tolerance)

    def triton_hosting(self, spec: StageSpec) -> dict[str, Any]:
        return tensorrt_hosting(spec, self.options.hot_sizes_px)
