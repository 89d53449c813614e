"""A torch module's weights in its ONNX export: which initializer holds each one, and the graph apart
from its weights.

Shared by the two kinds that give a family UNet the base UNet's graph with the family's weights
instead of exporting it again: TensorRT refits a plan (tensorrt.py), ONNX Runtime writes the base
model.onnx with the LoRA-touched initializers replaced (onnxruntime.py).
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

# Where the dynamo exporter records the module a node came from (its last scope is the aten op).
SCOPES_KEY = "pkg.torch.onnx.name_scopes"


@dataclass(frozen=True)
class RefitWeight:
    """Where a torch weight lives in the ONNX file: the initializer TensorRT refits by name, and
    whether the exporter stored it transposed (a Linear folded into MatMul(x, W^T))."""

    initializer: str
    transpose: bool


def refit_weight_map(model: onnx.ModelProto, weight_names: Iterable[str]) -> dict[str, RefitWeight]:
    """torch state-dict names (e.g. the LoRA-touched `<module>.weight`s of a fused UNet) -> ONNX
    initializers, for TensorRT's refitter (`set_named_weights`, ONNX initializer names).

    The dynamo exporter keeps a parameter's name when the node uses it as is (Conv, Gemm); a Linear
    without bias becomes MatMul with the weight pre-transposed into an anonymous initializer, found
    here through the node's recorded module scope. Raises naming any weight with no initializer,
    with several, or whose initializer another weight shares (setting it would change both).
    """
    initializers = {i.name: tuple(i.dims) for i in model.graph.initializer}
    found: dict[str, list[RefitWeight]] = {}
    for node in model.graph.node:
        scopes = next((ast.literal_eval(p.value) for p in node.metadata_props if p.key == SCOPES_KEY), [])
        for index, name in enumerate(node.input):
            if name not in initializers:
                continue
            if "." in name:  # a parameter's own name
                found.setdefault(name, []).append(RefitWeight(name, transpose=False))
            elif node.op_type == "MatMul" and index == 1 and len(scopes) >= 2:
                found.setdefault(f"{scopes[-2]}.weight", []).append(RefitWeight(name, transpose=True))
    owners: dict[str, set[str]] = {}
    for weight, places in found.items():
        for place in places:
            owners.setdefault(place.initializer, set()).add(weight)
    mapping, problems = {}, []
    for weight in weight_names:
        places = sorted(set(found.get(weight, [])), key=lambda r: r.initializer)
        if len(places) != 1:
            problems.append(f"{weight}: {len(places)} initializers {[p.initializer for p in places]}")
        elif owners[places[0].initializer] != {weight}:
            problems.append(
                f"{weight}: initializer {places[0].initializer} shared with {owners[places[0].initializer]}"
            )
        else:
            mapping[weight] = places[0]
    if problems:
        raise ValueError(
            "refit map: weights without an ONNX initializer of their own: " + "; ".join(problems)
        )
    return mapping


def refit_arrays(
    mapping: Mapping[str, RefitWeight], state: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The initializer-named arrays a refit sets, from a (fused) state dict as numpy arrays."""
    return {
        place.initializer: np.ascontiguousarray(state[name].T if place.transpose else state[name])
        for name, place in mapping.items()
    }


# ONNX data types of weights (float); integer initializers are shapes and indices, part of the graph.
_WEIGHT_TYPES = (1, 10, 11, 16)  # FLOAT, FLOAT16, DOUBLE, BFLOAT16


def structure_sha256(model: onnx.ModelProto) -> str:
    """The graph with its float weights' values left out: two exports with the same hash differ only
    in weights (a base UNet and a family's LoRA-fused one), so a refittable plan of one refits into
    the other. Names, shapes and integer constants (reshape targets, indices) stay in."""
    import onnx

    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    for tensor in stripped.graph.initializer:
        if tensor.data_type in _WEIGHT_TYPES:
            dims, name, dtype = list(tensor.dims), tensor.name, tensor.data_type
            tensor.Clear()
            tensor.name, tensor.data_type = name, dtype
            tensor.dims.extend(dims)
    return hashlib.sha256(stripped.SerializeToString(deterministic=True)).hexdigest()


def onnx_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every initializer by name: what a refit of this export sets."""
    from onnx import numpy_helper

    return {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}


def replace_initializers(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """`model` with the named initializers' values replaced in place: same names, shapes and dtypes,
    so the graph is the same and only those weights change."""
    from onnx import helper, numpy_helper

    missing = set(arrays)
    for tensor in model.graph.initializer:
        if tensor.name not in arrays:
            continue
        array = arrays[tensor.name]
        if tuple(tensor.dims) != array.shape:
            raise ValueError(
                f"initializer {tensor.name}: shape {tuple(tensor.dims)}, new value {array.shape}"
            )
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array, dtype=dtype), tensor.name))
        missing.discard(tensor.name)
    if missing:
        raise ValueError(f"no initializers named {sorted(missing)[:5]}")
    return model
