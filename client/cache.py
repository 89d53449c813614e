"""Redis response cache: cache-aside for generated images and animations, shared by every replica.

Triton's response cache lives in one server's memory; this one is shared by all clients and survives
server restarts. Usable alone (`cache.get_or_generate(request, generate, model_version=...)`) or
through a client (`BirdClient(url, cache=ResponseCache(redis_url))`).

- Key: SHA256 of {"format", "model_version", "request"} as sorted, compact JSON, where "request" is
  the schema's canonical form (so field order, casing and aliases of vocabulary values do not
  matter; any field's value, the model version or the format does). A control image counts by the
  SHA-256 of its bytes, not by how it was sent (file, bytes or base64 text give one key).
- Value: one framed string (a JSON header with the metadata and the file lengths, then the files),
  written with its TTL by a single SET, so no entry ever lives without one.
- Identical concurrent misses generate once: the first caller takes a short lock (SET NX PX); the
  others poll for the value, and generate themselves only if the holder fails or the wait runs out.
- A miss that another cached request can be made from (`Derivation`: a format=eink request from
  the PNG of the same request) is made from it here, without generating, and stored under its own key.
- Redis is never a reason to fail: an error or timeout logs a warning, counts in
  `birdgen_cache_errors_total`, and the request is generated without the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio
from prometheus_client import REGISTRY, CollectorRegistry, Counter
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from birdgen.schema import AnimationRequest, ImageRequest

log = logging.getLogger(__name__)

KEY_PREFIX = "birdgen:cache:v1:"  # v1: the framing below; a new framing gets a new prefix
DEFAULT_TTL_S = 30 * 24 * 3600
_MAGIC = b"BGC1"
_HEADER_LENGTH = 4
# Delete the lock only if it is still ours (it may have expired and been taken by another caller).
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"

Request = ImageRequest | AnimationRequest


class CorruptEntryError(ValueError):
    """A cached value that is not a framed entry (written by something else)."""


@dataclass(frozen=True)
class CacheEntry:
    """What is cached for one request: the files by name ("image", or "webp"/"gif"/"poster") and the
    generation metadata, both returned byte for byte on a hit."""

    files: dict[str, bytes]
    metadata: dict[str, Any]


@dataclass(frozen=True)
class Derivation:
    """How a request's entry can be made from another request's cached entry without generating.

    `make` runs on the caller's side (in a worker thread under asyncio): a format=eink request is
    rendered from the cached PNG of the same request (birdgen.eink.render_request).
    """

    source: Request
    make: Callable[[CacheEntry], CacheEntry]


def cache_key(request: Request, model_version: str) -> str:
    """The Redis key of `request`'s result from `model_version` (see the module docstring)."""
    request_fields = json.loads(request.canonical_json())  # a control image as its digest, never itself
    material = {"format": request.format, "model_version": model_version, "request": request_fields}
    text = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return KEY_PREFIX + hashlib.sha256(text.encode("utf-8")).hexdigest()


def encode_entry(entry: CacheEntry) -> bytes:
    header = json.dumps(
        {"metadata": entry.metadata, "files": [[name, len(data)] for name, data in entry.files.items()]},
        separators=(",", ":"),
    ).encode("utf-8")
    return b"".join((_MAGIC, len(header).to_bytes(_HEADER_LENGTH, "big"), header, *entry.files.values()))


def decode_entry(raw: bytes) -> CacheEntry:
    if not raw.startswith(_MAGIC):
        raise CorruptEntryError("not a birdgen cache entry")
    start = len(_MAGIC) + _HEADER_LENGTH
    end = start + int.from_bytes(raw[len(_MAGIC) : start], "big")
    try:
        header = json.loads(raw[start:end])
        metadata, files = header["metadata"], {}
        for name, length in header["files"]:
            files[name], end = raw[end : end + length], end + length
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptEntryError(f"unreadable cache entry header: {exc}") from None
    if end != len(raw):
        raise CorruptEntryError(f"cache entry is {len(raw)} bytes, its header says {end}")
    return CacheEntry(files, metadata)


@dataclass(frozen=True)
class CacheMetrics:
    hits: Counter
    misses: Counter
    errors: Counter


@functools.cache
def cache_metrics(registry: CollectorRegistry = REGISTRY) -> CacheMetrics:
    """The counters, registered once per registry (a second cache on one registry shares them).

    `kind` is the request's kind: "image" or "animation". A caller that waited for another's
    generation counts a hit; a Redis failure counts an error, neither a hit nor a miss.
    """

    def counter(name: str, what: str) -> Counter:
        return Counter(name, what, ["kind"], registry=registry)

    return CacheMetrics(
        counter("birdgen_cache_hits", "Requests answered from the Redis cache"),
        counter("birdgen_cache_misses", "Requests generated and then stored in the Redis cache"),
        counter("birdgen_cache_errors", "Redis errors and timeouts (the request was generated anyway)"),
    )


class _Command:
    """A Redis command for a driver to run; redis-py's sync and asyncio clients share method names."""

    def __init__(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.name, self.args, self.kwargs = name, args, kwargs

    def send(self, client: Any) -> Any:
        return getattr(client, self.name)(*self.args, **self.kwargs)


def _release(lock: str, token: str) -> _Command:
    return _Command("eval", _RELEASE, 1, lock, token)


@dataclass(frozen=True)
class _Sleep:
    seconds: float


class _Generate:
    """Run the caller's generate function and send back its entry."""


@dataclass(frozen=True)
class _Make:
    """Run a derivation's `make` on the source entry and send back its entry."""

    make: Callable[[CacheEntry], CacheEntry]
    source: CacheEntry


_Step = _Command | _Sleep | _Generate | _Make
_Flow = Generator[_Step, Any, CacheEntry]


class _Run:
    """Steps a flow: each step() sends in the previous step's outcome, or throws its exception in."""

    def __init__(self, flow: _Flow) -> None:
        self._flow = flow
        self.outcome: Any = None
        self._error: BaseException | None = None
        self._entry: CacheEntry | None = None

    def step(self) -> _Step | None:
        """The next thing to do, or None once the flow has returned (see `entry`)."""
        try:
            error, self._error = self._error, None
            step = self._flow.send(self.outcome) if error is None else self._flow.throw(error)
        except StopIteration as done:
            self._entry = done.value
            return None
        self.outcome = None
        return step

    @contextlib.contextmanager
    def catching(self) -> Iterator[None]:
        """Hands a step's exception to the flow (which decides) instead of the driver's caller."""
        try:
            yield
        except BaseException as exc:
            self._error = exc

    @property
    def entry(self) -> CacheEntry:
        assert self._entry is not None, "the flow has not returned yet"
        return self._entry


class ResponseCache:
    """Cache-aside over Redis; thread-safe, and usable from asyncio through `aget_or_generate`.

    The algorithm is written once (`_flow`, a generator yielding Redis commands, sleeps and "generate
    now"); the sync and asyncio drivers only execute those steps. redis-py's own retries are off: a
    Redis outage costs a request at most one short socket timeout, never a backoff.
    """

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        *,
        ttl_s: int = DEFAULT_TTL_S,
        lock_ttl_s: float = 30.0,
        poll_s: float = 0.01,
        socket_timeout_s: float = 0.25,
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self.url = url
        self.ttl_s = ttl_s
        self.lock_ttl_s = lock_ttl_s
        self.poll_s = poll_s
        self.metrics = cache_metrics(registry)
        self._options = {
            "socket_timeout": socket_timeout_s,
            "socket_connect_timeout": socket_timeout_s,
        }
        self._redis = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **self._options)
        self._aredis: tuple[asyncio.AbstractEventLoop, redis.asyncio.Redis] | None = None

    def get_or_generate(
        self,
        request: Request,
        generate: Callable[[], CacheEntry],
        *,
        model_version: str,
        wait_s: float | None = None,
        derive: Derivation | None = None,
    ) -> CacheEntry:
        """The cached entry for `request`, or `generate()`'s, stored for `ttl_s`.

        `wait_s` bounds the wait for another caller's identical generation (default: the lock's TTL).
        With `derive`, a miss whose source is cached is made from it instead of generated.
        Exceptions from `generate` propagate (the lock is released first); Redis errors never do.
        """
        run = _Run(self._flow(request, model_version, wait_s, derive))
        while (step := run.step()) is not None:
            with run.catching():
                run.outcome = self._execute(step, generate)
        return run.entry

    def _execute(self, step: _Step, generate: Callable[[], CacheEntry]) -> Any:
        if isinstance(step, _Command):
            return step.send(self._redis)
        if isinstance(step, _Sleep):
            time.sleep(step.seconds)
            return None
        if isinstance(step, _Make):
            return step.make(step.source)
        return generate()

    async def aget_or_generate(
        self,
        request: Request,
        generate: Callable[[], Awaitable[CacheEntry]],
        *,
        model_version: str,
        wait_s: float | None = None,
        derive: Derivation | None = None,
    ) -> CacheEntry:
        """`get_or_generate` for asyncio: Redis, the waits and a derivation are awaited, never
        blocking the loop."""
        run = _Run(self._flow(request, model_version, wait_s, derive))
        while (step := run.step()) is not None:
            with run.catching():
                run.outcome = await self._aexecute(step, generate)
        return run.entry

    async def _aexecute(self, step: _Step, generate: Callable[[], Awaitable[CacheEntry]]) -> Any:
        if isinstance(step, _Command):
            return await step.send(self._async_redis())
        if isinstance(step, _Sleep):
            await asyncio.sleep(step.seconds)
            return None
        if isinstance(step, _Make):
            return await asyncio.to_thread(step.make, step.source)
        return await generate()

    def _async_redis(self) -> redis.asyncio.Redis:
        """redis.asyncio connections belong to one event loop: one client per loop in use."""
        loop = asyncio.get_running_loop()
        if self._aredis is None or self._aredis[0] is not loop:
            client = redis.asyncio.Redis.from_url(self.url, retry=AsyncRetry(NoBackoff(), 0), **self._options)
            self._aredis = (loop, client)
        return self._aredis[1]

    def _flow(
        self, request: Request, model_version: str, wait_s: float | None, derive: Derivation | None
    ) -> _Flow:
        kind = "animation" if isinstance(request, AnimationRequest) else "image"
        key = cache_key(request, model_version)
        lock, token = f"{key}:lock", secrets.token_hex(16)
        try:
            cached, owner = yield from self._look_up(key, lock, token, wait_s)
        except (redis.RedisError, CorruptEntryError) as exc:
            self._failed(exc, kind)
            return (yield _Generate())
        if cached is not None:
            self.metrics.hits.labels(kind).inc()
            return cached
        self.metrics.misses.labels(kind).inc()
        try:
            entry = None if derive is None else (yield from self._derived(derive, model_version, kind))
            if entry is None:
                entry = yield _Generate()
        except BaseException as exc:
            if owner and not isinstance(exc, GeneratorExit):  # waiters need not wait out the lock
                with contextlib.suppress(redis.RedisError):
                    yield _release(lock, token)
            raise
        try:
            yield _Command("set", key, encode_entry(entry), ex=self.ttl_s)
            if owner:
                yield _release(lock, token)
        except redis.RedisError as exc:
            self._failed(exc, kind)
        return entry

    def _derived(
        self, derive: Derivation, model_version: str, kind: str
    ) -> Generator[_Step, Any, CacheEntry | None]:
        """The entry made from the source's cached one; None when the source is not cached, or Redis
        or the cached source fails (logged and counted: the caller generates instead)."""
        try:
            raw = yield _Command("get", cache_key(derive.source, model_version))
            if raw is None:
                return None
            return (yield _Make(derive.make, decode_entry(raw)))
        except (redis.RedisError, ValueError) as exc:  # CorruptEntryError, an unreadable image
            self._failed(exc, kind)
            return None

    def _look_up(
        self, key: str, lock: str, token: str, wait_s: float | None
    ) -> Generator[_Step, Any, tuple[CacheEntry | None, bool]]:
        """The cached entry, or None and whether this caller now holds the lock (False: gave up).

        After taking the lock it looks once more: the previous holder may have stored the value and
        released the lock between this caller's miss and its SET NX.
        """
        give_up = time.monotonic() + (self.lock_ttl_s if wait_s is None else wait_s)
        owner = False
        while True:
            raw = yield _Command("get", key)
            if raw is not None:
                if owner:
                    yield _release(lock, token)
                return decode_entry(raw), False
            if owner:
                return None, True
            owner = bool((yield _Command("set", lock, token, nx=True, px=round(self.lock_ttl_s * 1000))))
            if not owner:
                if time.monotonic() >= give_up:
                    return None, False
                yield _Sleep(self.poll_s)

    def _failed(self, exc: Exception, kind: str) -> None:
        self.metrics.errors.labels(kind).inc()
        log.warning("Redis cache failed (%s: %s); generating without it", type(exc).__name__, exc)

    def close(self) -> None:
        self._redis.close()

    async def aclose(self) -> None:
        if self._aredis is not None:
            await self._aredis[1].aclose()
            self._aredis = None
