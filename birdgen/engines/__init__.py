"""Engine kinds by name: the only place that knows which kinds exist."""

from __future__ import annotations

from birdgen.engines.base import Engine, EngineKind, TensorEngine


def engine_kind(name: str, device: str | None = None) -> EngineKind:
    """The engine kind called `name`; a ValueError lists the kinds available here.

    `device` is where an export's stages will be hosted: "cpu", "cuda", or None for the kind's
    default (torch: CUDA where this machine has it). ONNX Runtime stages are hosted on CPU here.
    """
    if name == "onnxruntime":
        from birdgen.engines.onnxruntime import OnnxRuntimeKind

        if device not in (None, "cpu"):
            raise ValueError(f"device {device!r}: the onnxruntime kind is hosted on cpu here")
        return OnnxRuntimeKind()
    if name == "torch":
        from birdgen.engines.torch import TorchKind

        return TorchKind(device)
    if name == "tensorrt":
        # Imports tensorrt first: a machine without it fails here, naming why, before any export work.
        from birdgen.engines.tensorrt import TensorRtKind

        if device not in (None, "cuda"):
            raise ValueError(f"device {device!r}: the tensorrt kind is hosted on cuda")
        return TensorRtKind()
    raise ValueError(f"unknown engine kind {name!r}; allowed: {', '.join(ENGINE_KINDS)}")


ENGINE_KINDS = ("onnxruntime", "torch", "tensorrt")

__all__ = ["ENGINE_KINDS", "Engine", "EngineKind", "TensorEngine", "engine_kind"]
