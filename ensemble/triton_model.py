"""What the python-backend model.py files share, kept here so it is tested without a server.

Every request gets exactly one response: a bad request becomes an INVALID_ARG error for that request
alone (its batch-mates are unaffected), anything else an INTERNAL error with the cause.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from birdgen.engines import Engine, TensorEngine, engine_kind
from birdgen.manifest import verify_model
from birdgen.schema import RequestError
from birdgen.signing import public_key_from_env
from birdgen.stages import StageSpec, repository_specs

# Triton custom metric (on its /metrics endpoint): seconds spent inside each stage model's engine.
ENGINE_SECONDS = "birdgen_stage_engine_seconds"


def error_response(pb: Any, exc: BaseException) -> Any:
    if isinstance(exc, RequestError):
        return pb.InferenceResponse(error=pb.TritonError(str(exc), pb.TritonError.INVALID_ARG))
    pb.Logger.log_error(f"birdgen: {''.join(traceback.format_exception(exc))}")
    return pb.InferenceResponse(error=pb.TritonError(f"internal error: {exc}", pb.TritonError.INTERNAL))


def bytes_tensor(pb: Any, name: str, value: bytes | str) -> Any:
    data = value.encode() if isinstance(value, str) else value
    return pb.Tensor(name, np.array([data], dtype=np.object_))


def read_bytes(pb: Any, request: Any, name: str) -> bytes:
    tensor = pb.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise RequestError(name, None, "a JSON request string")
    value = tensor.as_numpy().reshape(-1)[0]
    return value if isinstance(value, bytes) else str(value).encode()


def respond_each(pb: Any, requests: Sequence[Any], handle: Callable[[Any], list[Any]]) -> list[Any]:
    """One response per request, in order; `handle` returns the output tensors of one request."""
    responses = []
    for request in requests:
        try:
            responses.append(pb.InferenceResponse(output_tensors=handle(request)))
        except Exception as exc:
            responses.append(error_response(pb, exc))
    return responses


def instance_device(args: dict[str, str]) -> str:
    return f"cuda:{args['model_instance_device_id']}" if args.get("model_instance_kind") == "GPU" else "cpu"


def verify_at_load(args: dict[str, str]) -> dict[str, Any]:
    """The repository's manifest, once this model version's files match it (and the manifest is
    signed when BIRDGEN_MANIFEST_PUBLIC_KEY is set); else IntegrityError, which fails the load.

    Runs in the model's own stub process (Triton's stubs inherit tritonserver's environment), before
    any engine file is opened: family UNets and roll-outs load long after the entrypoint's start check.
    """
    model_dir = Path(args["model_repository"])
    return verify_model(model_dir.parent, model_dir.name, args["model_version"], public_key_from_env())


def load_stage(args: dict[str, str]) -> tuple[StageSpec, Engine]:
    """The stage spec and engine for a stage model, from its config parameters and the repo manifest.

    The version folder is verified against the manifest first (``verify_at_load``): a changed, missing
    or added file refuses the load with one log line naming the model and the files.
    """
    config = json.loads(args["model_config"])
    params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
    model_dir = Path(args["model_repository"])
    manifest = verify_at_load(args)
    spec = repository_specs(manifest)[params["stage"]]
    engine = engine_kind(params["engine"]).load(
        spec, model_dir / args["model_version"], instance_device(args)
    )
    return spec, engine


class TimedEngine(Engine):
    """An engine whose run time is added to a counter.

    Why: Triton's own per-model compute time for a python-backend stage also holds the transfer to and
    from the stub process; the benchmark needs the engine's time alone to tell Triton's overhead
    from compute.
    """

    def __init__(self, engine: Engine, add_seconds: Callable[[float], None]) -> None:
        self.engine = engine
        self.add_seconds = add_seconds

    @contextmanager
    def timing(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add_seconds(time.perf_counter() - start)

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.timing():
            return self.engine.infer(inputs)


class TimedTensorEngine(TimedEngine, TensorEngine):
    """A TimedEngine that keeps the tensor path of the engine it times."""

    engine: TensorEngine

    def infer_tensors(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        with self.timing():
            return self.engine.infer_tensors(inputs)


def timed(engine: Engine, add_seconds: Callable[[float], None]) -> TimedEngine:
    """`engine` with its run time added to a counter, its tensor path kept where it has one."""
    if isinstance(engine, TensorEngine):
        return TimedTensorEngine(engine, add_seconds)
    return TimedEngine(engine, add_seconds)


def engine_seconds_metric(pb: Any, args: dict[str, str]) -> tuple[Any, Any]:
    """The ENGINE_SECONDS counter family and this model instance's counter in it; keep both alive
    together (python_backend wants a family to outlive its metrics).

    One counter per model, version and instance: a metric is removed when its model unloads, and
    a counter shared with another instance or version (a roll-out) would be removed under it.
    """
    family = pb.MetricFamily(
        name=ENGINE_SECONDS,
        description="Seconds spent in the stage's engine (inference only, no Triton transfers)",
        kind=pb.MetricFamily.COUNTER,
    )
    labels = {
        "model": args["model_name"],
        "version": args["model_version"],
        "instance": args["model_instance_name"],
    }
    return family, family.Metric(labels=labels)


def tensor_from_triton(tensor: Any) -> Any:
    """A Triton tensor as a torch tensor on its device, sharing its memory (DLPack)."""
    import torch

    return torch.from_dlpack(tensor.to_dlpack())


def tensor_to_triton(pb: Any, name: str, value: Any) -> Any:
    """A torch tensor as a Triton tensor on its device, sharing its memory (DLPack)."""
    import torch

    return pb.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(value.contiguous()))


def numpy_from_triton(tensor: Any) -> np.ndarray:
    return tensor.as_numpy()


def numpy_to_triton(pb: Any, name: str, value: np.ndarray) -> Any:
    return pb.Tensor(name, np.ascontiguousarray(value))


def run_batched(pb: Any, spec: StageSpec, engine: Engine, requests: Sequence[Any]) -> list[Any]:
    """Run the requests the dynamic batcher merged as one engine call, then split the outputs back.

    A TensorEngine gets Triton's tensors through DLPack where they are (a GPU stage's inputs stay on
    the GPU) and hands its outputs back the same way; any other engine works on numpy.
    """
    if isinstance(engine, TensorEngine):
        import torch

        read, write, merge, run = tensor_from_triton, tensor_to_triton, torch.cat, engine.infer_tensors
    else:
        read, write, merge, run = numpy_from_triton, numpy_to_triton, np.concatenate, engine.infer
    try:
        per_request = [
            {t.name: read(pb.get_input_tensor_by_name(r, t.name)) for t in spec.inputs} for r in requests
        ]
        sizes = [len(inputs[spec.inputs[0].name]) for inputs in per_request]
        merged = {t.name: merge([inputs[t.name] for inputs in per_request]) for t in spec.inputs}
        outputs = run(merged)
    except Exception as exc:
        return [error_response(pb, exc) for _ in requests]
    responses, offset = [], 0
    for size in sizes:
        tensors = [write(pb, t.name, outputs[t.name][offset : offset + size]) for t in spec.outputs]
        responses.append(pb.InferenceResponse(output_tensors=tensors))
        offset += size
    return responses
