"""Triton's statistics as tests read them: counters polled until they reach what the test expects.

Triton does not promise that a request is counted before its response reaches the client, so a
count read right after a call may still miss that call. Each reader here takes the count the test
expects at least and polls (bounded) until it is there; a count above it is returned as it is, so
an extra request still fails the test's equality.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import tritonclient.grpc as grpcclient

SETTLE_S = 30.0  # far above any real delay: only a count that never comes waits this long
POLL_S = 0.01


def settled(read: Callable[[], int], at_least: int, timeout_s: float = SETTLE_S) -> int:
    """`read()` once it is at least `at_least`, or its value when `timeout_s` runs out."""
    give_up = time.monotonic() + timeout_s
    while (value := read()) < at_least and time.monotonic() < give_up:
        time.sleep(POLL_S)
    return value


def model_stats(url: str, model: str) -> dict[str, Any]:
    with grpcclient.InferenceServerClient(url) as client:
        return client.get_inference_statistics(model, as_json=True)["model_stats"][0]


def _count(stats: dict[str, Any], outcome: str) -> int:
    return int(stats["inference_stats"].get(outcome, {}).get("count", 0))


def requests_served(url: str, model: str, at_least: int = 0) -> int:
    """How many requests `model` has answered (a python model's error response counts as a success
    there: the request was answered)."""
    return settled(lambda: sum(_count(model_stats(url, model), o) for o in ("success", "fail")), at_least)


def cache_hits(url: str, model: str, at_least: int = 0) -> int:
    """Requests Triton's response cache answered for `model`."""
    return settled(lambda: _count(model_stats(url, model), "cache_hit"), at_least)


def inferences_and_executions(url: str, model: str, inferences_at_least: int = 0) -> tuple[int, int]:
    """(inferences run, executions they were batched into) of `model`, once the inferences have
    reached `inferences_at_least` (an execution is counted with its inferences)."""
    settled(lambda: int(model_stats(url, model).get("inference_count", 0)), inferences_at_least)
    stats = model_stats(url, model)
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))
