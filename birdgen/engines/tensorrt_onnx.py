"""The ONNX side of a TensorRT build: the exported graph prepared for TensorRT's parser, the fp16
report of constants that fp16 cannot hold, and the refit map file of a refittable plan.

Why apart: all of it is graph work (onnx, onnx-graphsurgeon, polygraphy) that runs and is tested
without TensorRT, which only NVIDIA's container has.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from birdgen.engines.onnx_weights import refit_weight_map

if TYPE_CHECKING:
    import onnx

# Largest finite float16, and the smallest positive (subnormal) one: below it a weight becomes 0.
FP16_MAX = 65504.0
FP16_TINY = 2.0**-24


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
