"""Engine kinds by name: the only place that knows which kinds exist."""

from __future__ import annotations

from birdgen.engines.base import Engine, EngineKind


def engine_kind(name: str) -> EngineKind:
    """The engine kind called `name`; a ValueError lists the kinds available here."""
    if name == "onnxruntime":
        from birdgen.engines.onnxruntime import OnnxRuntimeKind

        return OnnxRuntimeKind()
    raise ValueError(f"unknown engine kind {name!r}; allowed: {', '.join(ENGINE_KINDS)}")


ENGINE_KINDS = ("onnxruntime",)

__all__ = ["ENGINE_KINDS", "Engine", "EngineKind", "engine_kind"]
