"""config.pbtxt generation from the stage specs, through Triton's own ModelConfig protobuf.

Building the message (rather than formatting text) makes every generated config valid against
Triton's schema by construction; text_format gives the readable file an operator edits.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from birdgen.contracts import ENTRY_INPUT, IMAGE_OUTPUTS
from birdgen.model_folder import ModelDims
from birdgen.schema import LIMITS, ServingLimits
from birdgen.stages import StageSpec, TensorSpec, image_sizes


def _add_tensor(field: Any, tensor: TensorSpec) -> None:
    field.add(
        name=tensor.name, data_type=mc.DataType.Value(f"TYPE_{tensor.dtype}"), dims=tensor.triton_dims()
    )


def _set_parameters(config: mc.ModelConfig, parameters: dict[str, str]) -> None:
    for key, value in parameters.items():
        config.parameters[key].string_value = str(value)


def stage_config(
    spec: StageSpec, dims: ModelDims, hosting: dict[str, Any], instances: int = 1
) -> mc.ModelConfig:
    """A batched engine stage: dynamic batching as the spec asks, warmed up at the common size."""
    config = mc.ModelConfig(name=spec.name, max_batch_size=spec.max_batch_size)
    if "backend" in hosting:
        config.backend = hosting["backend"]
    if "platform" in hosting:
        config.platform = hosting["platform"]
    _set_parameters(config, hosting.get("parameters", {}))
    for tensor in spec.inputs:
        _add_tensor(config.input, tensor)
    for tensor in spec.outputs:
        _add_tensor(config.output, tensor)
    config.dynamic_batching.preferred_batch_size.extend(spec.preferred_batch_sizes)
    config.dynamic_batching.max_queue_delay_microseconds = spec.max_queue_delay_us
    kind = mc.ModelInstanceGroup.KIND_GPU if hosting.get("gpu") else mc.ModelInstanceGroup.KIND_CPU
    # A TensorRT plan with several optimization profiles: Triton picks, per request, one that fits.
    config.instance_group.add(count=instances, kind=kind, profile=hosting.get("profiles", []))
    # The text encoders see the same token ids for every image of a species: Triton's response cache
    # (the server's --cache-config) answers repeats, also for BLS calls. Measured on the 2-core machine
    # (mini, 256², 1 step, served): 162 -> 143 ms a request. Only for CPU-hosted stages: Triton's
    # cache holds CPU buffers, and a GPU stage's outputs stay on the GPU (DLPack).
    config.response_cache.enable = spec.cacheable and not hosting.get("gpu")
    # The first request would otherwise pay for allocations and kernel selection at 512 px.
    sizes = image_sizes(dims, 512 // dims.vae_scale_factor, 512 // dims.vae_scale_factor)
    warmup = config.model_warmup.add(name=f"{spec.name}_512px", batch_size=1)
    for tensor in spec.inputs:
        entry = warmup.inputs[tensor.name]
        entry.data_type = mc.DataType.Value(f"TYPE_{tensor.dtype}")
        entry.dims.extend(tensor.concrete(sizes))
        entry.zero_data = True
    return config


def entry_config(
    name: str,
    instances: int,
    outputs: tuple[str, ...] = IMAGE_OUTPUTS,
    decoupled: bool = False,
    serving: ServingLimits = LIMITS.serving,
) -> mc.ModelConfig:
    """A public entry model: one JSON request in, encoded files and metadata out.

    Each instance runs one request's denoising loop; several instances run concurrently so their UNet
    calls meet in the UNet's dynamic batcher. Same request -> same bytes, so Triton's response cache
    answers repeats in-server. Its queue is bounded by `serving` (limits.yaml; see bound_queue).
    """
    config = mc.ModelConfig(name=name, backend="python", max_batch_size=0)
    config.input.add(name=ENTRY_INPUT, data_type=mc.TYPE_STRING, dims=[1])
    for output in outputs:
        config.output.add(name=output, data_type=mc.TYPE_STRING, dims=[1])
    config.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_CPU)
    # A decoupled model streams several responses per request (progress, then the result); Triton's
    # response cache does not apply to those.
    config.model_transaction_policy.decoupled = decoupled
    config.response_cache.enable = not decoupled
    bound_queue(config, serving)
    return config


def bound_queue(config: mc.ModelConfig, serving: ServingLimits) -> None:
    """At most `serving.max_queue_size` requests wait for a free instance, none longer than
    `serving.queue_timeout_s`; past either, Triton refuses at once with UNAVAILABLE ("Exceeds maximum
    queue size" / "Request timeout expired"), which the client maps to ServerOverloadedError.

    Why a dynamic batcher on a model with max_batch_size 0: Triton's queue policy lives only there,
    and Triton 2.51 accepts it without batching (each execute still gets one request; measured). A
    client may shorten its own request's timeout (allow_timeout_override), never lengthen it.
    Triton's response cache is looked up before the queue, so repeats are answered even when it is full.
    Cost, measured on 2.51: a queue policy turns off the batcher's prefetching, and a request queued
    behind busy instances now and then waits up to ~0.5 s more for its hand-off (docs/reliability.md).
    Stages get no bound: only the entry instances call them, one call per stage at a time, so a
    stage's queue is never deeper than the entry instances; a rejection mid-loop would waste the steps
    already run, and the prefetching they would lose is what fills their batches.
    """
    policy = config.dynamic_batching.default_queue_policy
    policy.max_queue_size = serving.max_queue_size
    policy.default_timeout_microseconds = round(serving.queue_timeout_s * 1_000_000)
    policy.timeout_action = mc.ModelQueuePolicy.REJECT
    policy.allow_timeout_override = True


def to_pbtxt(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)


def parse_pbtxt(text: str) -> mc.ModelConfig:
    """Parse a config.pbtxt with Triton's schema (raises on unknown fields or bad values)."""
    return text_format.Parse(text, mc.ModelConfig())
