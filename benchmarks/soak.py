"""The soak: thousands of small image requests at high concurrency against one running server, to
show that it neither fails nor grows under sustained load (docs/reliability.md, "Overload").

Every request ends in one of three ways: a result, a refusal for load (ServerOverloadedError: the
entry model's bounded queue was full, or the request waited past the queue timeout), or anything
else, which is an error the soak must not have. The server's resident memory is read before the
warm-up, after it, at every tenth of the run and at the end, apart for the tritonserver process and
for its python-backend stubs (summed). The drift is end minus after-warm-up, so what the warm-up
allocates once (engine arenas at new batch sizes) is not counted as growth. tritonserver's own drift
includes Triton's response cache filling with the run's distinct results (bounded by its
--cache-config size, 256 MiB in birdgen.server): the figures carry `cached_mib`, the bytes of those
results, so growth past that is not the cache.

`run_soak` is what tests/test_soak.py runs against the test server (a few hundred requests);
`python -m birdgen.benchmarks.soak` builds the tiny preset, exports and serves it, runs the long soak
and writes benchmarks/results/soak-<machine>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from birdgen.benchmarks.monitor import counter_delta, scrape
from birdgen.benchmarks.scenarios import SCENARIOS, WORK_DIR
from birdgen.benchmarks.stats import latency_summary
from birdgen.client import AsyncBirdClient, BirdgenError, RetryPolicy, ServerOverloadedError
from birdgen.contracts import ANIMATION_MODEL, ANIMATION_STREAM_MODEL, IMAGE_MODEL, MOTION_UNET
from birdgen.process_group import live_group_members

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
# "[request id: <id_unknown>] Exceeds maximum queue size" -> "Exceeds maximum queue size"
_REQUEST_ID = re.compile(r"^\[request id: [^\]]*\]\s*")


@dataclass(frozen=True)
class SoakSettings:
    """How much load: `requests` measured requests from `concurrency` closed-loop workers on one
    gRPC channel, after `warmup` requests at the same concurrency. Every `repeat_every`-th request
    repeats a warm-up seed, which Triton's response cache answers; the others have seeds no earlier
    run used. A refused request is not retried by the client: its worker waits the client's overload
    backoff (full jitter) and sends its next request."""

    requests: int = 3000
    concurrency: int = 48
    warmup: int = 48
    repeat_every: int = 5
    scenario: str = "image-256-1step"
    deadline_s: float = 120.0

    def __post_init__(self) -> None:
        for name in ("requests", "concurrency", "warmup", "repeat_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"invalid {name!r}: got {getattr(self, name)}; allowed: an integer >= 1")
        if self.scenario not in SCENARIOS or SCENARIOS[self.scenario].kind != "image":
            images = [name for name, s in SCENARIOS.items() if s.kind == "image"]
            raise ValueError(f"invalid 'scenario': got {self.scenario!r}; allowed: {', '.join(images)}")


@dataclass
class _Tally:
    latencies_ms: list[float]
    rejections: Counter[str]
    errors: Counter[str]
    done: int = 0
    result_bytes: int = 0  # of the results with fresh seeds: what Triton's response cache took on


Rss = dict[str, float]  # MiB: "tritonserver", "stubs", "total"


def rejection_code(exc: ServerOverloadedError) -> str:
    """'UNAVAILABLE: Exceeds maximum queue size': the gRPC code and Triton's message, without the
    request id Triton puts in front."""
    detail = _REQUEST_ID.sub("", exc.detail)
    message, _, status = detail.rpartition(" (")
    return f"{status.rstrip(')')}: {message}" if message else detail


async def run_soak(
    url: str,
    server_pgid: int | None,
    settings: SoakSettings,
    *,
    metrics_url: str | None = None,
    on_done: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """The soak against the server at `url`; returns its figures (see the module docstring).

    `server_pgid` is the server's process group (birdgen.server.TritonServer.pid) for the RSS
    readings, None when the server is elsewhere; with `metrics_url` the response-cache hits of the
    entry model are counted from Triton's metrics.
    """
    scenario = SCENARIOS[settings.scenario]
    retry = RetryPolicy(max_attempts=1)  # a refusal is counted, not hidden
    backoff = RetryPolicy()  # ... and its worker then pauses as the default client would
    fresh = itertools.count(secrets.randbits(40) << 20)
    warm_seeds = [next(fresh) for _ in range(settings.warmup)]
    repeated = set(warm_seeds)
    rss: dict[str, Rss | None] = {"start": server_rss(server_pgid)}
    load_start = os.getloadavg()  # the figures are only as quiet as the machine was
    trend: list[float] = []
    async with AsyncBirdClient(url, deadline_s=settings.deadline_s, retry=retry) as client:

        async def send(seeds: Iterator[int], tally: _Tally, every: int) -> None:
            for seed in seeds:
                start = time.perf_counter()
                try:
                    image = await client.generate_image(scenario.request(seed))
                    tally.latencies_ms.append((time.perf_counter() - start) * 1000)
                    tally.result_bytes += 0 if seed in repeated else len(image.data)
                except ServerOverloadedError as exc:
                    tally.rejections[rejection_code(exc)] += 1
                    await asyncio.sleep(backoff.backoff(0, overloaded=True))
                except BirdgenError as exc:
                    tally.errors[f"{type(exc).__name__}: {exc}"] += 1
                tally.done += 1
                if every and tally.done % every == 0 and (reading := server_rss(server_pgid)):
                    trend.append(reading["total"])
                if on_done is not None:
                    on_done(tally.done)

        async def closed_loop(seeds: list[int], every: int = 0) -> tuple[_Tally, float]:
            tally = _Tally([], Counter(), Counter())
            shared = iter(seeds)
            start = time.perf_counter()
            workers = min(settings.concurrency, len(seeds))
            await asyncio.gather(*(send(shared, tally, every) for _ in range(workers)))
            return tally, time.perf_counter() - start

        warm_up, _ = await closed_loop(warm_seeds)
        rss["after_warmup"] = server_rss(server_pgid)
        before = scrape(metrics_url) if metrics_url else None
        seeds = [
            warm_seeds[i % len(warm_seeds)] if (i + 1) % settings.repeat_every == 0 else next(fresh)
            for i in range(settings.requests)
        ]
        tally, elapsed = await closed_loop(seeds, every=max(1, settings.requests // 10))
        rss["end"] = server_rss(server_pgid)
        after = scrape(metrics_url) if metrics_url else None
    hits = None
    if before is not None and after is not None:
        hits = counter_delta(before, after, "nv_cache_num_hits_per_model", [IMAGE_MODEL])
    latency = latency_summary(tally.latencies_ms) if tally.latencies_ms else {}
    return {
        "settings": asdict(settings),
        "request": scenario.request(0) | {"seed": "distinct per request; every repeat_every-th a warm-up's"},
        "requests": settings.requests,
        "results": len(tally.latencies_ms),
        "repeats": len(seeds) - len(set(seeds) - repeated),
        "cache_hits": hits,
        "rejections": dict(tally.rejections),
        "errors": dict(tally.errors),
        "warmup": {
            "requests": settings.warmup,
            "results": len(warm_up.latencies_ms),
            "rejections": dict(warm_up.rejections),
            "errors": dict(warm_up.errors),
        },
        "duration_s": round(elapsed, 2),
        "throughput_rps": round(len(tally.latencies_ms) / elapsed, 2),
        "latency_ms": {k: round(v, 1) for k, v in latency.items()},
        "rss_mib": rss_figures(rss["start"], rss["after_warmup"], rss["end"], trend),
        "cached_mib": round(tally.result_bytes / 2**20, 1),
        "load_average": {"start": load_start, "end": os.getloadavg()},
    }


def server_rss(pgid: int | None) -> Rss | None:
    """Resident memory of the server's process group, in MiB: the tritonserver process (the group
    leader, which holds Triton's response cache) and its python-backend stubs; None without a group."""
    if pgid is None:
        return None
    by_pid = {pid: _vm_rss_kib(pid) for pid in live_group_members(pgid)}
    server = by_pid.pop(pgid, 0) / 1024
    stubs = sum(by_pid.values()) / 1024
    return {"tritonserver": server, "stubs": stubs, "total": server + stubs}


def _vm_rss_kib(pid: int) -> int:
    """VmRSS of `pid` in KiB; 0 when it is gone or unreadable (a stub that exited meanwhile)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def rss_figures(start: Rss | None, warm: Rss | None, end: Rss | None, trend: list[float]) -> dict[str, Any]:
    """The readings, rounded, and the drift (end - after warm-up) per part and in total."""
    if start is None or warm is None or end is None:
        return {}
    figures: dict[str, Any] = {
        name: {k: round(v, 1) for k, v in reading.items()}
        for name, reading in (("start", start), ("after_warmup", warm), ("end", end))
    }
    figures["drift"] = {k: round(end[k] - warm[k], 1) for k in end}
    figures["drift_pct"] = round(100 * (end["total"] - warm["total"]) / warm["total"], 2)
    figures["trend_total"] = [round(v, 1) for v in trend]
    return figures


def machine() -> dict[str, Any]:
    """The machine, as the benchmark harness names it (`cpu-2c`, `h200`, ...), with a description."""
    from birdgen.benchmarks.harness import device_info

    device = device_info()
    return {k: device[k] for k in ("name", "kind", "description", "cores")}


def main(argv: list[str] | None = None) -> int:
    """`python -m birdgen.benchmarks.soak`: the tiny preset, exported and served here (or --url's
    server), soaked; the figures go to benchmarks/results/soak-<machine>.json (or --out)."""
    parser = argparse.ArgumentParser(prog="python -m birdgen.benchmarks.soak", description=main.__doc__)
    defaults = SoakSettings()
    parser.add_argument("--requests", type=int, default=defaults.requests)
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--repeat-every", type=int, default=defaults.repeat_every)
    parser.add_argument("--scenario", default=defaults.scenario)
    parser.add_argument("--url", help="soak this running server (gRPC host:port); no RSS readings then")
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR, help="the built model and repository")
    parser.add_argument(
        "--out", type=Path, help="the JSON file (default benchmarks/results/soak-<machine>.json)"
    )
    args = parser.parse_args(argv)
    settings = SoakSettings(
        requests=args.requests,
        concurrency=args.concurrency,
        warmup=args.warmup,
        repeat_every=args.repeat_every,
        scenario=args.scenario,
    )
    host = machine()
    out = args.out or RESULTS_ROOT / f"soak-{host['name']}.json"
    figures = {"machine": host, **_soak(settings, args.work_dir, args.url)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    shown = ("requests", "results", "rejections", "errors", "latency_ms", "rss_mib", "cached_mib")
    print(json.dumps({k: figures[k] for k in shown}, indent=2))
    print(f"wrote {out}")
    return 1 if figures["errors"] else 0


def _soak(settings: SoakSettings, work_dir: Path, url: str | None) -> dict[str, Any]:
    """`url`'s server as it is, or the tiny preset exported (skipped when up to date) and served
    with the bundled limits; a progress bar on the way."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from birdgen.export.exporter import export_repository
    from birdgen.manifest import core_models
    from birdgen.server import TritonServer
    from birdgen.tiny_model import write_tiny_model

    def soak(target: str, pgid: int | None, metrics_url: str | None) -> dict[str, Any]:
        columns = (TextColumn("soak"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, transient=True) as bar:
            task = bar.add_task("requests", total=settings.warmup + settings.requests)
            return asyncio.run(
                run_soak(target, pgid, settings, metrics_url=metrics_url, on_done=lambda _: bar.advance(task))
            )

    if url is not None:
        return soak(url, None, None)
    model_dir = work_dir / "tiny-sdxl-turbo"
    if not (model_dir / "model_index.json").is_file():
        write_tiny_model(model_dir, preset="tiny")
    repository = work_dir / "tiny-sdxl-turbo-repository"
    export_repository(model_dir, repository, progress=lambda m: print(f"export: {m}"))
    clips = (ANIMATION_MODEL, ANIMATION_STREAM_MODEL, MOTION_UNET)
    images = [m for m in core_models(repository) if m not in clips]
    with TritonServer(repository, model_control="explicit", load_models=images) as server:
        figures = soak(server.grpc_url, server.pid, server.metrics_url)
    return figures | {"server": {"repository": str(repository), "models": images}}


if __name__ == "__main__":
    raise SystemExit(main())
