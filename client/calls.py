"""What the sync and asyncio clients share: options, calls, results, retry decisions, error mapping.

Transport-free on purpose: `BirdClient` and `AsyncBirdClient` differ only in how they wait (a blocking
gRPC call vs. an awaited one), never in what a request, a retry or an error means.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from io import BytesIO
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image
from tritonclient.grpc import (
    MAX_GRPC_MESSAGE_SIZE,
    InferInput,
    InferRequestedOutput,
    InferResult,
    KeepAliveOptions,
)
from tritonclient.utils import InferenceServerException

from birdgen.client.cache import CacheEntry, Derivation, ResponseCache
from birdgen.client.control_images import (
    check_animation_image,
    check_control_image,
    encode_animation_image,
    encode_control_images,
)
from birdgen.client.errors import (
    AdminKeyRequiredError,
    BirdgenError,
    DeadlineExceededError,
    GenerationError,
    InvalidRequestError,
    ServerOverloadedError,
    ServerUnavailableError,
)
from birdgen.contracts import (
    ANIMATION_MODEL,
    ANIMATION_OUTPUTS,
    ANIMATION_STREAM_MODEL,
    CONTROLLED_UNET,
    EINK_BUFFER,
    ENTRY_INPUT,
    GIF,
    IMAGE,
    IMAGE_MODEL,
    IMAGE_OUTPUTS,
    METADATA,
    MOTION_UNET,
    POSTER,
    PROGRESS,
    WEBP,
    family_of,
)
from birdgen.contracts import family_model as family_model_name
from birdgen.control import ControlSettings
from birdgen.eink import render_request
from birdgen.schema import (
    EINK,
    AnimationRequest,
    ImageRequest,
    RequestError,
    parse_animation_request,
    parse_image_request,
)

# gRPC codes that say "not now" rather than "not this": the same request may succeed on a retry.
RETRYABLE = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
# What Triton says, with UNAVAILABLE, when a model's bounded queue refuses a request
# (birdgen.triton_config.bound_queue): full at arrival, or waited past the queue timeout.
OVERLOADED = ("Exceeds maximum queue size", "Request timeout expired")
# How long a looked-up entry-model version keys the cache before it is asked for again, so a roll-out
# made by another process reaches this client's cache keys within this many seconds.
MODEL_VERSION_TTL_S = 10.0
RequestT = TypeVar("RequestT", ImageRequest, AnimationRequest)
OnProgress = Callable[[dict[str, Any]], None]  # takes each streamed {"stage", "done", "total"}


@dataclass(frozen=True)
class GeneratedImage:
    """An encoded image with its generation metadata (also embedded in the file)."""

    data: bytes
    format: str
    metadata: dict[str, Any]

    @cached_property
    def image(self) -> Image.Image:
        image = Image.open(BytesIO(self.data))
        image.load()
        return image

    def save(self, path: str | Path) -> Path:
        return _write(path, self.data)


@dataclass(frozen=True)
class GeneratedEink(GeneratedImage):
    """A format=eink result: `data` is the PNG preview, `buffer` what the panel's driver writes.

    The buffer is `height` rows of `layout["row_bytes"]` bytes, the leftmost pixel in the most
    significant bits (docs/eink.md); `metadata["eink"]` has the panel, palette, dither, fit, crop and
    that layout.
    """

    buffer: bytes
    width: int
    height: int
    bits_per_pixel: int
    panel: str
    palette: str

    @property
    def layout(self) -> dict[str, Any]:
        return self.metadata["eink"]["layout"]

    def save_buffer(self, path: str | Path) -> Path:
        return _write(path, self.buffer)


def _write(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@dataclass(frozen=True)
class GeneratedAnimation:
    """An animation as animated WebP and/or GIF, a PNG poster frame, and the generation metadata."""

    files: dict[str, bytes]  # by output name: WEBP, GIF (those asked for) and POSTER
    metadata: dict[str, Any]

    def save(
        self, path: str | Path, *, gif: str | Path | None = None, poster: str | Path | None = None
    ) -> list[Path]:
        """Write the WebP (or the GIF, when only that was made) to `path`, and the others if asked."""
        main = WEBP if WEBP in self.files else GIF
        targets = [(main, path)] + [(name, p) for name, p in ((GIF, gif), (POSTER, poster)) if p is not None]
        written = []
        for name, target in targets:
            if name not in self.files:
                raise ValueError(f"no {name} in this animation (format was {self.metadata.get('format')!r})")
            written.append(_write(target, self.files[name]))
        return written


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter (AWS's "full jitter"): retry n waits uniform(0, cap_n),
    cap_n = min(max_s, base_s * 2**n), so clients that failed together do not retry together.

    After an overload refusal (ServerOverloadedError) the caps start at `overload_base_s` instead:
    a full queue drains in about queue length x request time / instances (64 x 140 ms / 3 = 3 s for
    the mini preset's 256² image on 2 CPU cores; 64 x 20 ms / 4 = 0.3 s at the GPU goal), so retrying
    within 0.1-0.4 s would mostly be refused again. With the defaults the overload pauses are below
    0.5, 1 and 2 s: 3.5 s at most, 1.75 s on average, then ServerOverloadedError.
    """

    max_attempts: int = 4
    base_s: float = 0.1
    max_s: float = 2.0
    jitter: bool = True
    overload_base_s: float = 0.5

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"invalid 'max_attempts': got {self.max_attempts}; allowed: an integer >= 1")
        if not 0 <= self.base_s <= self.max_s:
            raise ValueError(
                f"invalid 'base_s': got {self.base_s}; allowed: 0 <= base_s <= max_s ({self.max_s})"
            )
        if self.overload_base_s < 0:
            raise ValueError(f"invalid 'overload_base_s': got {self.overload_base_s}; allowed: >= 0")

    def cap(self, retry: int, *, overloaded: bool = False) -> float:
        """The longest wait before retry number `retry` (0 for the first)."""
        base = max(self.base_s, self.overload_base_s) if overloaded else self.base_s
        return min(self.max_s, base * 2**retry)

    def backoff(
        self,
        retry: int,
        uniform: Callable[[float, float], float] = random.uniform,
        *,
        overloaded: bool = False,
    ) -> float:
        """Seconds to wait before retry number `retry` (0 for the first)."""
        cap = self.cap(retry, overloaded=overloaded)
        return uniform(0.0, cap) if self.jitter else cap


def status_name(exc: InferenceServerException) -> str:
    """The gRPC code of a tritonclient error, e.g. "UNAVAILABLE" (tritonclient says
    "StatusCode.UNAVAILABLE"); empty when the error carries none (in-stream model errors)."""
    return str(exc.status() or "").rsplit(".", 1)[-1]


def map_error(
    exc: InferenceServerException, url: str, deadline_s: float, retry_after_s: float = 1.0
) -> BirdgenError:
    """A typed error for a failed call: callers branch on the class, not the message.
    `retry_after_s` goes with a ServerOverloadedError (Attempts passes its policy's next cap)."""
    status = status_name(exc)
    message = exc.message() or str(exc)
    if status == "INVALID_ARGUMENT":
        return InvalidRequestError(message)
    if "protocol is restricted" in message:  # Triton answers UNAVAILABLE, but no retry will help
        return AdminKeyRequiredError(f"{url}: {message}")
    if status == "RESOURCE_EXHAUSTED" or (status == "UNAVAILABLE" and message.endswith(OVERLOADED)):
        return ServerOverloadedError(url, f"{message} ({status})", retry_after_s)
    if status in RETRYABLE:
        return ServerUnavailableError(url, f"{message} ({status})")
    if status == "DEADLINE_EXCEEDED":
        return DeadlineExceededError(f"no answer from {url} within {deadline_s:g}s")
    if not status and message.startswith(("invalid '", "missing '")):
        # A gRPC stream carries a model's error message but not its code; birdgen's request errors
        # are recognised by the form schema.RequestError gives every message.
        return InvalidRequestError(message)
    return GenerationError(f"{status or 'error'}: {message}")


class Attempts:
    """One call's deadline and retry budget, shared by everything the call does (cache wait, retries).

    The deadline ends a call with DeadlineExceededError wherever it falls: during an attempt, or
    where the next retry's pause would cross it (that retry is not made). ServerUnavailableError
    means the attempts ran out first, or the failure was the only attempt allowed.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        deadline_s: float,
        url: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.deadline_s = deadline_s
        self.url = url
        self._clock = clock
        self._deadline = clock() + deadline_s
        self._failures = 0
        self._last: BirdgenError | None = None

    def remaining(self) -> float:
        return self._deadline - self._clock()

    def expired(self) -> DeadlineExceededError:
        return DeadlineExceededError(f"no answer from {self.url} within {self.deadline_s:g}s", self._last)

    def timeout(self) -> float:
        """The time the next attempt may take; DeadlineExceededError when none is left."""
        remaining = self.remaining()
        if remaining <= 0:
            raise self.expired()
        return remaining

    def pause_after(self, exc: InferenceServerException) -> float:
        """Seconds to wait before retrying after `exc`; raises its typed error when the code is not
        retryable or the attempts are used up, DeadlineExceededError when the deadline ended the
        attempt or the wait would end past it."""
        self._failures += 1
        retry = self._failures - 1
        error = map_error(exc, self.url, self.deadline_s, self.policy.cap(retry, overloaded=True))
        if isinstance(error, DeadlineExceededError):
            raise self.expired() from None
        final = isinstance(error, AdminKeyRequiredError) or status_name(exc) not in RETRYABLE
        if final or self._failures >= self.policy.max_attempts:
            raise error from None
        self._last = error
        pause = self.policy.backoff(retry, overloaded=isinstance(error, ServerOverloadedError))
        if pause >= self.remaining():
            raise self.expired() from None
        return pause


@dataclass(frozen=True)
class Call:
    """One inference: the entry model, the validated request, and the outputs wanted."""

    model: str
    request: ImageRequest | AnimationRequest
    outputs: tuple[str, ...]

    @property
    def cache_model(self) -> str:
        """The entry model whose version keys this call's cached result: the streaming twin makes
        the same files as bird_animation, so both share its entries."""
        return ANIMATION_MODEL if self.model == ANIMATION_STREAM_MODEL else self.model

    def derivation(self) -> Derivation | None:
        """For the cache: a format=eink request is rendered from the cached PNG of the same request
        when there is one, without asking the server."""
        request = self.request
        if not isinstance(request, ImageRequest) or request.format != EINK:
            return None
        return Derivation(request.eink_source(), lambda source: eink_entry(request, source))

    def control_images(self) -> tuple[ControlSettings, ...]:
        """The request's ControlNets that carry a client image (none for templates and animations)."""
        if not isinstance(self.request, ImageRequest):
            return ()
        return tuple(s for s in self.request.control_settings() if s.image is not None)

    def has_images(self) -> bool:
        """Whether the request carries a client picture to check: a control image, or an svd
        animation's `image`."""
        if isinstance(self.request, AnimationRequest):
            return self.request.image is not None
        return bool(self.control_images())

    def check_images(self) -> None:
        """Decode every client picture as the entry model will (control_images.check_control_image at
        the image's size, check_animation_image at the picture's own), so a bad picture fails here
        with the error the server would give, before anything is sent."""
        if isinstance(self.request, AnimationRequest):
            check_animation_image(self.request)
            return
        for setting in self.control_images():
            check_control_image(setting, self.request.width, self.request.height)

    def inputs(self) -> list[InferInput]:
        """The request as sent: `to_json()`, its client pictures included (base64). It equals the
        canonical JSON (cache keys, seed) for every request without one (no control image, no svd
        `image`), so those send exactly the bytes they always did, and Triton's response cache, keyed
        on these bytes, keeps its entries."""
        tensor = InferInput(ENTRY_INPUT, [1], "BYTES")
        tensor.set_data_from_numpy(np.array([self.request.to_json().encode()], dtype=np.object_))
        return [tensor]

    def requested(self) -> list[InferRequestedOutput]:
        """The outputs, and the streaming model's progress messages."""
        streamed = (PROGRESS,) if self.model == ANIMATION_STREAM_MODEL else ()
        return [InferRequestedOutput(name) for name in (*self.outputs, *streamed)]

    def answer(
        self,
        result: InferResult | None,
        error: Exception | None,
        on_progress: OnProgress,
    ) -> CacheEntry | None:
        """One streamed response: the entry from the final one; None after handing a progress
        message ({"stage", "done", "total"}) to `on_progress`."""
        if error is not None:
            raise error
        assert result is not None
        progress = result.as_numpy(PROGRESS)
        if progress is not None:
            on_progress(json.loads(progress.reshape(-1)[0]))
            return None
        return self.entry(result)

    def entry(self, result: InferResult) -> CacheEntry:
        """The outputs as files (empty ones, formats not asked for, dropped) and the metadata.

        GenerationError when the answer has no outputs: Triton's response cache keeps a failed
        request's answer as an empty success and gives it to every repeat (docs/reliability.md)."""
        arrays = {name: result.as_numpy(name) for name in self.outputs}
        missing = [name for name, array in arrays.items() if array is None]
        if missing:
            raise GenerationError(
                f"{self.model} answered without {', '.join(missing)}: an empty answer, which Triton's "
                "response cache gives to the repeats of a request that failed (it is cleared by a "
                "server restart or a new entry-model version)"
            )
        outputs = {name: array.reshape(-1)[0] for name, array in arrays.items() if array is not None}
        metadata = json.loads(outputs.pop(METADATA))
        return CacheEntry({name: data for name, data in outputs.items() if data}, metadata)


def image_call(
    request: ImageRequest | Mapping[str, Any] | None,
    fields: Mapping[str, Any],
    *,
    check_images: bool = True,
) -> Call:
    """Validated with the server's own schema before anything is sent.

    A control image (`control={"openpose": {"image": ...}}`) may be a Path, bytes or base64 text:
    files and bytes are base64-encoded here. With `check_images` every control image is also decoded
    (Call.check_images); the asyncio client does that in a worker thread instead.
    """
    data = request if request is not None else fields
    call = Call(IMAGE_MODEL, _parse(parse_image_request, encode_control_images(data), {}), IMAGE_OUTPUTS)
    if check_images:
        call.check_images()
    return call


def animation_call(
    request: AnimationRequest | Mapping[str, Any] | None,
    fields: Mapping[str, Any],
    *,
    stream: bool,
    check_images: bool = True,
) -> Call:
    """Validated with the server's own schema before anything is sent; the streaming twin's model
    with `stream`.

    An svd request's `image` (engine="svd") may be a Path, bytes or base64 text: files and bytes are
    base64-encoded here. With `check_images` the picture is also decoded (Call.check_images); the
    asyncio client does that in a worker thread instead.
    """
    model = ANIMATION_STREAM_MODEL if stream else ANIMATION_MODEL
    data = request if request is not None else fields
    call = Call(model, _parse(parse_animation_request, encode_animation_image(data), {}), ANIMATION_OUTPUTS)
    if check_images:
        call.check_images()
    return call


def _parse(parse: Callable[[Any], RequestT], request: Any, fields: Mapping[str, Any]) -> RequestT:
    try:
        return parse(request if request is not None else fields)
    except RequestError as exc:
        raise InvalidRequestError(str(exc)) from None


def models_of(index: Mapping[str, Any]) -> list[dict[str, str]]:
    """A repository index as rows of name, version, state (READY, UNAVAILABLE, ...) and reason."""
    return [
        {k: str(m.get(k, "")) for k in ("name", "version", "state", "reason")}
        for m in index.get("models", [])
    ]


def roll_out_order(family_model: str, models: list[dict[str, str]]) -> list[str]:
    """What a family roll-out loads, in order: the family's UNets (`unet_<family>`, and
    `motion_unet_<family>` when exported; `controlled_unet_<family>` only when it is loaded, since it
    loads its newest version on first use otherwise), then every entry model, whose new versions start
    fresh response caches. `models` is the repository index (list_models): only models in it are named."""
    family = family_of(family_model)
    if family is None:
        raise InvalidRequestError(
            f"'{family_model}' is not a family UNet (unet_<family>, motion_unet_<family> or "
            "controlled_unet_<family>)"
        )
    present = {m["name"] for m in models}
    controlled = family_model_name(family, CONTROLLED_UNET)
    ready = {m["name"] for m in models if m.get("state") == "READY"}
    unets = (family_model_name(family), family_model_name(family, MOTION_UNET))
    unets += (controlled,) if controlled in ready else ()
    return [m for m in (*unets, IMAGE_MODEL, ANIMATION_MODEL, ANIMATION_STREAM_MODEL) if m in present]


def eink_entry(request: ImageRequest, source: CacheEntry) -> CacheEntry:
    """A format=eink entry rendered here from the PNG entry of `request.eink_source()`: the same
    files as the server's (both are birdgen.eink.render_request); the timings are this render's."""
    start = time.perf_counter()
    panel = render_request(request, source.files[IMAGE])
    ms = round((time.perf_counter() - start) * 1000, 3)
    files = {IMAGE: panel.preview_png, EINK_BUFFER: panel.buffer}
    return CacheEntry(files, {**panel.metadata, "timings_ms": {"eink": ms, "total": ms}})


def as_image(entry: CacheEntry) -> GeneratedImage:
    """A GeneratedImage, or a GeneratedEink when the entry holds a panel buffer."""
    data, metadata = entry.files[IMAGE], entry.metadata
    if EINK_BUFFER not in entry.files:
        return GeneratedImage(data, metadata["format"], metadata)
    eink = metadata["eink"]
    return GeneratedEink(
        data,
        metadata["format"],
        metadata,
        buffer=entry.files[EINK_BUFFER],
        **{name: eink[name] for name in ("width", "height", "bits_per_pixel", "panel", "palette")},
    )


def as_animation(entry: CacheEntry) -> GeneratedAnimation:
    return GeneratedAnimation(dict(entry.files), entry.metadata)


class ModelVersions:
    """Entry-model versions as cache-key parts ("bird_image/2"), each remembered for a few seconds.

    Why the Triton version of the entry model: the key must be known before generating (cache-aside),
    and the exporter gives the entry a new version on every family roll-out precisely so that Triton's
    own response cache starts fresh; the Redis cache follows the same rule.
    """

    def __init__(self) -> None:
        self._known: dict[str, tuple[float, str]] = {}

    def get(self, model: str) -> str | None:
        known = self._known.get(model)
        return known[1] if known is not None and time.monotonic() < known[0] else None

    def put(self, model: str, metadata: Mapping[str, Any]) -> str:
        """Remember the newest version in `model`'s metadata (during a roll-out two may be ready)."""
        versions = [int(v) for v in metadata.get("versions", [])]
        if not versions:
            raise GenerationError(f"{model} has no ready version")
        version = f"{model}/{max(versions)}"
        self._known[model] = (time.monotonic() + MODEL_VERSION_TTL_S, version)
        return version

    def forget(self) -> None:
        """After a load or roll-out through this client, the next call asks again."""
        self._known.clear()


# gRPC waits longer and longer between its attempts to reconnect to a server that went away (1 s,
# x1.6 each time, up to 2 minutes) and fails every call at once meanwhile: a client that met a server
# restart went on failing for 11 s after the server was back (a 30 s restart; minutes after a long
# one, docs/reliability.md). Trying again at least every 2 s costs one refused connection then.
RECONNECT_BACKOFF_MS = (("grpc.initial_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 2000))


def channel_args() -> list[tuple[str, int]]:
    """tritonclient's own channel options (message sizes, keepalive), and RECONNECT_BACKOFF_MS."""
    keepalive = KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        *RECONNECT_BACKOFF_MS,
    ]


class ClientBase:
    """Options and helpers both clients share; the subclasses add the transport.

    `deadline_s` bounds each call end to end (cache wait, every attempt and every backoff) and can be
    overridden per call; `retry` says how UNAVAILABLE and RESOURCE_EXHAUSTED are retried. `headers`
    are extra gRPC metadata sent with every call (e.g. authorization). `ssl` with
    `root_certificates`, `private_key`, `certificate_chain` (PEM file paths) are tritonclient's TLS
    options. `cache` answers repeated requests from Redis (see cache.py).
    """

    def __init__(
        self,
        url: str = "localhost:8001",
        *,
        deadline_s: float = 120.0,
        retry: RetryPolicy | None = None,
        ssl: bool = False,
        root_certificates: str | Path | None = None,
        private_key: str | Path | None = None,
        certificate_chain: str | Path | None = None,
        headers: Mapping[str, str] | None = None,
        cache: ResponseCache | None = None,
    ) -> None:
        self.url = url
        self.deadline_s = deadline_s
        self.retry = retry or RetryPolicy()
        self.headers = dict(headers or {})
        self.cache = cache
        self._tls = {
            "ssl": ssl,
            "root_certificates": root_certificates,
            "private_key": private_key,
            "certificate_chain": certificate_chain,
        }
        self._versions = ModelVersions()

    def _connection(self) -> dict[str, Any]:
        """Keyword arguments for tritonclient's (sync or aio) InferenceServerClient."""
        return {"url": self.url, **self._tls, "channel_args": channel_args()}

    def _attempts(self, deadline_s: float | None) -> Attempts:
        return Attempts(self.retry, self.deadline_s if deadline_s is None else deadline_s, self.url)
