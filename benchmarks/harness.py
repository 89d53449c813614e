"""`birdgen bench`: one run measures birdgen served by Triton, the diffusers baselines and the compute
floor on the same machine, and writes results.json, results.md and plots under one folder.

Order matters on a small machine: the floor and the baselines run before the server starts (they
would compete for the same cores), then each scenario is swept over the concurrency levels. After
every step results.json is rewritten, so an interrupted run resumes where it stopped (what is already
measured is skipped unless --force).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from birdgen.benchmarks import monitor, stats
from birdgen.benchmarks.load import fresh_seeds, run_point, served_call
from birdgen.benchmarks.report import RESULTS_JSON, write_json, write_report
from birdgen.benchmarks.scenarios import (
    BASELINE_MODES,
    CPU_CONCURRENCY,
    CPU_SCENARIOS,
    GPU_CONCURRENCY,
    GPU_SCENARIOS,
    WORK_DIR,
    Scenario,
    parse_scenarios,
)
from birdgen.client import AsyncBirdClient, ResponseCache, RetryPolicy
from birdgen.contracts import ANIMATION_MODEL, IMAGE_MODEL

RESULTS_ROOT = Path("benchmarks/results")
SCHEMA = 1
Log = Callable[[str], None]


@dataclass
class BenchSettings:
    """What one run measures. `birdgen bench --help` explains the options; baseline_warmup (untimed
    diffusers calls, one more under torch.compile) and timeout_s (per request) have none."""

    scenarios: list[Scenario] | None = None  # None: the device's default set
    concurrency: list[int] | None = None  # None: the device's default levels
    requests: int | None = None
    duration_s: float | None = None
    warmup: int = 3
    baselines: list[str] = field(default_factory=lambda: list(BASELINE_MODES))
    baseline_requests: int = 10
    baseline_warmup: int = 2
    compile_on_cpu: bool = False
    preset: str = "mini"
    model_dir: Path | None = None
    repository: Path | None = None
    engine: str | None = None  # None: torch on a GPU, onnxruntime on a CPU
    url: str | None = None
    metrics_url: str | None = None
    redis_url: str | None = None
    out: Path | None = None
    work_dir: Path = WORK_DIR
    force: bool = False
    timeout_s: float = 600.0


# -- the device and the model -------------------------------------------------------------------------------


def device_info() -> dict[str, Any]:
    """Name (the results folder), kind (cuda / cpu), a description and the library versions."""
    import torch

    versions = {name: metadata.version(name) for name in ("torch", "diffusers", "onnxruntime")}
    cores = len(os.sched_getaffinity(0))
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        slug = re.sub(r"[^a-z0-9]+", "-", props.name.lower()).strip("-").removeprefix("nvidia-")
        description = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {cores} CPU cores"
        return {"name": slug, "kind": "cuda", "description": description, "cores": cores, **versions}
    cpu = platform.processor() or "CPU"
    with contextlib.suppress(OSError):
        names = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    description = f"{cpu}, {cores} cores, no GPU"
    return {"name": f"cpu-{cores}c", "kind": "cpu", "description": description, "cores": cores, **versions}


def model_folder(settings: BenchSettings, log: Log) -> Path:
    """--model-dir, or the preset's random-weight folder under the work dir (built once)."""
    if settings.model_dir is not None:
        return Path(settings.model_dir)
    from birdgen.tiny_model import write_tiny_model

    folder = settings.work_dir / f"{settings.preset}-sdxl-turbo"
    if not (folder / "model_index.json").is_file():
        log(f"building the {settings.preset} preset into {folder}")
        write_tiny_model(folder, preset=settings.preset)
    return folder


def load_previous(path: Path, model: dict[str, Any], device: str, log: Log) -> dict[str, Any] | None:
    """The earlier results in `path` if they are for this model folder on this device, else None."""
    if not path.is_file():
        return None
    previous = json.loads(path.read_text())
    same = previous.get("schema") == SCHEMA and previous.get("device", {}).get("name") == device
    if not same or {k: previous.get("model", {}).get(k) for k in model} != model:
        log(f"{path} holds another model, device or format: starting afresh")
        return None
    log(f"resuming {path}: what is measured already is skipped (--force measures again)")
    return previous


# -- the served side ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """The server measured: gRPC address, and where known its metrics URL (time split), process group
    (RSS) and engine kind."""

    url: str
    metrics_url: str | None
    pgid: int | None
    engine: str | None


@contextlib.contextmanager
def served(settings: BenchSettings, model_dir: Path, device: str, log: Log) -> Iterator[Target]:
    """--url's server as it is, or the model exported (skipped when up to date) and served here;
    `device` is device_info()'s kind, which picks the default engine."""
    if settings.url is not None:
        yield Target(settings.url, settings.metrics_url, None, None)
        return
    from birdgen.export.exporter import export_repository
    from birdgen.manifest import core_models
    from birdgen.server import TritonServer

    engine = settings.engine or ("torch" if device == "cuda" else "onnxruntime")
    suffix = "" if engine == "onnxruntime" else f"-{engine}"
    repository = settings.repository or settings.work_dir / f"{model_dir.name}-repository{suffix}"
    manifest = export_repository(model_dir, repository, engine, progress=lambda m: log(f"export: {m}"))
    with TritonServer(repository, model_control="explicit", load_models=core_models(repository)) as server:
        log(f"tritonserver ready at {server.grpc_url}")
        yield Target(server.grpc_url, server.metrics_url, server.pid, manifest["engine"])


@contextlib.contextmanager
def redis_for_cache(settings: BenchSettings) -> Iterator[str | None]:
    """--redis-url, else a throwaway redis-server on a free localhost port; None if there is none."""
    if settings.redis_url is not None:
        yield settings.redis_url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    import redis

    from birdgen.server import free_port

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="birdgen-bench-redis-") as folder:
        command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        process = subprocess.Popen([*command, "--dir", folder], stdout=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        try:
            client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(redis.ConnectionError):
                    if client.ping():
                        break
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {port} did not start")
                time.sleep(0.02)
            client.close()
            yield url
        finally:
            process.terminate()
            process.wait(timeout=10)


@dataclass
class CacheSetup:
    """The Redis response cache for the `cached` scenario, its own metrics registry (hits counted
    per point) and the seeds it holds."""

    cache: ResponseCache
    registry: Any
    seeds: Iterator[int]

    def hits(self) -> float:
        return self.registry.get_sample_value("birdgen_cache_hits_total", {"kind": "image"}) or 0.0


async def _requests(
    target: Target,
    scenario: Scenario,
    seeds: Iterator[int],
    concurrency: int,
    settings: BenchSettings,
    *,
    requests: int | None,
    duration_s: float | None = None,
    cache: ResponseCache | None = None,
    on_done: Callable[[stats.Sample], None] | None = None,
) -> tuple[list[stats.Sample], list[str]]:
    """One client (one gRPC channel, no retries: a failure is counted, not hidden) running a point."""
    async with AsyncBirdClient(
        target.url, deadline_s=settings.timeout_s, retry=RetryPolicy(max_attempts=1), cache=cache
    ) as client:
        call = served_call(client, scenario)
        return await run_point(
            call, seeds, concurrency, requests=requests, duration_s=duration_s, on_done=on_done
        )


def measure_point(
    target: Target,
    scenario: Scenario,
    concurrency: int,
    settings: BenchSettings,
    seeds: Iterator[int],
    cache: CacheSetup | None = None,
) -> dict[str, Any]:
    """One point: an untimed round (one request per worker, so new batch sizes meet the engines
    first), then the measured requests with resources polled and, at concurrency 1, the time split."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    store = cache.cache if cache else None
    asyncio.run(_requests(target, scenario, seeds, concurrency, settings, requests=concurrency, cache=store))
    split = target.metrics_url is not None and concurrency == 1 and scenario.kind != "cached"
    before = monitor.scrape(target.metrics_url) if split and target.metrics_url else {}
    hits_before = cache.hits() if cache else 0.0
    total = max(settings.requests, concurrency) if settings.requests else None
    columns = (
        TextColumn(f"{scenario.name} @{concurrency}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    client_cpu = time.process_time()
    with monitor.ResourceMonitor(target.pgid) as resources, Progress(*columns, transient=True) as bar:
        task = bar.add_task("requests", total=total)
        samples, errors = asyncio.run(
            _requests(
                target,
                scenario,
                seeds,
                concurrency,
                settings,
                requests=settings.requests,
                duration_s=settings.duration_s,
                cache=store,
                on_done=lambda _: bar.advance(task),
            )
        )
    if not any(sample.ok for sample in samples):
        raise RuntimeError(f"{scenario.name} at concurrency {concurrency}: every request failed: {errors}")
    point = stats.point_summary(samples, concurrency)
    point["resources"] = resources.summary()
    # What the load generator itself took from the machine's cores (it shares them with the server).
    point["resources"]["client_cpu_ms_per_request"] = (time.process_time() - client_cpu) * 1000 / len(samples)
    point["error_messages"] = errors
    if cache:
        point["cache_hits"] = cache.hits() - hits_before
    if split and target.metrics_url:
        entry = ANIMATION_MODEL if scenario.kind == "animation" else IMAGE_MODEL
        costs = monitor.per_request_costs(before, monitor.scrape(target.metrics_url), entry)
        point["overhead"] = stats.overhead_breakdown(
            point["mean_ms"], point["timings_ms"], costs["engine_ms"], costs["stage_queue_ms"]
        )
    return point


def warm_up(target: Target, scenario: Scenario, settings: BenchSettings, seeds: Iterator[int]) -> str:
    """`warmup` requests one at a time (first calls at a new size are slow); the served model version."""
    from birdgen.client import BirdClient

    version = ""
    with BirdClient(target.url, deadline_s=settings.timeout_s) as client:
        for _ in range(max(settings.warmup, 1)):
            request = scenario.request(next(seeds))
            generate = client.generate_animation if scenario.kind == "animation" else client.generate_image
            version = generate(request).metadata["model_version"]
    return version


# -- the run ------------------------------------------------------------------------------------------------


class Bench:
    """One `birdgen bench` run; `run()` returns the results it wrote."""

    def __init__(self, settings: BenchSettings, log: Log = print) -> None:
        self.settings = settings
        self.log = log
        self.results: dict[str, Any] = {}
        self.out = RESULTS_ROOT

    def run(self) -> dict[str, Any]:
        s = self.settings
        device = device_info()
        on_gpu = device["kind"] == "cuda"
        scenarios = s.scenarios or parse_scenarios(",".join(GPU_SCENARIOS if on_gpu else CPU_SCENARIOS))
        levels = s.concurrency or list(GPU_CONCURRENCY if on_gpu else CPU_CONCURRENCY)
        if s.requests is None and s.duration_s is None:
            s.requests = 20
        self.out = s.out or RESULTS_ROOT / device["name"]
        model_dir = model_folder(s, self.log)
        model = {"dir": str(model_dir), "preset": None if s.model_dir else s.preset}
        results = (
            None if s.force else load_previous(self.out / RESULTS_JSON, model, device["name"], self.log)
        ) or {
            "schema": SCHEMA,
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "model": model,
            "scenarios": {},
        }
        results["device"] = {**results.get("device", {}), **device}
        per_point = f"{s.requests} requests" if s.requests else f"{s.duration_s:g} s"
        results["settings"] = {"per_point": per_point, "warmup": s.warmup, "concurrency": levels}
        self.results = results
        for scenario in scenarios:
            entry = results["scenarios"].setdefault(scenario.name, {})
            entry["request"] = scenario.request(0) | {"seed": "distinct per request"}
        self.floor(scenarios, model_dir)
        self.baselines(scenarios, model_dir, device["kind"])
        with served(s, model_dir, device["kind"], self.log) as target:
            results["model"]["engine"] = target.engine or results["model"].get("engine")
            for scenario in scenarios:
                self.sweep(target, scenario, levels)
        paths = write_report(results, self.out)
        self.log("wrote " + ", ".join(map(str, paths)))
        return results

    def save(self) -> None:
        write_json(self.results, self.out)

    def floor(self, scenarios: list[Scenario], model_dir: Path) -> None:
        """FLOPs per request (the meta-device count is instant) and the machine's matrix throughput."""
        from birdgen.benchmarks.baselines import matmul_flops_per_s, request_flops

        device = self.results["device"]
        if "matmul" not in device or self.settings.force:
            self.log("measuring the matrix throughput")
            device["matmul"] = matmul_flops_per_s(device["kind"])
        for scenario in (s for s in scenarios if s.kind != "cached"):  # a cache hit computes nothing
            entry = self.results["scenarios"][scenario.name]
            entry["flops"] = request_flops(model_dir, scenario)
            entry["floor_ms"] = entry["flops"]["total"] / device["matmul"]["flops_per_s"] * 1000
        self.save()

    def baselines(self, scenarios: list[Scenario], model_dir: Path, device: str) -> None:
        """diffusers, one request at a time, before the server starts (so they do not share the cores)."""
        from birdgen.benchmarks.baselines import time_baseline

        s = self.settings
        for scenario, mode in itertools.product(scenarios, s.baselines):
            done = self.results["scenarios"][scenario.name].setdefault("baselines", {})
            if scenario.kind == "cached":
                continue  # a cache hit has no diffusers counterpart
            if mode in done and "skipped" not in done[mode] and not s.force:
                continue
            if mode == "compile" and device == "cpu" and not s.compile_on_cpu:
                done[mode] = {"skipped": "torch.compile baselines run on GPUs (--compile-on-cpu to force)"}
                continue
            self.log(f"diffusers {mode}: {scenario.name} ({s.baseline_requests} requests)")
            warmup = s.baseline_warmup + (1 if mode == "compile" else 0)
            done[mode] = time_baseline(
                model_dir, scenario, mode, device, warmup=warmup, repeats=s.baseline_requests
            )
            self.save()

    def sweep(self, target: Target, scenario: Scenario, levels: list[int]) -> None:
        entry = self.results["scenarios"][scenario.name]
        points = entry.setdefault("points", {})
        todo = [c for c in levels if str(c) not in points or self.settings.force]
        if not todo:
            return
        seeds = fresh_seeds()
        entry.pop("errors", None)
        with contextlib.ExitStack() as stack:
            cache = None
            if scenario.kind == "cached":
                cache = self.cache_setup(stack, target, scenario, seeds, max(todo))
                if cache is None:
                    entry["errors"] = ["no redis-server here and no --redis-url: cached scenario not run"]
                    self.save()
                    return
            else:
                version = warm_up(target, scenario, self.settings, seeds)
                if entry.get("model_version", version) != version:
                    self.log(f"{scenario.name}: the server now serves {version}; earlier points dropped")
                    points.clear()
                    todo = levels
                entry["model_version"] = self.results["model"]["model_version"] = version
            for concurrency in todo:
                point_seeds = cache.seeds if cache else seeds
                point = measure_point(target, scenario, concurrency, self.settings, point_seeds, cache)
                points[str(concurrency)] = point
                self.log(
                    f"{scenario.name} @{concurrency}: p50 {point['p50_ms']:.1f} ms, "
                    f"p99 {point['p99_ms']:.1f} ms, {point['throughput_rps']:.2f} req/s, "
                    f"{point['errors']} errors"
                )
                self.save()

    def cache_setup(
        self,
        stack: contextlib.ExitStack,
        target: Target,
        scenario: Scenario,
        seeds: Iterator[int],
        count: int,
    ) -> CacheSetup | None:
        """A Redis cache holding `count` distinct answers (each worker asks for one), or None."""
        from prometheus_client import CollectorRegistry

        url = stack.enter_context(redis_for_cache(self.settings))
        if url is None:
            return None
        registry = CollectorRegistry()
        cache = ResponseCache(url, registry=registry)
        stack.callback(cache.close)
        held = [next(seeds) for _ in range(count)]
        asyncio.run(_requests(target, scenario, iter(held), 1, self.settings, requests=count, cache=cache))
        return CacheSetup(cache, registry, itertools.cycle(held))
