"""The client library: retries, deadlines, validation, headers and TLS against a small fake gRPC
server (fast and deterministic), then the asyncio client and the Redis cache against the real Triton."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor, serialize_byte_tensor

from birdgen.client import (
    AsyncBirdClient,
    BirdClient,
    DeadlineExceededError,
    GenerationError,
    InvalidRequestError,
    ResponseCache,
    RetryPolicy,
    ServerUnavailableError,
    cache_key,
)
from birdgen.client.calls import Attempts, Call, animation_call, image_call
from birdgen.input_image import decode_input_image_base64
from birdgen.schema import ImageRequest, RequestError
from birdgen.server import free_port
from tests.conftest import CLIP, ROBIN
from tests.redis_fixture import RedisServer, redis_server  # noqa: F401
from tests.test_svd_request import BEFORE_ENGINES
from tests.triton_stats import requests_served

# tests.test_animation's clip, without importing torch with it.
FAST = RetryPolicy(max_attempts=4, base_s=0.01, max_s=0.05)
# bird_image's and bird_animation's outputs; an empty one is a file the request did not ask for.
FILES = {
    "image": b"fake image",
    "eink_buffer": b"",
    "webp": b"RIFF fake",
    "gif": b"",
    "poster": b"fake poster",
}


class FakeTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Fails its first calls with the given codes, then answers; records each call's gRPC metadata.
    Its metadata output echoes the request it got. With `hold`, an answer waits until `release` is
    set (`serving` sets it on the way out), and `answered` counts the answers sent."""

    def __init__(self, failures: tuple[grpc.StatusCode, ...] = (), hold: bool = False) -> None:
        self.failures = list(failures)
        self.calls: list[dict[str, str]] = []
        self.release = threading.Event()
        self.answered = 0
        self._lock = threading.Lock()
        if not hold:
            self.release.set()

    def _answer(self, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.calls.append(dict(context.invocation_metadata()))
            failure = self.failures.pop(0) if self.failures else None
        if failure is not None:
            context.abort(failure, f"fake {failure.name}")
        self.release.wait(timeout=60)
        with self._lock:
            self.answered += 1

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._answer(context)
        return self._outputs(request, [output.name for output in request.outputs])

    def ModelStreamInfer(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        """As bird_animation_stream: a progress message per step, then the clip."""
        for request in requests:
            self._answer(context)
            for step in (1, 2):
                progress = {"stage": "denoise", "done": step, "total": 2}
                yield service_pb2.ModelStreamInferResponse(
                    infer_response=self._outputs(request, [], progress)
                )
            names = [output.name for output in request.outputs if output.name != "progress"]
            yield service_pb2.ModelStreamInferResponse(infer_response=self._outputs(request, names))

    @staticmethod
    def _outputs(request: Any, names: list[str], progress: dict | None = None) -> Any:
        sent = json.loads(deserialize_bytes_tensor(request.raw_input_contents[0])[0])
        files = {**FILES, "metadata": json.dumps({"format": sent["format"], "request": sent}).encode()}
        if progress is not None:
            names, files["progress"] = ["progress"], json.dumps(progress).encode()
        response = service_pb2.ModelInferResponse(model_name=request.model_name)
        for name in names:
            response.outputs.add(name=name, datatype="BYTES", shape=[1])
            tensor = serialize_byte_tensor(np.array([files[name]], dtype=np.object_))
            response.raw_output_contents.append(tensor.item())
        return response

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._answer(context)
        return service_pb2.ModelMetadataResponse(name=request.name, versions=["3"])

    def RepositoryIndex(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._answer(context)
        model = service_pb2.RepositoryIndexResponse.ModelIndex(name="bird_image", version="3", state="READY")
        return service_pb2.RepositoryIndexResponse(models=[model])

    def RepositoryModelLoad(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._answer(context)
        return service_pb2.RepositoryModelLoadResponse()


@contextmanager
def serving(
    fake: FakeTriton, credentials: grpc.ServerCredentials | None = None, port: int = 0
) -> Iterator[str]:
    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(fake, server)
    address = f"127.0.0.1:{port}"
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        fake.release.set()
        server.stop(grace=None)


@pytest.fixture(params=["sync", "asyncio"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def generate(kind: str, url: str, method: str = "generate_image", *args: Any, **options: Any) -> Any:
    """Call `method` on a fresh BirdClient or AsyncBirdClient; per-call keywords in `options["call"]`."""
    call = options.pop("call", {})
    if kind == "sync":
        with BirdClient(url, **options) as client:
            return getattr(client, method)(*args, **call)

    async def main() -> Any:
        async with AsyncBirdClient(url, **options) as client:
            return await getattr(client, method)(*args, **call)

    return asyncio.run(main())


# -- retries -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_unavailable_and_resource_exhausted_are_retried(kind: str, code: grpc.StatusCode) -> None:
    fake = FakeTriton(failures=(code, code))
    with serving(fake) as url:
        image = generate(kind, url, "generate_image", ImageRequest(**ROBIN), retry=FAST)
    assert len(fake.calls) == 3
    assert image.data == FILES["image"] and image.metadata["request"] == ImageRequest(**ROBIN).to_dict()


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidRequestError),
        (grpc.StatusCode.INTERNAL, GenerationError),
        (grpc.StatusCode.UNAUTHENTICATED, GenerationError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceededError),
    ],
)
def test_other_codes_are_not_retried(kind: str, code: grpc.StatusCode, error: type[Exception]) -> None:
    fake = FakeTriton(failures=(code,))
    with serving(fake) as url, pytest.raises(error):
        generate(kind, url, "generate_image", ROBIN, retry=FAST)
    assert len(fake.calls) == 1


def test_retries_stop_after_max_attempts(kind: str) -> None:
    fake = FakeTriton(failures=(grpc.StatusCode.UNAVAILABLE,) * 10)
    with serving(fake) as url, pytest.raises(ServerUnavailableError, match="UNAVAILABLE") as caught:
        generate(kind, url, "generate_image", ROBIN, retry=RetryPolicy(3, 0.01, 0.05))
    assert len(fake.calls) == 3 and caught.value.url == url


def test_the_client_waits_the_backoff_between_attempts(kind: str) -> None:
    """Without jitter the two pauses are 0.2 and 0.4 s: the call cannot end sooner (sleeps never end
    early; how much later it ends depends on the machine, so that is not asserted)."""
    fake = FakeTriton(failures=(grpc.StatusCode.UNAVAILABLE,) * 2)
    start = time.monotonic()
    with serving(fake) as url:
        generate(kind, url, "generate_image", ROBIN, retry=RetryPolicy(3, 0.2, 1.0, jitter=False))
    assert time.monotonic() - start >= 0.2 + 0.4 and len(fake.calls) == 3


def test_backoff_doubles_up_to_the_cap_and_full_jitter_stays_below_it() -> None:
    policy = RetryPolicy(max_attempts=8, base_s=0.1, max_s=0.5, jitter=False)
    assert [policy.backoff(n) for n in range(5)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    jittered = RetryPolicy(max_attempts=8, base_s=0.1, max_s=0.5)
    assert jittered.backoff(2, uniform=lambda low, high: high) == pytest.approx(0.4)
    waits = [jittered.backoff(3) for _ in range(200)]
    assert all(0 <= w <= 0.5 for w in waits) and len(set(waits)) > 100


@pytest.mark.parametrize(
    ("fields", "wrong"),
    [({"max_attempts": 0}, "max_attempts"), ({"base_s": 3.0}, "base_s"), ({"base_s": -1.0}, "base_s")],
)
def test_a_bad_retry_policy_names_the_field(fields: dict[str, Any], wrong: str) -> None:
    with pytest.raises(ValueError, match=f"'{wrong}'"):
        RetryPolicy(**fields)


def test_retries_never_run_past_the_deadline(kind: str) -> None:
    """The deadline, not the 1000 attempts, ends the call: DeadlineExceededError, whether it fell
    during an attempt or where the next pause would cross it (which depends on the machine's load)."""
    fake = FakeTriton(failures=(grpc.StatusCode.UNAVAILABLE,) * 1000)
    with serving(fake) as url, pytest.raises(DeadlineExceededError, match=r"within 0\.6s") as caught:
        policy = RetryPolicy(max_attempts=1000, base_s=0.05, max_s=0.2)
        generate(kind, url, "generate_image", ROBIN, retry=policy, call={"deadline_s": 0.6})
    assert len(fake.calls) < 1000
    if len(fake.calls) > 1:  # it was retrying: the last failure goes with the error
        assert isinstance(caught.value.last_error, ServerUnavailableError)
        assert "UNAVAILABLE" in str(caught.value)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def unavailable() -> InferenceServerException:
    return InferenceServerException("fake UNAVAILABLE", "StatusCode.UNAVAILABLE")


def test_the_deadline_ends_a_retrying_call_with_the_last_failure_wherever_it_falls() -> None:
    """The promise, on a fake clock: DeadlineExceededError carrying the last retryable failure, when
    the deadline falls in a pause, during an attempt, or before an attempt starts."""
    policy = RetryPolicy(max_attempts=10, base_s=0.2, max_s=0.2, jitter=False)

    clock = FakeClock()  # the pause after the first failure would end past the deadline
    attempts = Attempts(policy, 0.5, "fake:1", clock=clock)
    assert attempts.pause_after(unavailable()) == pytest.approx(0.2)
    clock.now += 0.35  # 0.15 s left, the next pause is 0.2 s
    with pytest.raises(DeadlineExceededError, match=r"last failure: .*UNAVAILABLE") as in_pause:
        attempts.pause_after(unavailable())
    assert isinstance(in_pause.value.last_error, ServerUnavailableError)

    clock = FakeClock()  # the retry started in time and the deadline fell during it
    attempts = Attempts(policy, 0.5, "fake:1", clock=clock)
    attempts.pause_after(unavailable())
    timed_out = InferenceServerException("Deadline Exceeded", "StatusCode.DEADLINE_EXCEEDED")
    with pytest.raises(DeadlineExceededError, match=r"within 0\.5s; last failure") as in_attempt:
        attempts.pause_after(timed_out)
    assert isinstance(in_attempt.value.last_error, ServerUnavailableError)

    clock = FakeClock()  # no time left for the next attempt at all
    attempts = Attempts(policy, 0.5, "fake:1", clock=clock)
    attempts.pause_after(unavailable())
    clock.now += 0.5
    with pytest.raises(DeadlineExceededError) as before_attempt:
        attempts.timeout()
    assert isinstance(before_attempt.value.last_error, ServerUnavailableError)

    # A deadline on the first attempt has no earlier failure; used-up attempts are not a deadline.
    first = Attempts(policy, 0.5, "fake:1", clock=FakeClock())
    with pytest.raises(DeadlineExceededError) as alone:
        first.pause_after(timed_out)
    assert alone.value.last_error is None
    once = Attempts(RetryPolicy(max_attempts=1), 0.5, "fake:1", clock=FakeClock())
    with pytest.raises(ServerUnavailableError):
        once.pause_after(unavailable())


def test_a_server_that_comes_up_during_the_retries_is_reached(kind: str) -> None:
    """A restarting server refuses connections (UNAVAILABLE) until it listens again."""
    fake, port = FakeTriton(), free_port()
    started, finished = threading.Event(), threading.Event()

    def start_late() -> None:
        time.sleep(0.5)
        with serving(fake, port=port):
            started.set()
            finished.wait(timeout=10)

    threading.Thread(target=start_late, daemon=True).start()
    # Budgets far past the server's start, so only the retrying is tested, not the machine's speed.
    policy = RetryPolicy(max_attempts=1000, base_s=0.05, max_s=0.5)
    try:
        image = generate(kind, f"127.0.0.1:{port}", "generate_image", ROBIN, retry=policy, deadline_s=60.0)
    finally:
        finished.set()
    assert started.is_set() and image.data == FILES["image"] and len(fake.calls) == 1


# -- deadlines ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["per call", "client default"])
def test_the_deadline_is_honoured(kind: str, where: str) -> None:
    """The fake holds its answer until the test ends: the client gave up on its own deadline."""
    options: dict[str, Any] = {"call": {"deadline_s": 0.3}} if where == "per call" else {"deadline_s": 0.3}
    fake = FakeTriton(hold=True)
    with serving(fake) as url:
        with pytest.raises(DeadlineExceededError, match=r"0\.3s"):
            generate(kind, url, "generate_image", ROBIN, retry=FAST, **options)
        assert fake.answered == 0
    assert len(fake.calls) <= 1  # a deadline is not retried (0: it fell before the call arrived)


def test_a_stream_hands_over_progress_and_is_retried_before_it_starts(kind: str) -> None:
    fake, messages = FakeTriton(failures=(grpc.StatusCode.UNAVAILABLE,)), []
    with serving(fake) as url:
        clip = generate(
            kind, url, "generate_animation", CLIP, retry=FAST, call={"on_progress": messages.append}
        )
    assert len(fake.calls) == 2 and [m["done"] for m in messages] == [1, 2]
    assert clip.files == {"webp": FILES["webp"], "poster": FILES["poster"]}


def test_a_stream_honours_the_deadline(kind: str) -> None:
    fake = FakeTriton(hold=True)
    with serving(fake) as url:
        with pytest.raises(DeadlineExceededError, match=r"0\.3s"):
            call = {"on_progress": lambda _: None, "deadline_s": 0.3}
            generate(kind, url, "generate_animation", CLIP, retry=FAST, call=call)
        assert fake.answered == 0
    assert len(fake.calls) <= 1


# -- validation, headers, model control, TLS ---------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "fields", "field"),
    [
        ("generate_image", {**ROBIN, "pose": "upside-down"}, "pose"),
        ("generate_image", {**ROBIN, "colour": "red"}, "colour"),
        ("generate_animation", {**CLIP, "fps": 99}, "fps"),
    ],
)
def test_invalid_requests_fail_before_sending(kind: str, method: str, fields: dict, field: str) -> None:
    fake = FakeTriton()
    with serving(fake) as url, pytest.raises(InvalidRequestError, match=f"'{field}'"):
        generate(kind, url, method, fields)
    assert fake.calls == []


def test_animation_files_come_back_without_the_formats_not_made(kind: str) -> None:
    with serving(FakeTriton()) as url:
        clip = generate(kind, url, "generate_animation", {**CLIP, "format": "webp"})
    assert clip.files == {"webp": FILES["webp"], "poster": FILES["poster"]}
    assert clip.metadata["request"]["behaviour"] == "flying"


HEADERS = {"authorization": "Bearer t0ken", "x-tenant": "chirpneighbors"}


def test_headers_go_with_every_call(kind: str) -> None:
    fake = FakeTriton()
    with serving(fake) as url:
        generate(kind, url, "generate_image", ROBIN, headers=HEADERS)
        assert generate(kind, url, "list_models", headers=HEADERS)[0]["state"] == "READY"
        generate(kind, url, "load_model", "bird_image", headers=HEADERS)
    assert len(fake.calls) == 3
    assert all(call.items() >= HEADERS.items() for call in fake.calls)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key: the server's, the client's and the root."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_mutual_tls(kind: str, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    credentials = grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())], root_certificates=cert.read_bytes(), require_client_auth=True
    )
    no_retry = RetryPolicy(max_attempts=1)
    with serving(FakeTriton(), credentials) as url:
        tls = {"ssl": True, "root_certificates": cert, "retry": no_retry, "deadline_s": 5.0}
        image = generate(kind, url, "generate_image", ROBIN, private_key=key, certificate_chain=cert, **tls)
        assert image.data == FILES["image"]
        with pytest.raises(ServerUnavailableError):  # no client certificate
            generate(kind, url, "generate_image", ROBIN, **tls)
        with pytest.raises(ServerUnavailableError):  # plaintext to a TLS port
            generate(kind, url, "generate_image", ROBIN, retry=no_retry, deadline_s=5.0)


# -- control images: encoded and checked here, sent whole, cached by digest ---------------------------
def png_bytes(colour: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    data = BytesIO()
    Image.new("RGB", (40, 30), colour).save(data, "PNG")
    return data.getvalue()


def test_a_control_image_from_a_path_bytes_or_base64_is_sent_base64(kind: str, tmp_path: Path) -> None:
    png = png_bytes()
    (tmp_path / "pose.png").write_bytes(png)
    expected = base64.b64encode(png).decode()
    depth = {"template": "Perched", "scale": 0.5}
    with serving(FakeTriton()) as url:
        for image in (tmp_path / "pose.png", png, bytearray(png), expected):
            control = {"openpose": {"image": image}, "depth": depth}
            sent = generate(kind, url, "generate_image", {**ROBIN, "control": control}).metadata["request"]
            assert sent["control"] == {
                "openpose": {"image": expected, "scale": 0.8, "start": 0.0, "end": 1.0},
                "depth": {"template": "perched", "scale": 0.5, "start": 0.0, "end": 1.0},
            }
        as_keywords = generate(
            kind, url, "generate_image", call={**ROBIN, "control": {"openpose": {"image": png}}}
        )
    assert as_keywords.metadata["request"]["control"]["openpose"]["image"] == expected


# Pictures a client may hand over that no server would take: bytes that are no image, a path that
# does not exist, a PNG cut short.
BAD_CLIENT_IMAGES = pytest.mark.parametrize(
    "image",
    [b"not a picture at all", "missing.png", png_bytes()[:60]],
    ids=["not-an-image", "missing-file", "truncated"],
)


@BAD_CLIENT_IMAGES
def test_a_bad_control_image_fails_before_sending_as_the_server_would(
    kind: str, tmp_path: Path, image: bytes | str
) -> None:
    fake = FakeTriton()
    source: Path | bytes = tmp_path / image if isinstance(image, str) else image
    with (
        serving(fake) as url,
        pytest.raises(InvalidRequestError, match=r"'control\.openpose\.image'") as error,
    ):
        generate(kind, url, "generate_image", {**ROBIN, "control": {"openpose": {"image": source}}})
    assert fake.calls == []
    if isinstance(image, bytes):  # the entry model's check, word for word
        with pytest.raises(RequestError) as server_side:
            text = base64.b64encode(image).decode()
            decode_input_image_base64(text, "control.openpose.image", ROBIN["width"], ROBIN["height"])
        assert str(error.value) == str(server_side.value)
    else:
        assert "missing.png" in str(error.value)


def sent_text(call: Call) -> bytes:
    (tensor,) = call.inputs()
    return deserialize_bytes_tensor(tensor._get_content())[0]


def test_requests_without_a_control_image_send_the_bytes_they_always_did() -> None:
    """Triton's response cache keys on the input's bytes: the canonical JSON, as before control."""
    eink = {**ROBIN, "format": "eink", "eink_panel": "400x300"}
    templated = {**ROBIN, "control": {"depth": {"template": "flying"}}}
    for call in (image_call(ROBIN, {}), image_call(eink, {}), image_call(templated, {})):
        assert sent_text(call) == call.request.canonical_json().encode()
    for stream in (False, True):
        call = animation_call(CLIP, {}, stream=stream)
        assert sent_text(call) == call.request.canonical_json().encode()
    imaged = image_call({**ROBIN, "control": {"depth": {"image": png_bytes()}}}, {})
    assert json.loads(sent_text(imaged)) == imaged.request.to_dict()  # the image itself, not its digest
    assert "image_sha256" in imaged.request.canonical_json()


def test_the_cache_key_counts_a_control_image_by_its_bytes(tmp_path: Path) -> None:
    png = png_bytes()
    (tmp_path / "pose.png").write_bytes(png)

    def key(image: object) -> str:
        return cache_key(
            image_call({**ROBIN, "control": {"openpose": {"image": image}}}, {}).request, "bird_image/1"
        )

    text = base64.b64encode(png).decode()
    assert key(tmp_path / "pose.png") == key(png) == key(text)
    assert key(png_bytes((10, 200, 10))) != key(png)
    # Without control the key is the one it always was (the dump of every field).
    plain = ImageRequest(**ROBIN)
    material = {"format": "png", "model_version": "bird_image/1", "request": plain.to_dict()}
    digest = hashlib.sha256(json.dumps(material, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert cache_key(plain, "bird_image/1").endswith(digest)


# -- svd animations: the picture to animate, encoded and checked here, sent whole, cached by digest ----
SVD_CLIP = {k: v for k, v in CLIP.items() if k != "behaviour"} | {"engine": "svd", "steps": 2}


def test_an_svd_image_from_a_path_bytes_or_base64_is_sent_base64(kind: str, tmp_path: Path) -> None:
    png = png_bytes()
    (tmp_path / "robin.png").write_bytes(png)
    expected = base64.b64encode(png).decode()
    progress: list[dict] = []
    with serving(FakeTriton()) as url:
        for image in (tmp_path / "robin.png", png, bytearray(png), memoryview(png), expected):
            sent = generate(kind, url, "generate_animation", {**SVD_CLIP, "image": image}).metadata["request"]
            assert (sent["engine"], sent["image"], sent["steps"]) == ("svd", expected, 2)
        # As keywords, and streamed (bird_animation_stream): the same picture, the progress handed over.
        fields = {**SVD_CLIP, "image": tmp_path / "robin.png", "on_progress": progress.append}
        streamed = generate(kind, url, "generate_animation", call=fields)
    assert streamed.metadata["request"]["image"] == expected
    assert [p["done"] for p in progress] == [1, 2]


def test_an_svd_request_without_an_image_sends_its_canonical_json() -> None:
    for stream in (False, True):
        call = animation_call({**SVD_CLIP, "pose": "Singing"}, {}, stream=stream)
        assert not call.has_images() and call.request.still_request() is not None
        assert sent_text(call) == call.request.canonical_json().encode()


@BAD_CLIENT_IMAGES
def test_a_bad_svd_image_fails_before_sending_as_the_server_would(
    kind: str, tmp_path: Path, image: bytes | str
) -> None:
    fake = FakeTriton()
    source: Path | bytes = tmp_path / image if isinstance(image, str) else image
    with serving(fake) as url:
        for options in ({}, {"on_progress": print}):
            with pytest.raises(InvalidRequestError, match=r"^invalid 'image'") as error:
                generate(kind, url, "generate_animation", call={**SVD_CLIP, "image": source, **options})
            if isinstance(image, bytes):  # the entry model's check (at the picture's own size), word for word
                with pytest.raises(RequestError) as server_side:
                    decode_input_image_base64(base64.b64encode(image).decode(), "image")
                assert str(error.value) == str(server_side.value)
            else:
                assert "missing.png (No such file" in str(error.value)
    assert fake.calls == []


def test_an_image_on_an_animatediff_request_is_refused_naming_it() -> None:
    with pytest.raises(InvalidRequestError, match=r"^invalid 'image': .*null with engine animatediff"):
        animation_call({**CLIP, "image": png_bytes()}, {}, stream=False)


def test_animatediff_requests_send_the_bytes_they_sent_before_engines() -> None:
    """Triton's response cache keys on the input's bytes: an AnimateDiff request's are still the
    canonical JSON recorded before engines existed, spelt out or not, streamed or not."""
    for fields, before, *_ in BEFORE_ENGINES:
        for extra in ({}, {"engine": "AnimateDiff"}, {"engine": None, "image": None, "pose": None}):
            for stream in (False, True):
                call = animation_call({**fields, **extra}, {}, stream=stream)
                assert not call.has_images()
                assert sent_text(call) == before.encode()


def test_an_svd_image_is_sent_whole_and_keyed_by_its_digest(tmp_path: Path) -> None:
    png = png_bytes()
    (tmp_path / "robin.png").write_bytes(png)
    text = base64.b64encode(png).decode()
    call = animation_call({**SVD_CLIP, "image": png}, {}, stream=True)
    assert call.has_images() and call.cache_model == "bird_animation"
    assert (
        json.loads(sent_text(call)) == call.request.to_dict() and json.loads(sent_text(call))["image"] == text
    )
    assert json.loads(call.request.canonical_json())["image"] == {
        "image_sha256": hashlib.sha256(png).hexdigest(),
        "image_bytes": len(png),
    }

    def key(image: object) -> str:
        request = animation_call({**SVD_CLIP, "image": image}, {}, stream=False).request
        return cache_key(request, "bird_animation/1")

    assert key(tmp_path / "robin.png") == key(png) == key(text) == cache_key(call.request, "bird_animation/1")
    assert key(png_bytes((10, 200, 10))) != key(png)
    assert key(None) != key(png)  # the drawn still is another clip


# -- against the real Triton -------------------------------------------------------------------------
@pytest.mark.triton
def test_triton_invalid_argument_is_not_retried(server) -> None:
    # Valid for the client's schema (120 frames), too long for this deployment's cap (96, conftest).
    too_long = {**CLIP, "duration_seconds": 5, "fps": 24}
    before = requests_served(server.grpc_url, "bird_animation")
    with (
        BirdClient(server.grpc_url, retry=RetryPolicy(max_attempts=5, base_s=0.01)) as client,
        pytest.raises(InvalidRequestError, match="at most 96 frames"),
    ):
        client.generate_animation(too_long)
    assert requests_served(server.grpc_url, "bird_animation", at_least=before + 1) == before + 1


@pytest.mark.triton
def test_async_client_serves_the_same_image_and_models_as_the_sync_one(server) -> None:
    request = {**ROBIN, "seed": 2024}

    async def main() -> tuple[Any, list[dict[str, str]]]:
        async with AsyncBirdClient(server.grpc_url, headers=HEADERS) as client:
            return await client.generate_image(request), await client.list_models()

    served, models = asyncio.run(main())
    with BirdClient(server.grpc_url) as client:
        assert served == client.generate_image(request)
        assert models == client.list_models()
    assert served.image.size == (256, 256) and served.metadata["seed"] == 2024


@pytest.mark.triton
def test_async_animation_streams_progress_then_the_same_clip(server) -> None:
    request = {**CLIP, "steps": 2, "format": "webp"}
    messages: list[dict] = []

    async def main() -> tuple[Any, Any]:
        async with AsyncBirdClient(server.grpc_url) as client:
            streamed = await client.generate_animation(request, on_progress=messages.append)
            return streamed, await client.generate_animation(request)

    streamed, plain = asyncio.run(main())
    assert [(m["done"], m["total"]) for m in messages if m["stage"] == "denoise"] == [(1, 2), (2, 2)]
    assert streamed.files == plain.files and set(plain.files) == {"webp", "poster"}
    timings = ("timings_ms",)  # the only metadata that varies run to run
    assert {k: v for k, v in streamed.metadata.items() if k not in timings} == {
        k: v for k, v in plain.metadata.items() if k not in timings
    }


WHAT = ("misses", "hits", "errors")


@pytest.mark.triton
def test_a_repeat_comes_from_redis_and_a_redis_outage_does_not_fail_requests(
    server,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    registry = CollectorRegistry()
    # A socket timeout no loaded machine reaches: this test is about the repeat, not slow Redis (a
    # 0.25 s timeout on a busy 2-core machine made the repeat a miss; test_cache covers timeouts).
    cache = ResponseCache(redis_server.url, registry=registry, socket_timeout_s=10.0)
    request = {**ROBIN, "seed": 777}
    before = requests_served(server.grpc_url, "bird_image")
    with BirdClient(server.grpc_url, cache=cache) as client:
        first = client.generate_image(request)
        served = requests_served(server.grpc_url, "bird_image", at_least=before + 1)
        assert served == before + 1
        again = client.generate_image(request)
        assert [registry.get_sample_value(f"birdgen_cache_{w}_total", {"kind": "image"}) for w in WHAT] == [
            1,
            1,
            None,
        ]
        assert requests_served(server.grpc_url, "bird_image") == served  # Triton was not asked
        assert again == first
        assert cache._redis.exists(cache_key(ImageRequest(**request), "bird_image/1"))
        redis_server.kill()
        assert client.generate_image(request) == first
    cache.close()
    counts = [registry.get_sample_value(f"birdgen_cache_{w}_total", {"kind": "image"}) for w in WHAT]
    assert counts == [1, 1, 1]
    assert requests_served(server.grpc_url, "bird_image", at_least=served + 1) == served + 1


@pytest.mark.triton
def test_concurrent_identical_async_requests_generate_once(server, redis_server: RedisServer) -> None:  # noqa: F811
    registry = CollectorRegistry()
    cache = ResponseCache(redis_server.url, registry=registry)
    request = {**ROBIN, "seed": 4242}

    async def main() -> list[Any]:
        async with AsyncBirdClient(server.grpc_url, cache=cache) as client:
            results = await asyncio.gather(*(client.generate_image(request) for _ in range(4)))
        await cache.aclose()
        return results

    before = requests_served(server.grpc_url, "bird_image")
    results = asyncio.run(main())
    cache.close()
    assert all(r == results[0] for r in results)
    assert requests_served(server.grpc_url, "bird_image", at_least=before + 1) == before + 1
    assert registry.get_sample_value("birdgen_cache_misses_total", {"kind": "image"}) == 1
    assert registry.get_sample_value("birdgen_cache_hits_total", {"kind": "image"}) == 3
