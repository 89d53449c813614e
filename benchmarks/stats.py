"""The numbers a benchmark point reports, from raw per-request samples: latency percentiles,
throughput, and the split of a served request's time into compute and Triton's overhead.

Pure functions over plain lists and dicts, so the maths is tested on synthetic data without a server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

PERCENTILES = (50, 95, 99)


@dataclass(frozen=True)
class Sample:
    """One request as the load generator saw it: when it was sent and answered (perf_counter
    seconds), whether it succeeded, and the served metadata's `timings_ms` (empty on errors)."""

    start: float
    end: float
    ok: bool
    timings_ms: Mapping[str, float]

    @property
    def latency_ms(self) -> float:
        return (self.end - self.start) * 1000


def latency_summary(latencies_ms: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99 (linear interpolation, numpy's default), mean, min and max in milliseconds."""
    values = np.asarray(latencies_ms, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no successful requests to summarise")
    summary = {f"p{p}_ms": float(np.percentile(values, p)) for p in PERCENTILES}
    summary.update(mean_ms=float(values.mean()), min_ms=float(values.min()), max_ms=float(values.max()))
    return summary


def throughput(samples: Sequence[Sample]) -> float:
    """Completed requests per second over the window from the first send to the last answer.

    Why that window: in a closed loop every worker is busy from the first send to its last answer,
    so this is the rate the server sustained; errors are not counted as completed.
    """
    done = [s for s in samples if s.ok]
    if not done:
        return 0.0
    window = max(s.end for s in samples) - min(s.start for s in samples)
    return len(done) / window if window > 0 else float("inf")


def point_summary(samples: Sequence[Sample], concurrency: int) -> dict[str, Any]:
    """Everything results.json keeps for one (scenario, concurrency) point."""
    ok = [s for s in samples if s.ok]
    return {
        "concurrency": concurrency,
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "throughput_rps": throughput(samples),
        **latency_summary([s.latency_ms for s in ok]),
        "timings_ms": mean_timings(ok),
    }


def mean_timings(samples: Sequence[Sample]) -> dict[str, float]:
    """The served metadata's timings_ms, averaged key by key over the requests that have them."""
    keys = sorted({k for s in samples for k in s.timings_ms})
    return {k: float(np.mean([s.timings_ms[k] for s in samples if k in s.timings_ms])) for k in keys}


def overhead_breakdown(
    latency_ms: float,
    timings_ms: Mapping[str, float],
    engine_ms: float | None,
    stage_queue_ms: float | None,
) -> dict[str, float | None]:
    """Split a served request (mean latency at concurrency 1) into compute and Triton's overhead.

    - entry_own_ms: the entry model's own work (prompt, tokenizers, scheduler maths, image encoding):
      its `total` minus the time it spent in stage-model calls (`stage_calls`).
    - engine_ms: time inside the stage engines (the stage models' engine-seconds counter).
    - compute_ms = entry_own_ms + engine_ms: what the request needs wherever it runs.
    - triton_overhead_ms = latency - compute: gRPC, the entry's queue, BLS calls, transfers to the
      python-backend stubs and the dynamic batchers' queue delay (stage_queue_ms, shown apart as
      it is a setting, not a cost).
    Without the engine counter (a server exported before it existed) the overhead is unknown.
    """
    entry_own = timings_ms["total"] - timings_ms["stage_calls"]
    out: dict[str, float | None] = {
        "latency_ms": latency_ms,
        "entry_total_ms": timings_ms["total"],
        "stage_calls_ms": timings_ms["stage_calls"],
        "entry_own_ms": entry_own,
        "engine_ms": engine_ms,
        "stage_queue_ms": stage_queue_ms,
        "grpc_and_entry_queue_ms": latency_ms - timings_ms["total"],
    }
    if engine_ms is None:
        out.update(compute_ms=None, triton_overhead_ms=None, bls_and_transfer_ms=None)
        return out
    out["compute_ms"] = entry_own + engine_ms
    out["triton_overhead_ms"] = latency_ms - entry_own - engine_ms
    out["bls_and_transfer_ms"] = timings_ms["stage_calls"] - engine_ms - (stage_queue_ms or 0.0)
    return out
