"""Stage runners: how the pipeline reaches the engines.

`BlsRunner` is the production path, inside a Triton python model: each call is a BLS request to the
stage's model, so Triton's dynamic batcher merges it with other requests' calls. `LocalRunner` loads the
same engine files in-process, for tests and debugging without a server.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from birdgen.engines import Engine, engine_kind
from birdgen.model_folder import ModelDims
from birdgen.stages import StageSpec, stage_specs

Tensors = dict[str, np.ndarray]


class StageError(RuntimeError):
    """An engine stage failed; the entry model reports it as an internal error for that request only."""


class LocalRunner:
    """Engines loaded in-process from an exported repository."""

    def __init__(self, repository: Path, device: str = "cpu") -> None:
        manifest = json.loads((Path(repository) / "manifest.json").read_text())
        kind = engine_kind(manifest["engine"])
        specs = stage_specs(ModelDims.from_dict(manifest["dims"]))
        self.engines: dict[str, Engine] = {
            name: kind.load(spec, Path(repository) / name / "1", device) for name, spec in specs.items()
        }

    def run(self, stage: str, inputs: Mapping[str, np.ndarray]) -> Tensors:
        return self.engines[stage].infer(inputs)

    def run_many(self, calls: Sequence[tuple[str, Mapping[str, np.ndarray]]]) -> list[Tensors]:
        return [self.run(stage, inputs) for stage, inputs in calls]


class BlsRunner:
    """Triton BLS calls to the stage models (only importable inside the python backend)."""

    def __init__(self, specs: Mapping[str, StageSpec]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        self.specs = specs

    def _request(self, stage: str, inputs: Mapping[str, np.ndarray]) -> Any:
        return self.pb.InferenceRequest(
            model_name=stage,
            requested_output_names=[t.name for t in self.specs[stage].outputs],
            inputs=[self.pb.Tensor(name, np.ascontiguousarray(value)) for name, value in inputs.items()],
        )

    def _outputs(self, stage: str, response: Any) -> Tensors:
        if response.has_error():
            raise StageError(f"stage '{stage}' failed: {response.error().message()}")
        return {
            t.name: self.pb.get_output_tensor_by_name(response, t.name).as_numpy()
            for t in self.specs[stage].outputs
        }

    def run(self, stage: str, inputs: Mapping[str, np.ndarray]) -> Tensors:
        return self._outputs(stage, self._request(stage, inputs).exec())

    def run_many(self, calls: Sequence[tuple[str, Mapping[str, np.ndarray]]]) -> list[Tensors]:
        async def gather() -> list[Any]:
            return await asyncio.gather(
                *(self._request(stage, inputs).async_exec() for stage, inputs in calls)
            )

        responses = asyncio.run(gather())
        return [self._outputs(stage, r) for (stage, _), r in zip(calls, responses, strict=True)]
