"""The engine-kind interface: how a stage is built from its torch module, and how it runs.

The scheduler never sees an engine: it calls Triton models by stage name. Each kind (onnxruntime,
torch, tensorrt) implements build + load, and says how Triton should
host it, so adding a kind touches only its module and the registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from birdgen.stages import StageSpec

if TYPE_CHECKING:
    import torch


class Engine(ABC):
    """A loaded stage: named numpy inputs in, named numpy outputs out (batch axis first)."""

    @abstractmethod
    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


class TensorEngine(Engine):
    """An engine that also runs on torch tensors wherever they are (CPU or GPU).

    Why: a stage model can then take Triton's tensors and hand its outputs back through DLPack, so a
    GPU stage's tensors never make a round trip through host memory.
    """

    @abstractmethod
    def infer_tensors(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Outputs on the engine's device, in the spec's dtypes."""
        raise NotImplementedError


class EngineKind(ABC):
    """Build and load side of one engine kind."""

    name: ClassVar[str]

    @property
    def settings(self) -> dict[str, Any]:
        """Settings that change what `build` writes; they key the export cache with the source files."""
        return {}

    @abstractmethod
    def build(
        self, spec: StageSpec, module: Any, sample: Mapping[str, np.ndarray], out_dir: Path
    ) -> list[Path]:
        """Write the stage's artifacts into `out_dir` (a Triton model version folder); return them."""
        raise NotImplementedError

    def derive(
        self, spec: StageSpec, base_dir: Path, weights: Mapping[str, np.ndarray], out_dir: Path
    ) -> list[Path] | None:
        """The artifacts of a module that is the one built into `base_dir` with only `weights`
        (state-dict names) changed, as a family UNet is the base UNet with its LoRA fused: same graph,
        other values, without building again. None where this kind cannot (the exporter builds)."""
        return None

    @abstractmethod
    def load(self, spec: StageSpec, version_dir: Path, device: str = "cpu") -> Engine:
        """Load the artifacts `build` wrote."""
        raise NotImplementedError

    @abstractmethod
    def triton_hosting(self, spec: StageSpec) -> dict[str, Any]:
        """ModelConfig fields that say how Triton hosts the stage (backend/platform, parameters, kind)."""
        raise NotImplementedError
