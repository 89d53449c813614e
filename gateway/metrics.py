"""The gateway's Prometheus metrics, on its own registry (served at GET /metrics).

One registry per app so that two apps in one process (tests, a restart) never collide; the Redis
response cache's counters (`birdgen_cache_{hits,misses,errors}_total`, client/cache.py) register on
the same registry. docker/grafana's dashboard reads these names; tests check it reads no other.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Generation takes from milliseconds (a cache hit) to tens of seconds (a long clip on CPU).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass(frozen=True)
class GatewayMetrics:
    registry: CollectorRegistry
    requests: Counter  # by route (the path template) and HTTP status
    latency: Histogram  # seconds, by route
    rate_limited: Counter  # 429s, by route
    batch_items: Counter  # batch items finished, by outcome (done, failed)
    batch_jobs_running: Gauge  # jobs this gateway is working on


def gateway_metrics() -> GatewayMetrics:
    registry = CollectorRegistry()
    return GatewayMetrics(
        registry,
        Counter("birdgen_gateway_requests", "HTTP requests answered", ["route", "status"], registry=registry),
        Histogram(
            "birdgen_gateway_request_duration_seconds",
            "Time from request to response, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ),
        Counter(
            "birdgen_gateway_rate_limited",
            "Requests refused with 429 by the rate limit",
            ["route"],
            registry=registry,
        ),
        Counter("birdgen_gateway_batch_items", "Batch items finished", ["outcome"], registry=registry),
        Gauge("birdgen_gateway_batch_jobs_running", "Batch jobs this gateway works on", registry=registry),
    )
