"""The Redis response cache against a real redis-server: hits, TTL, keys, single flight, outages."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry

from birdgen.client.cache import (
    DEFAULT_TTL_S,
    CacheEntry,
    CorruptEntryError,
    Derivation,
    ResponseCache,
    cache_key,
    decode_entry,
    encode_entry,
)
from birdgen.schema import AnimationRequest, ImageRequest
from tests.conftest import ROBIN
from tests.redis_fixture import RedisServer, redis_server  # noqa: F401
from tests.test_client import CLIP
from tests.test_schema import CHANGES, with_change

pytestmark = pytest.mark.timeout(60)

VERSION = "bird_image/1"
ENTRY = CacheEntry(
    {"image": bytes(range(256)) * 40, "poster": b""},
    {"seed": 42, "prompt": "a robin — Turdus migratorius", "timings_ms": {"unet": 1.5}, "ai_generated": True},
)


class Generator:
    """A generate function that counts its calls and takes a while, like a real generation."""

    def __init__(self, entry: CacheEntry = ENTRY, seconds: float = 0.0, fail: bool = False) -> None:
        self.entry, self.seconds, self.fail = entry, seconds, fail
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self) -> CacheEntry:
        with self._lock:
            self.calls += 1
        time.sleep(self.seconds)
        if self.fail:
            raise RuntimeError("generation failed")
        return self.entry

    async def agenerate(self) -> CacheEntry:
        self.calls += 1
        await asyncio.sleep(self.seconds)
        return self.entry


def count(registry: CollectorRegistry, what: str, kind: str = "image") -> float:
    return registry.get_sample_value(f"birdgen_cache_{what}_total", {"kind": kind}) or 0.0


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def cache(redis_server: RedisServer, registry: CollectorRegistry) -> Iterator[ResponseCache]:  # noqa: F811
    # A timeout no busy machine reaches: Redis answering late is tested on its own (paused Redis).
    cache = ResponseCache(redis_server.url, registry=registry, socket_timeout_s=5.0)
    yield cache
    cache.close()


def test_hit_returns_identical_bytes_and_metadata(cache: ResponseCache, registry) -> None:
    request, generate = ImageRequest(**ROBIN), Generator()
    first = cache.get_or_generate(request, generate, model_version=VERSION)
    second = cache.get_or_generate(request, generate, model_version=VERSION)
    assert generate.calls == 1
    assert first == second == ENTRY
    assert count(registry, "misses") == 1 and count(registry, "hits") == 1 and count(registry, "errors") == 0


def test_animation_entry_round_trips_every_file(cache: ResponseCache, registry) -> None:
    clip = CacheEntry({"webp": b"RIFF" + b"\0" * 99, "gif": b"GIF89a", "poster": b"\x89PNG"}, {"frames": 16})
    request = AnimationRequest(**CLIP)
    cache.get_or_generate(request, Generator(clip), model_version="bird_animation/1")
    assert cache.get_or_generate(request, Generator(), model_version="bird_animation/1") == clip
    assert count(registry, "hits", "animation") == 1 and count(registry, "hits", "image") == 0


def test_entry_lives_30_days_by_default_and_the_ttl_is_configurable(
    cache: ResponseCache,
    redis_server: RedisServer,  # noqa: F811
    registry,
) -> None:
    request = ImageRequest(**ROBIN)
    cache.get_or_generate(request, Generator(), model_version=VERSION)
    shorter = ResponseCache(redis_server.url, ttl_s=3600, registry=registry)
    shorter.get_or_generate(request, Generator(), model_version="bird_image/2")
    shorter.close()
    with redis.Redis.from_url(redis_server.url) as client:
        assert DEFAULT_TTL_S == 30 * 24 * 3600
        assert DEFAULT_TTL_S - 5 <= client.ttl(cache_key(request, VERSION)) <= DEFAULT_TTL_S
        assert 3600 - 5 <= client.ttl(cache_key(request, "bird_image/2")) <= 3600
        assert client.exists(cache_key(request, VERSION) + ":lock") == 0  # released after storing


SAME_REQUEST = [
    ("field order", dict(reversed(list(ROBIN.items())))),
    ("vocabulary casing", {**ROBIN, "pose": "PERCHED", "season": "Spring", "lighting": "Golden-Hour"}),
    ("format casing", {**ROBIN, "format": "PNG"}),
    ("defaults spelled out", {**ROBIN, "style": "photo", "habitat": None, "prompt": None}),
    ("whitespace in names", {**ROBIN, "species": "  American   Robin "}),
    ("empty optional text", {**ROBIN, "habitat": "", "negative_prompt": "  "}),
]


@pytest.mark.parametrize(("why", "fields"), SAME_REQUEST, ids=[s[0] for s in SAME_REQUEST])
def test_key_ignores_spelling_of_the_same_request(why: str, fields: dict[str, Any]) -> None:
    assert cache_key(ImageRequest(**fields), VERSION) == cache_key(ImageRequest(**ROBIN), VERSION)


def test_every_field_and_the_model_version_change_the_key() -> None:
    changes = {**CHANGES, "seed": 43}  # one changed value per field
    assert set(changes) == set(ImageRequest.model_fields)
    base = ImageRequest(**ROBIN)
    keys = {cache_key(base, VERSION), cache_key(base, "bird_image/2")}
    for field, value in changes.items():
        keys.add(cache_key(ImageRequest(**with_change(ROBIN, field, value)), VERSION))
    keys.add(cache_key(ImageRequest(**{**ROBIN, "format": "jpg"}), VERSION))  # jpeg: one more format
    assert len(keys) == len(changes) + 3


def test_same_fields_as_an_animation_are_another_entry() -> None:
    changes = ({}, {"fps": 10}, {"duration_seconds": 3.0})
    clips = {cache_key(AnimationRequest(**{**CLIP, **change}), VERSION) for change in changes}
    assert len(clips) == 3 and cache_key(ImageRequest(**ROBIN), VERSION) not in clips


def test_concurrent_identical_misses_generate_once(cache: ResponseCache, registry) -> None:
    robin, wren = ImageRequest(**ROBIN), ImageRequest(**{**ROBIN, "species": "Winter Wren"})
    generators = {robin: Generator(seconds=0.3), wren: Generator(seconds=0.3)}

    def get(request: ImageRequest) -> CacheEntry:
        return cache.get_or_generate(request, generators[request], model_version=VERSION)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(get, [robin, wren] * 4))
    assert results == [ENTRY] * 8
    assert generators[robin].calls == 1 and generators[wren].calls == 1
    assert count(registry, "misses") == 2 and count(registry, "hits") == 6


def test_concurrent_identical_misses_generate_once_under_asyncio(cache: ResponseCache, registry) -> None:
    request, generate = ImageRequest(**ROBIN), Generator(seconds=0.3)

    async def main() -> list[CacheEntry]:
        calls = [cache.aget_or_generate(request, generate.agenerate, model_version=VERSION) for _ in range(8)]
        results = await asyncio.gather(*calls)
        await cache.aclose()
        return results

    assert asyncio.run(main()) == [ENTRY] * 8
    assert generate.calls == 1 and count(registry, "misses") == 1 and count(registry, "hits") == 7


@pytest.mark.parametrize(
    ("lock_ms", "wait_s", "after"),
    [(400, None, 0.35), (30_000, 0.2, 0.2)],
    ids=["holder died: the lock expires", "holder slow: the waiter gives up"],
)
def test_a_waiter_generates_itself_when_the_lock_expires_or_its_wait_ends(
    cache: ResponseCache,
    redis_server: RedisServer,  # noqa: F811
    lock_ms: int,
    wait_s: float | None,
    after: float,
) -> None:
    request, generate = ImageRequest(**ROBIN), Generator()
    with redis.Redis.from_url(redis_server.url) as client:
        client.set(cache_key(request, VERSION) + ":lock", "another caller", px=lock_ms)
    start = time.monotonic()
    assert cache.get_or_generate(request, generate, model_version=VERSION, wait_s=wait_s) == ENTRY
    # Not before the lock expired or the wait ended; and not after the cache's own 30 s lock TTL,
    # the wait it would have made otherwise.
    assert generate.calls == 1 and after <= time.monotonic() - start < cache.lock_ttl_s


def test_a_failed_generation_releases_the_lock_for_the_waiters(cache: ResponseCache) -> None:
    request, working = ImageRequest(**ROBIN), Generator()
    holding, fail_now = threading.Event(), threading.Event()

    def failing() -> CacheEntry:
        holding.set()  # called on a miss, with the lock taken
        fail_now.wait(timeout=60)
        raise RuntimeError("generation failed")

    with ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(cache.get_or_generate, request, failing, model_version=VERSION)
        assert holding.wait(timeout=60)
        start = time.monotonic()
        second = pool.submit(cache.get_or_generate, request, working, model_version=VERSION)
        fail_now.set()
        with pytest.raises(RuntimeError, match="generation failed"):
            first.result()
        assert second.result() == ENTRY
    # The waiter took over when the lock was released, not after the lock's 30 s TTL.
    assert working.calls == 1 and time.monotonic() - start < cache.lock_ttl_s


@pytest.mark.parametrize("use_asyncio", [False, True], ids=["sync", "asyncio"])
def test_redis_killed_mid_run_requests_still_succeed_and_errors_are_counted(
    cache: ResponseCache,
    redis_server: RedisServer,  # noqa: F811
    registry,
    caplog: pytest.LogCaptureFixture,
    use_asyncio: bool,
) -> None:
    requests = [ImageRequest(**{**ROBIN, "seed": seed}) for seed in range(4)]
    generate = Generator()

    def get_all(requests: list[ImageRequest]) -> list[CacheEntry]:
        if not use_asyncio:
            return [cache.get_or_generate(r, generate, model_version=VERSION) for r in requests]

        async def main() -> list[CacheEntry]:
            results = [
                await cache.aget_or_generate(r, generate.agenerate, model_version=VERSION) for r in requests
            ]
            await cache.aclose()
            return results

        return asyncio.run(main())

    assert get_all(requests[:1] * 2) == [ENTRY] * 2
    redis_server.kill()
    with caplog.at_level(logging.WARNING, logger="birdgen.client.cache"):
        assert get_all(requests) == [ENTRY] * 4
    assert generate.calls == 1 + 4  # the hit before the outage is now generated again
    assert count(registry, "errors") == 4 and count(registry, "hits") == 1
    assert sum("Redis cache failed" in r.getMessage() for r in caplog.records) == 4


def test_a_paused_redis_times_out_and_the_request_is_generated(
    redis_server: RedisServer,  # noqa: F811
    registry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Redis that accepts but never answers costs one socket timeout, then the request is made
    without it (without the timeout the call would hang until Redis came back)."""
    cache = ResponseCache(redis_server.url, registry=registry, socket_timeout_s=0.2)
    request, generate = ImageRequest(**ROBIN), Generator()
    cache.get_or_generate(ImageRequest(**{**ROBIN, "seed": 1}), generate, model_version=VERSION)  # connected
    redis_server.process.send_signal(signal.SIGSTOP)  #: connections stay open, nothing answers
    with caplog.at_level(logging.WARNING, logger="birdgen.client.cache"):
        start = time.monotonic()
        assert cache.get_or_generate(request, generate, model_version=VERSION) == ENTRY
        elapsed = time.monotonic() - start
    cache.close()
    assert count(registry, "errors") == 1 and "Timeout" in caplog.text
    assert elapsed < 30  # a timeout, not the hang it would be without one (Redis answers never)


def test_a_foreign_value_under_the_key_is_an_error_not_a_failure(
    cache: ResponseCache,
    redis_server: RedisServer,  # noqa: F811
    registry,
) -> None:
    request, generate = ImageRequest(**ROBIN), Generator()
    with redis.Redis.from_url(redis_server.url) as client:
        client.set(cache_key(request, VERSION), b"written by something else")
    assert cache.get_or_generate(request, generate, model_version=VERSION) == ENTRY
    assert generate.calls == 1 and count(registry, "errors") == 1


@pytest.mark.parametrize(
    "raw",
    [b"", b"BGC1", b"BGC1\x00\x00\x00\x05{bad}", encode_entry(ENTRY)[:-1], encode_entry(ENTRY) + b"x"],
    ids=["empty", "no-header", "bad-json", "truncated", "trailing"],
)
def test_decode_rejects_what_encode_did_not_write(raw: bytes) -> None:
    with pytest.raises(CorruptEntryError):
        decode_entry(raw)


def test_caches_on_one_registry_share_its_counters(redis_server: RedisServer, registry) -> None:  # noqa: F811
    first, second = (ResponseCache(redis_server.url, registry=registry) for _ in range(2))
    request = ImageRequest(**ROBIN)
    first.get_or_generate(request, Generator(), model_version=VERSION)
    second.get_or_generate(request, Generator(), model_version=VERSION)
    assert count(registry, "misses") == 1 and count(registry, "hits") == 1
    first.close()
    second.close()


EINK_ROBIN = {**ROBIN, "format": "eink", "eink_panel": "400x300"}
EINK_REQUEST = ImageRequest(**EINK_ROBIN)
EINK_ENTRY = CacheEntry({"image": b"preview", "eink_buffer": b"\xff" * 8}, {"eink": {"panel": "400x300"}})


def test_an_eink_option_changes_the_key_and_its_source_shares_the_png_key() -> None:
    other_panel = ImageRequest(**{**EINK_ROBIN, "eink_panel": "296x128"})
    keys = {cache_key(r, VERSION) for r in (EINK_REQUEST, other_panel, ImageRequest(**ROBIN))}
    assert len(keys) == 3
    assert cache_key(EINK_REQUEST.eink_source(), VERSION) == cache_key(ImageRequest(**ROBIN), VERSION)


def test_a_miss_is_made_from_its_cached_source_without_generating(cache: ResponseCache, registry) -> None:
    made: list[CacheEntry] = []
    derive = Derivation(EINK_REQUEST.eink_source(), lambda source: made.append(source) or EINK_ENTRY)
    generate = Generator(EINK_ENTRY)
    # Source not cached: generated, and stored under the e-ink request's own key.
    assert cache.get_or_generate(EINK_REQUEST, generate, model_version=VERSION, derive=derive) == EINK_ENTRY
    assert generate.calls == 1 and not made
    cache.get_or_generate(EINK_REQUEST.eink_source(), Generator(), model_version=VERSION)
    other = ImageRequest(**EINK_ROBIN, eink_dither="ordered")
    assert cache.get_or_generate(other, generate, model_version=VERSION, derive=derive) == EINK_ENTRY
    assert generate.calls == 1 and made == [ENTRY]
    assert cache.get_or_generate(other, Generator(fail=True), model_version=VERSION) == EINK_ENTRY

    async def main() -> CacheEntry:
        fourth = ImageRequest(**{**EINK_ROBIN, "eink_panel": "296x128"})
        entry = await cache.aget_or_generate(fourth, generate.agenerate, model_version=VERSION, derive=derive)
        await cache.aclose()
        return entry

    assert asyncio.run(main()) == EINK_ENTRY and generate.calls == 1 and made == [ENTRY, ENTRY]
    assert (count(registry, "misses"), count(registry, "hits"), count(registry, "errors")) == (4, 1, 0)


def test_a_derivation_that_fails_is_logged_and_generated_instead(
    cache: ResponseCache, registry, caplog
) -> None:
    cache.get_or_generate(EINK_REQUEST.eink_source(), Generator(), model_version=VERSION)  # not an image

    def unreadable(source: CacheEntry) -> CacheEntry:
        raise ValueError("not a readable image")

    generate = Generator(EINK_ENTRY)
    derive = Derivation(EINK_REQUEST.eink_source(), unreadable)
    with caplog.at_level(logging.WARNING):
        assert (
            cache.get_or_generate(EINK_REQUEST, generate, model_version=VERSION, derive=derive) == EINK_ENTRY
        )
    assert generate.calls == 1 and count(registry, "errors") == 1
    assert "not a readable image" in caplog.text
