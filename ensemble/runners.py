"""Stage runners: how the pipeline reaches the engines.

`BlsRunner` is the production path, inside a Triton python model: each call is a BLS request to the
stage's model, so Triton's dynamic batcher merges it with other requests' calls. `LocalRunner` loads the
same engine files in-process, for tests and debugging without a server.

A stage call may name a model other than the stage's own (a family UNet serves the `unet` contract)
and pin its version, so one image is drawn by one version even while a new one rolls out.

Both runners take and give torch tensors, on the device where they are: a GPU stage's outputs stay
in GPU memory and go back into the next stage call as they are (DLPack both ways in BLS), so the
pipeline's latents never visit the host between stages.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from birdgen.contracts import MANIFEST, PIPELINE_FILE
from birdgen.engines import Engine, TensorEngine, engine_kind
from birdgen.ensemble.triton_model import tensor_from_triton, tensor_to_triton, verify_at_load
from birdgen.stages import StageSpec, repository_specs

# Stage inputs and outputs: torch tensors on the device where the stage put them (see module doc).
Tensors = dict[str, torch.Tensor]
# Triton's messages for a model or version that is not (or no longer) loaded.
_GONE = ("unknown model", "not ready", "not at ready state", "is not found", "unavailable")


class StageError(RuntimeError):
    """An engine stage failed; the entry model reports it as an internal error for that request only."""


class ModelUnavailable(StageError):
    """The pinned model version went away (a roll-out unloaded it): redo the request on the new one."""


class LocalRunner:
    """Engines loaded in-process from an exported repository (family UNets on first use)."""

    def __init__(self, repository: Path, device: str = "cpu") -> None:
        self.repository = Path(repository)
        manifest = json.loads((self.repository / MANIFEST).read_text())
        self.kind = engine_kind(manifest["engine"])
        self.specs = repository_specs(manifest)
        self.device = device
        self.engines: dict[tuple[str, int], Engine] = {}

    def ready_version(self, model: str, versions: Sequence[int]) -> int:
        return versions[0]

    def max_batch(self, stage: str) -> int:
        return self.specs[stage].max_batch_size

    def run(
        self, stage: str, inputs: Mapping[str, torch.Tensor], model: str | None = None, version: int = 1
    ) -> Tensors:
        key = (model or stage, version)
        if key not in self.engines:
            self.engines[key] = self.kind.load(
                self.specs[stage], self.repository / key[0] / str(version), self.device
            )
        engine = self.engines[key]
        if isinstance(engine, TensorEngine):
            return engine.infer_tensors(inputs)
        outputs = engine.infer({name: value.cpu().numpy() for name, value in inputs.items()})
        return {name: torch.from_numpy(value) for name, value in outputs.items()}

    def run_many(self, calls: Sequence[tuple[str, Mapping[str, torch.Tensor]]]) -> list[Tensors]:
        return [self.run(stage, inputs) for stage, inputs in calls]


class BlsRunner:
    """Triton BLS calls to the stage models (only importable inside the python backend)."""

    def __init__(self, specs: Mapping[str, StageSpec]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        self.specs = specs

    def max_batch(self, stage: str) -> int:
        return self.specs[stage].max_batch_size

    def ready_version(self, model: str, versions: Sequence[int]) -> int:
        """The newest version on disk that Triton has ready; loads the model first if none is."""
        for _ in range(2):
            for version in versions:
                if self.pb.is_model_ready(model_name=model, model_version=str(version)):
                    return version
            try:
                self.pb.load_model(model_name=model)  # explicit model control: family UNets load on demand
            except Exception as exc:
                raise ModelUnavailable(
                    f"model '{model}' is not loaded and could not be loaded: {exc}"
                ) from None
        raise ModelUnavailable(f"model '{model}' has no ready version among {list(versions)}")

    def _request(
        self, stage: str, inputs: Mapping[str, torch.Tensor], model: str | None = None, version: int = -1
    ) -> Any:
        return self.pb.InferenceRequest(
            model_name=model or stage,
            model_version=version,
            requested_output_names=[t.name for t in self.specs[stage].outputs],
            inputs=[tensor_to_triton(self.pb, name, value) for name, value in inputs.items()],
        )

    def _outputs(self, stage: str, response: Any) -> Tensors:
        if response.has_error():
            message = response.error().message()
            gone = any(text in message.lower() for text in _GONE)
            raise (ModelUnavailable if gone else StageError)(f"stage '{stage}' failed: {message}")
        return {
            t.name: tensor_from_triton(self.pb.get_output_tensor_by_name(response, t.name))
            for t in self.specs[stage].outputs
        }

    def run(
        self, stage: str, inputs: Mapping[str, torch.Tensor], model: str | None = None, version: int = -1
    ) -> Tensors:
        return self._outputs(stage, self._request(stage, inputs, model, version).exec())

    def run_many(self, calls: Sequence[tuple[str, Mapping[str, torch.Tensor]]]) -> list[Tensors]:
        async def gather() -> list[Any]:
            return await asyncio.gather(
                *(self._request(stage, inputs).async_exec() for stage, inputs in calls)
            )

        responses = asyncio.run(gather())
        return [self._outputs(stage, r) for (stage, _), r in zip(calls, responses, strict=True)]


def entry_pipeline(args: dict[str, str], pipeline_class: type) -> tuple[Any, dict[str, Any]]:
    """An entry model's pipeline over BLS stage calls, and its pipeline.json, from its version folder
    (verified against the manifest first, as the stages verify theirs: tokenizers, scheduler config
    and pipeline.json decide what is drawn too)."""
    verify_at_load(args)
    version_dir = Path(args["model_repository"]) / args["model_version"]
    info = json.loads((version_dir / PIPELINE_FILE).read_text())
    return pipeline_class(version_dir, BlsRunner(repository_specs(info)), info=info), info
