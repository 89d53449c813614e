"""A closed-loop async load generator over `AsyncBirdClient`: `concurrency` workers, each sending its
next request as soon as the previous one is answered, for a request count or a duration.

Closed loop on purpose: it measures what N concurrent users see, and the throughput a server
sustains at that concurrency, without an arrival rate that could outrun it.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from birdgen.benchmarks.scenarios import Scenario
from birdgen.benchmarks.stats import Sample
from birdgen.client import AsyncBirdClient, BirdgenError

# seed -> the served metadata's timings_ms (empty for cache hits: they did no work)
Call = Callable[[int], Awaitable[dict[str, float]]]


def fresh_seeds() -> Iterator[int]:
    """Seeds no earlier run used (a random 40-bit base, then counting), so Triton's response cache,
    which keys on the whole request, never answers a benchmark request."""
    return itertools.count(secrets.randbits(40) << 20)


def served_call(client: AsyncBirdClient, scenario: Scenario) -> Call:
    """One generation through the server; returns its timings."""

    async def call(seed: int) -> dict[str, float]:
        if scenario.kind == "animation":
            result: Any = await client.generate_animation(scenario.request(seed))
        else:
            result = await client.generate_image(scenario.request(seed))
        return {} if scenario.kind == "cached" else dict(result.metadata["timings_ms"])

    return call


async def run_point(
    call: Call,
    seeds: Iterator[int],
    concurrency: int,
    *,
    requests: int | None = None,
    duration_s: float | None = None,
    on_done: Callable[[Sample], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[list[Sample], list[str]]:
    """Run one point; returns the samples and the distinct error messages.

    With `requests`, exactly that many are sent (at least one per worker); else workers start new
    requests until `duration_s` has passed on `clock` and the point ends when the last one is answered.
    """
    if (requests is None) == (duration_s is None):
        raise ValueError("give exactly one of requests or duration_s")
    left = max(requests, concurrency) if requests is not None else None
    deadline = clock() + (duration_s or 0.0)
    samples: list[Sample] = []
    errors: dict[str, None] = {}  # insertion-ordered set

    def another() -> bool:
        nonlocal left
        if left is None:
            return clock() < deadline
        left -= 1
        return left >= 0

    async def worker() -> None:
        while another():
            seed = next(seeds)
            start = clock()
            try:
                timings, ok = await call(seed), True
            except BirdgenError as exc:
                timings, ok = {}, False
                errors[f"{type(exc).__name__}: {exc}"] = None
            sample = Sample(start, clock(), ok, timings)
            samples.append(sample)
            if on_done is not None:
                on_done(sample)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples, list(errors)
