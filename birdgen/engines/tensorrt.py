"""The tensorrt engine kind: fp16 plans built from the exported ONNX, hosted by Triton's `tensorrt_plan`
platform, and refitted with a family's weights instead of rebuilt.

Only `build_plan`, `refit_plan` and `TensorRtKind` import tensorrt (when called, not at import): TensorRT is
not installable on a machine without NVIDIA's stack, so those run in NVIDIA's container
(nvcr.io/nvidia/tritonserver, or nvcr.io/nvidia/tensorrt). What needs no TensorRT lives beside it and is
tested everywhere: the profiles and Triton configs (`tensorrt_profiles`), the ONNX preparation, fp16
report and refit map (`tensorrt_onnx`); here, the settings and the plan cache key.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from birdgen.engines.base import Engine, EngineKind
from birdgen.engines.onnx_weights import onnx_weights, structure_sha256
from birdgen.engines.tensorrt_onnx import prepare_onnx, write_refit_map
from birdgen.engines.tensorrt_profiles import Profile, profiles, tensorrt_hosting
from birdgen.stages import CAPTURED_SIZES_PX, StageSpec

PLAN_FILE = "model.plan"  # Triton's default file name for the tensorrt_plan platform
PREPARED_ONNX = "prepared.onnx"
REFIT_MAP_FILE = "refit_map.json"  # refittable plans: state-dict name -> initializer, transpose
NOT_IMPORTABLE = "tensorrt is not importable here ({error}); build TensorRT engines in NVIDIA's container"


class TensorRtUnavailable(ValueError):
    """TensorRT cannot be imported on this machine (a ValueError, like any unusable engine choice)."""


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as exc:
        raise TensorRtUnavailable(NOT_IMPORTABLE.format(error=exc)) from None
    return tensorrt


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
