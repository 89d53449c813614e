"""ONNX Runtime engines: the portable kind (CPU here, CUDA where onnxruntime-gpu is installed).

Export uses torch.onnx's dynamo exporter, the one that keeps parity with the pinned torch, with the
batch and spatial axes dynamic as the stage spec names them. Triton hosts the model in a
python-backend stage model here (the pip tritonserver has no onnxruntime backend); the NGC image's
native `onnxruntime_onnx` platform can serve the same model.onnx.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from birdgen.engines.base import Engine, EngineKind
from birdgen.engines.cpu_lock import CpuLock
from birdgen.engines.onnx_weights import refit_arrays, refit_weight_map, replace_initializers
from birdgen.stages import StageSpec, scaled_axes

ONNX_FILE = "model.onnx"
OPSET = 18


class OnnxRuntimeEngine(Engine):
    def __init__(self, path: Path, device: str) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.lock = CpuLock(active=providers == ["CPUExecutionProvider"])
        # Worker threads spin between operators only while this engine holds the host's CPU lock
        # (see cpu_lock), and stop when the run ends. Without the lock they must sleep: spinning
        # threads of overlapping stages starve each other (measured: 5.4 against 6.75 req/s at
        # concurrency 2 on the 2-core machine).
        spin = "1" if self.lock.enabled else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        options.add_session_config_entry("session.force_spinning_stop", spin)
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.lock:
            outputs = self.session.run(self.output_names, dict(inputs))
        return dict(zip(self.output_names, outputs, strict=True))


def export_onnx(spec: StageSpec, module: Any, sample: Mapping[str, np.ndarray], path: Path) -> Path:
    """torch module -> ONNX file with the spec's names and dynamic axes (batch + named dims)."""
    import torch

    # torch configures its loggers on import; its exporter warns on every export that torchvision
    # (whose ops no SDXL stage uses) is absent.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)

    # A stage serving one item per execution gets a static batch of 1 (see motion_unet_spec).
    batched = spec.max_batch_size > 1
    dims: dict[str, Any] = (
        {"batch": torch.export.Dim("batch", min=1, max=spec.max_batch_size)} if batched else {}
    )
    derived = scaled_axes(spec)
    for name, (low, _, high) in spec.dynamic_axes.items():
        if name not in derived:
            dims[name] = torch.export.Dim(name, min=low, max=high)
    # Axes scaled from one another (the ControlNet stages): one Dim per direction at the coarsest
    # latent axis and the others as its multiples. Separate Dims fail torch.export's guards, e.g.
    # ((h - 1) // 4 + 1) == q. The stages without such axes keep the independent Dims above.
    for name, (root, multiple) in derived.items():
        if root not in dims:
            low, _, high = spec.dynamic_axes[root]
            dims[root] = torch.export.Dim(root, min=low, max=high)
        if name != root:
            dims[name] = multiple * dims[root]
    shapes = {
        t.name: {
            **({0: dims["batch"]} if batched else {}),
            **{i + 1: dims[d] for i, d in enumerate(t.dims) if isinstance(d, str)},
        }
        for t in spec.inputs
    }
    dynamic_shapes = _signature_shapes(module, spec, shapes) if derived else shapes
    args = tuple(torch.from_numpy(sample[t.name]) for t in spec.inputs)
    with torch.no_grad():
        program = torch.onnx.export(
            module.eval(),
            args,
            dynamic_shapes=dynamic_shapes,
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            opset_version=OPSET,
            custom_translation_table=_translations(),
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=_needs_external_data(program.model_proto))
    return path


def _translations() -> dict[Any, Any]:
    """ONNX translations birdgen gives torch.onnx in place of its own (onnxscript's torch_lib)."""
    import torch

    return {torch.ops.aten.repeat_interleave.self_int: _repeat_interleave_self_int}


def _repeat_interleave_self_int(
    self: Any, repeats: Any, dim: int | None = None, output_size: Any = None
) -> Any:
    """aten::repeat_interleave.self_int as onnxscript 0.7.2's, with a symbolic `repeats` put on the
    new axis after `dim` (Unsqueeze, Expand, Reshape). onnxscript's puts it on `dim` itself, which
    is only right when that axis has size 1: the SVD UNet repeating each clip's embeddings per frame
    (a dynamic frames axis) got a wrong graph at batch > 1, refused by ONNX Runtime's Expand."""
    from onnxscript import opset18 as op

    if dim is None:
        self = op.Reshape(self, op.Constant(value_ints=[-1]))
        dim, rank = 0, 1
    else:
        rank = len(self.shape)
    axis = (dim + rank) % rank
    unsqueezed = op.Unsqueeze(self, op.Constant(value_ints=[axis + 1]))
    after = [1] * (rank - axis - 1)
    if isinstance(repeats, int):
        tiles = op.Constant(value_ints=[1] * (axis + 1) + [repeats] + after)
    else:
        parts = [op.Constant(value_ints=[1] * (axis + 1)), op.Reshape(repeats, op.Constant(value_ints=[-1]))]
        if after:
            parts.append(op.Constant(value_ints=after))
        tiles = op.Concat(*parts, axis=0)
    shape = op.Concat(
        op.Shape(self, start=0, end=axis),
        op.Constant(value_ints=[-1]),
        op.Shape(self, start=axis + 1),
        axis=0,
    )
    return op.Reshape(op.Expand(unsqueezed, tiles), shape)


def _signature_shapes(module: Any, spec: StageSpec, shapes: dict[str, Any]) -> dict[str, Any]:
    """`shapes` (per spec input, in order) keyed by the forward's parameters, the var-positional one
    (ControlledUNet's *residuals) getting the remaining inputs as one nested tuple: torch.export
    refuses a flat spec for it."""
    inputs = [t.name for t in spec.inputs]
    nested: dict[str, Any] = {}
    for parameter in inspect.signature(module.forward).parameters.values():
        if not inputs:
            break
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            nested[parameter.name] = tuple(shapes[name] for name in inputs)
            inputs = []
        else:
            nested[parameter.name] = shapes[inputs.pop(0)]
    if inputs:
        raise ValueError(f"{spec.name}: {type(module).__name__}.forward takes no inputs {inputs}")
    return nested


def _needs_external_data(model: Any) -> bool:
    """Weights past protobuf's 2 GB limit (the real SDXL UNet) go to a data file beside the model."""
    return model.ByteSize() > 1_800_000_000


class OnnxRuntimeKind(EngineKind):
    name = "onnxruntime"

    @property
    def settings(self) -> dict[str, Any]:
        return {"opset": OPSET, "exporter": "torch.onnx.dynamo"}

    def build(
        self, spec: StageSpec, module: Any, sample: Mapping[str, np.ndarray], out_dir: Path
    ) -> list[Path]:
        export_onnx(spec, module, sample, out_dir / ONNX_FILE)
        return sorted(p for p in out_dir.iterdir() if p.is_file())

    def derive(
        self, spec: StageSpec, base_dir: Path, weights: Mapping[str, np.ndarray], out_dir: Path
    ) -> list[Path] | None:
        """The base model.onnx with the initializers of `weights` replaced: a family UNet in seconds
        instead of a new trace (a minute for the tiny motion UNet). None when a weight has no
        initializer of its own in the base graph (folded into another constant, or shared)."""
        import onnx

        model = onnx.load(str(base_dir / ONNX_FILE))
        try:
            mapping = refit_weight_map(model, weights)
        except ValueError:
            return None
        replace_initializers(model, refit_arrays(mapping, weights))
        out_dir.mkdir(parents=True, exist_ok=True)
        external = _needs_external_data(model)
        location = f"{ONNX_FILE}.data"
        onnx.save_model(model, str(out_dir / ONNX_FILE), save_as_external_data=external, location=location)
        return sorted(p for p in out_dir.iterdir() if p.is_file())

    def load(self, spec: StageSpec, version_dir: Path, device: str = "cpu") -> Engine:
        return OnnxRuntimeEngine(version_dir / ONNX_FILE, device)

    def triton_hosting(self, spec: StageSpec) -> dict[str, Any]:
        return {"backend": "python", "parameters": {"engine": self.name, "stage": spec.name}}
