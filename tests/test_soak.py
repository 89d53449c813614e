"""The soak (birdgen.benchmarks.soak) against the session server: many tiny-model requests at high
concurrency end in a result or the documented overload refusal, never anything else, and the
server's memory does not grow past what Triton's response cache takes.

300 requests by default (about a minute on 2 cores); the long soak is
`BIRDGEN_SOAK_REQUESTS=3000 pytest tests/test_soak.py`, and `python -m birdgen.benchmarks.soak`
writes the benchmark's figures (docs/reliability.md, "Overload")."""

from __future__ import annotations

import asyncio
import json
import os
import platform
from pathlib import Path

import pytest

from birdgen.benchmarks.soak import SoakSettings, run_soak
from birdgen.schema import LIMITS
from birdgen.server import TritonServer

pytestmark = pytest.mark.triton
REQUESTS = int(os.environ.get("BIRDGEN_SOAK_REQUESTS", "300"))
# Generous bounds that catch a leak, not noise (measured: stubs +1.2 MiB over 300 requests, and
# tritonserver 1.4 x the bytes of the distinct PNGs its response cache took on). 64 MiB over 300
# requests is a leak of 220 KB a request, over 3000 of 22 KB: a 256² PNG is ~150 KB.
DRIFT_SLACK_MIB = 64.0
# What Triton's response cache may hold per byte of result (its entry holds every output and the
# metadata too); measured 1.4.
CACHE_OVERHEAD = 2.0


def test_a_soak_ends_in_results_or_overload_refusals_and_memory_stays_flat(
    server: TritonServer, tmp_path: Path
) -> None:
    settings = SoakSettings(requests=REQUESTS, concurrency=48, warmup=24)
    assert settings.concurrency <= LIMITS.serving.max_queue_size
    figures = asyncio.run(run_soak(server.grpc_url, server.pid, settings, metrics_url=server.metrics_url))
    figures["machine"] = {"description": f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores"}
    (tmp_path / "soak.json").write_text(json.dumps(figures, indent=2))
    print(f"soak figures: {tmp_path / 'soak.json'}")

    assert figures["errors"] == {} and figures["warmup"]["errors"] == {}
    assert figures["results"] + sum(figures["rejections"].values()) == REQUESTS and figures["results"]
    # The only refusal 48 clients can meet: a queue of 64 is never full, but on a starved machine a
    # request may wait past limits.yaml's 30 s queue timeout.
    refusals = {**figures["rejections"], **figures["warmup"]["rejections"]}
    assert set(refusals) <= {"UNAVAILABLE: Request timeout expired"}, refusals
    if not figures["warmup"]["rejections"]:  # every warm-up result is cached: its repeats are hits
        assert figures["cache_hits"] >= figures["repeats"] > 0

    rss = figures["rss_mib"]
    assert rss["drift"]["stubs"] <= DRIFT_SLACK_MIB, rss
    assert rss["drift"]["tritonserver"] <= CACHE_OVERHEAD * figures["cached_mib"] + DRIFT_SLACK_MIB, rss
