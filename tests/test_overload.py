"""Limits from limits.yaml everywhere, and overload: an entry model's bounded queue refuses at once
with the documented code, the client maps it to ServerOverloadedError and backs off, the gateway
answers 503 with Retry-After, accepted requests finish and the server keeps serving.

The server tests run a copy of the session repository exported with one bird_image instance and a
queue of two (docs/reliability.md, "Overload"); the rest needs no server."""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import shutil
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import httpx
import pytest
import tritonclient.grpc.aio as grpcaio
from PIL import Image
from pydantic import ValidationError
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from birdgen.client import (
    AsyncBirdClient,
    BirdClient,
    CacheEntry,
    GeneratedImage,
    RetryPolicy,
    ServerOverloadedError,
    ServerUnavailableError,
)
from birdgen.client.calls import Attempts, image_call, map_error
from birdgen.client.errors import DeadlineExceededError, GenerationError
from birdgen.contracts import (
    ANIMATION_MODEL,
    ANIMATION_OUTPUTS,
    ANIMATION_STREAM_MODEL,
    IMAGE_MODEL,
    IMAGE_OUTPUTS,
    STREAM_OUTPUTS,
)
from birdgen.gateway.app import error_status, retry_after_s
from birdgen.gateway.settings import GatewaySettings
from birdgen.schema import LIMITS, ImageRequest
from birdgen.server import TritonServer
from birdgen.triton_config import entry_config
from tests.conftest import EXPORT_OPTIONS, IMAGE_MODELS, ROBIN
from tests.gateway_process import running_gateway
from tests.test_client import FakeClock

QUEUE_FULL = "[request id: <id_unknown>] Exceeds maximum queue size"  # Triton 2.51's words, measured
QUEUE_TIMEOUT = "Request timeout expired"
# One bird_image instance and two places in its queue: three requests in the server at most.
TINY_QUEUE = LIMITS.serving.model_copy(update={"max_queue_size": 2})


def triton_error(message: str, status: str = "UNAVAILABLE") -> InferenceServerException:
    return InferenceServerException(message, f"StatusCode.{status}")


# -- limits from limits.yaml ---------------------------------------------------------------------------
def test_entry_queues_are_bounded_by_limits_yaml_and_stages_are_not() -> None:
    entries = ((IMAGE_MODEL, IMAGE_OUTPUTS), (ANIMATION_MODEL, ANIMATION_OUTPUTS))
    for name, outputs in (*entries, (ANIMATION_STREAM_MODEL, STREAM_OUTPUTS)):
        config = entry_config(name, 2, outputs, decoupled=name == ANIMATION_STREAM_MODEL)
        policy = config.dynamic_batching.default_queue_policy
        assert policy.max_queue_size == LIMITS.serving.max_queue_size == 64
        assert policy.default_timeout_microseconds == LIMITS.serving.queue_timeout_s * 1_000_000
        assert policy.timeout_action == mc.ModelQueuePolicy.REJECT and policy.allow_timeout_override
        # A queue, not a batcher: max_batch_size 0 still hands each execute one request.
        assert config.max_batch_size == 0 and not config.dynamic_batching.preferred_batch_size
    tiny = entry_config(IMAGE_MODEL, 1, serving=TINY_QUEUE)
    assert tiny.dynamic_batching.default_queue_policy.max_queue_size == 2


def test_the_gateway_takes_its_limits_from_limits_yaml_and_may_only_lower_them() -> None:
    defaults = GatewaySettings()
    assert defaults.max_batch_items == LIMITS.batch.max_items == 100
    assert defaults.max_body_bytes == LIMITS.max_body_bytes <= LIMITS.serving.max_request_bytes
    lowered = GatewaySettings.from_env({"BIRDGEN_MAX_BATCH_ITEMS": "10", "BIRDGEN_MAX_BODY_BYTES": "65536"})
    assert (lowered.max_batch_items, lowered.max_body_bytes) == (10, 65536)
    for name, value in (("max_batch_items", 101), ("max_body_bytes", LIMITS.max_body_bytes + 1)):
        with pytest.raises(ValidationError, match=name):
            GatewaySettings(**{name: value})


def test_the_body_bound_holds_a_full_batch_of_the_largest_valid_requests() -> None:
    """The derivation in schema.Limits.max_body_bytes: the longest text every field allows, written
    as json.dumps writes an emoji by default (12 bytes a character), fits one request's share."""
    bird, n = "\U0001f426", LIMITS.max_length
    largest = ImageRequest(
        species=bird * n.name,
        scientific_name=bird * n.name,
        species_id="a" * n.species_id,
        prompt=bird * n.prompt,
        negative_prompt=bird * n.prompt,
        format="eink",
        eink_panel="296x128",
    )
    body = json.dumps({"items": [largest.to_dict()] * LIMITS.batch.max_items}, indent=1)
    assert len(body) <= LIMITS.max_body_bytes == 100 * LIMITS.max_request_json_bytes


# -- the client: a distinct error, a longer backoff, a suggested retry-after -----------------------------
@pytest.mark.parametrize(
    ("message", "status"),
    [(QUEUE_FULL, "UNAVAILABLE"), (QUEUE_TIMEOUT, "UNAVAILABLE"), ("fake quota", "RESOURCE_EXHAUSTED")],
)
def test_overload_refusals_map_to_server_overloaded_error(message: str, status: str) -> None:
    error = map_error(triton_error(message, status), "triton:8001", 120, retry_after_s=0.5)
    assert isinstance(error, ServerOverloadedError) and isinstance(error, ServerUnavailableError)
    assert error.retry_after_s == 0.5 and f"is overloaded: {message} ({status})" in str(error)
    down = map_error(triton_error("failed to connect to all addresses"), "triton:8001", 120)
    assert type(down) is ServerUnavailableError and "is unavailable" in str(down)


def test_an_overloaded_server_is_retried_with_longer_pauses_and_a_retry_after() -> None:
    """Without jitter the overload pauses are the caps, 0.5, 1 and 2 s (a plain UNAVAILABLE's are
    0.1, 0.2 and 0.4 s); the last refusal's error suggests the next cap, 2 s."""
    policy = RetryPolicy(jitter=False)
    overloaded = Attempts(policy, 120, "triton:8001", clock=FakeClock())
    pauses = [overloaded.pause_after(triton_error(QUEUE_FULL)) for _ in range(3)]
    assert pauses == pytest.approx([0.5, 1.0, 2.0])
    with pytest.raises(ServerOverloadedError) as caught:
        overloaded.pause_after(triton_error(QUEUE_FULL))
    assert caught.value.retry_after_s == pytest.approx(2.0)
    down = Attempts(policy, 120, "triton:8001", clock=FakeClock())
    assert [down.pause_after(triton_error("connection refused")) for _ in range(3)] == pytest.approx(
        [0.1, 0.2, 0.4]
    )
    # With jitter each client draws its own pause below the cap, so refused clients spread out.
    jittered = RetryPolicy()
    waits = [jittered.backoff(1, overloaded=True) for _ in range(200)]
    assert all(0 <= w <= 1.0 for w in waits) and len(set(waits)) > 100
    # The deadline still ends the call: a pause that would cross it is not waited.
    short = Attempts(policy, 0.8, "triton:8001", clock=FakeClock())
    short.pause_after(triton_error(QUEUE_FULL))
    with pytest.raises(DeadlineExceededError, match="is overloaded"):
        short.pause_after(triton_error(QUEUE_FULL))


def test_the_gateway_answers_overload_with_503_and_the_clients_retry_after() -> None:
    overloaded = ServerOverloadedError("triton:8001", QUEUE_FULL, retry_after_s=2.0)
    assert (error_status(overloaded), retry_after_s(overloaded)) == (503, 2)
    assert retry_after_s(ServerOverloadedError("triton:8001", QUEUE_FULL, retry_after_s=0.01)) == 1
    assert retry_after_s(ServerUnavailableError("triton:8001", "down")) == 5
    assert retry_after_s(GenerationError("INTERNAL: boom")) is None


# -- against a real server with a queue of two ----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_queue_server(
    repository: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    """The session repository re-exported (stages up to date, skipped) with one bird_image instance
    and TINY_QUEUE, serving the image models only."""
    from birdgen.export.exporter import export_repository

    repo = tmp_path_factory.mktemp("tiny-queue") / "model_repository"
    shutil.copytree(repository, repo)
    options = {**EXPORT_OPTIONS, "entry_instances": 1, "serving": TINY_QUEUE}
    export_repository(tiny_model, repo, **options, progress=lambda _: None)
    with TritonServer(repo, model_control="explicit", load_models=IMAGE_MODELS) as server:
        yield server


SEEDS = itertools.count(secrets.randbits(40) << 20)  # never answered from Triton's response cache


async def burst(url: str, count: int) -> list[tuple[float, int, object]]:
    """`count` requests sent at once on one channel, not retried: (when each ended, its seed, its
    outcome)."""
    async with AsyncBirdClient(url, retry=RetryPolicy(max_attempts=1)) as client:

        async def one(seed: int) -> tuple[float, int, object]:
            try:
                outcome: object = await client.generate_image({**ROBIN, "seed": seed})
            except ServerOverloadedError as exc:
                outcome = exc
            return time.monotonic(), seed, outcome

        return await asyncio.gather(*(one(next(SEEDS)) for _ in range(count)))


def served_later(url: str, seeds: list[int]) -> None:
    """Refused requests sent again are served: Triton's response cache kept no answer for them
    (it keeps a failed request's, see Faults), and the server serves normally after the overload."""
    with BirdClient(url) as client:
        for seed in seeds:
            assert client.generate_image({**ROBIN, "seed": seed}).image.size == (256, 256)


@pytest.mark.triton
def test_past_the_queue_bound_requests_are_refused_at_once_and_the_accepted_ones_finish(
    tiny_queue_server: TritonServer,
) -> None:
    outcomes = asyncio.run(burst(tiny_queue_server.grpc_url, 12))
    done = [(t, o) for t, _, o in outcomes if isinstance(o, GeneratedImage)]
    refused = [(t, o) for t, _, o in outcomes if isinstance(o, ServerOverloadedError)]
    assert len(done) + len(refused) == 12 and done and refused  # nothing else happened
    assert all(o.detail == f"{QUEUE_FULL} (UNAVAILABLE)" for _, o in refused)
    assert all(Image.open(BytesIO(o.data)).size == (256, 256) for _, o in done)
    # Refused on arrival: every refusal came back before the last accepted request, which had to
    # wait for the others in the queue, was done.
    assert max(t for t, _ in refused) < max(t for t, _ in done)
    refused_seeds = [seed for _, seed, outcome in outcomes if isinstance(outcome, ServerOverloadedError)]
    served_later(tiny_queue_server.grpc_url, refused_seeds[:2])


@pytest.mark.triton
def test_a_request_queued_past_its_timeout_is_refused_with_the_documented_code(
    tiny_queue_server: TritonServer,
) -> None:
    """allow_timeout_override lets a request shorten its own queue timeout (limits.yaml's is 30 s):
    one ordinary request and two that may wait 1 ms, sent together; those queued behind another
    request are refused when the instance frees, UNAVAILABLE "Request timeout expired"."""

    async def main() -> list[tuple[int, object]]:
        client = grpcaio.InferenceServerClient(tiny_queue_server.grpc_url)

        async def infer(timeout_us: int | None) -> tuple[int, object]:
            seed = next(SEEDS)
            call = image_call(None, {**ROBIN, "seed": seed})
            options = {"timeout": timeout_us} if timeout_us else {}
            try:
                result = await client.infer(IMAGE_MODEL, call.inputs(), outputs=call.requested(), **options)
                return seed, call.entry(result)
            except InferenceServerException as exc:
                return seed, map_error(exc, tiny_queue_server.grpc_url, 120)

        try:
            return await asyncio.gather(infer(None), infer(1000), infer(1000))
        finally:
            await client.close()

    # A queue still holding an earlier test's requests refuses ours as full instead: that is the
    # bound of the test above, not this one's subject, so such a round is sent again (at most 5).
    for _ in range(5):
        outcomes = asyncio.run(main())
        refused = {seed: o for seed, o in outcomes if isinstance(o, ServerOverloadedError)}
        if not any("queue size" in o.detail for o in refused.values()):
            break
        time.sleep(1)
    assert refused and {o.detail for o in refused.values()} == {f"{QUEUE_TIMEOUT} (UNAVAILABLE)"}
    assert isinstance(outcomes[0][1], CacheEntry)  # the patient one was served
    served_later(tiny_queue_server.grpc_url, list(refused))


@pytest.mark.triton
def test_the_gateway_answers_503_with_retry_after_quickly_when_triton_is_overloaded(
    tiny_queue_server: TritonServer, redis_url: str, tmp_path: Path
) -> None:
    """48 images at 512 px through a gateway on the queue of two: its client retries each refusal
    (pauses below 0.5, 1 and 2 s), then answers 503 with Retry-After, not the 504 of its 120 s
    deadline; the accepted ones are 200. The rate limit (429) is set out of the way."""
    with running_gateway(
        tiny_queue_server.grpc_url, redis_url, tmp_path, rate_limit_per_minute=100_000
    ) as gateway:

        async def main() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=gateway.url, timeout=120) as http:
                body = {"species": "American Robin", "resolution": "medium"}
                posts = (
                    http.post("/api/v1/generate/image", json=body | {"seed": next(SEEDS)}) for _ in range(48)
                )
                return await asyncio.gather(*posts)

        answers = asyncio.run(main())
        statuses = [a.status_code for a in answers]
        assert set(statuses) == {200, 503}, statuses
        for answer in answers:
            if answer.status_code == 503:
                assert answer.json()["type"] == "ServerOverloadedError"
                assert int(answer.headers["retry-after"]) == 2  # the client's last cap, rounded up
        with gateway.client() as http:  # and it serves normally after
            assert http.get("/health").status_code == 200
            again = http.post("/api/v1/generate/image", json={"species": "American Robin", "seed": 1})
            assert again.status_code == 200 and again.headers["content-type"] == "image/png"
