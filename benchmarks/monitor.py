"""What the server did during a benchmark point: Triton's Prometheus counters (engine time, queue
time, requests per model) and the machine's resources (GPU utilisation and memory, server RSS).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import threading
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from birdgen.contracts import ANIMATION_MODEL, ANIMATION_STREAM_MODEL, IMAGE_MODEL
from birdgen.ensemble.triton_model import ENGINE_SECONDS
from birdgen.process_group import live_group_members

ENTRY_MODELS = (IMAGE_MODEL, ANIMATION_MODEL, ANIMATION_STREAM_MODEL)
Metrics = dict[tuple[str, frozenset[tuple[str, str]]], float]
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> Metrics:
    """Prometheus text -> {(sample name, labels): value}, names exactly as Triton writes them.

    Why not prometheus_client's parser: it renames counter samples to `<name>_total`.
    """
    metrics: Metrics = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            name, labels, value = match.groups()
            metrics[(name, frozenset(_LABEL.findall(labels or "")))] = float(value)
    return metrics


def scrape(url: str, timeout_s: float = 5.0) -> Metrics:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # localhost: no proxy
    with opener.open(url, timeout=timeout_s) as response:
        return parse_metrics(response.read().decode("utf-8"))


def counter_delta(before: Metrics, after: Metrics, name: str, models: Iterable[str] | None = None) -> float:
    """How much counter `name` grew, summed over its label sets (only `models`' when given)."""
    wanted = None if models is None else set(models)
    total = 0.0
    for (sample, labels), value in after.items():
        model = dict(labels).get("model")
        if sample != name or (wanted is not None and model not in wanted):
            continue
        total += value - before.get((sample, labels), 0.0)
    return total


def stage_models(metrics: Metrics) -> set[str]:
    """The models in the metrics that are not entry models (the engine stages, family UNets too)."""
    return {dict(labels)["model"] for _, labels in metrics if "model" in dict(labels)} - set(ENTRY_MODELS)


def per_request_costs(before: Metrics, after: Metrics, entry: str) -> dict[str, float | None]:
    """Engine and stage-queue milliseconds per `entry` request between two scrapes.

    engine_ms is None when the server has no engine counter (exported before birdgen had one).
    """
    requests = counter_delta(before, after, "nv_inference_request_success", [entry])
    if requests <= 0:
        raise ValueError(f"no successful {entry} requests between the two scrapes")
    stages = stage_models(after)
    has_engine = any(name == ENGINE_SECONDS for name, _ in after)
    engine = counter_delta(before, after, ENGINE_SECONDS, stages) * 1000 / requests if has_engine else None
    queue = counter_delta(before, after, "nv_inference_queue_duration_us", stages) / 1000 / requests
    return {"requests": requests, "engine_ms": engine, "stage_queue_ms": queue}


class ResourceMonitor:
    """Polls GPU utilisation / memory (nvidia-smi) and the server's resident memory in a thread.

    RSS is the sum over the server's process group (tritonserver and its python-backend stubs);
    GPU figures are for the whole device, None where there is no nvidia-smi.
    """

    def __init__(self, server_pgid: int | None, interval_s: float = 0.5) -> None:
        self.server_pgid = server_pgid
        self.interval_s = interval_s
        self.nvidia_smi = shutil.which("nvidia-smi")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.gpu_util: list[float] = []
        self.gpu_mem_mib: list[float] = []
        self.rss_mib: list[float] = []

    def __enter__(self) -> ResourceMonitor:
        self._thread = threading.Thread(target=self._run, name="bench-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while True:
            self.poll()
            if self._stop.wait(self.interval_s):
                return

    def poll(self) -> None:
        if self.server_pgid is not None:
            self.rss_mib.append(group_rss_mib(self.server_pgid))
        if self.nvidia_smi:
            with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
                query = "--query-gpu=utilization.gpu,memory.used"
                out = subprocess.run(
                    [self.nvidia_smi, query, "--format=csv,noheader,nounits", "--id=0"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                    check=True,
                ).stdout
                util, mem = (float(v) for v in out.strip().split(","))
                self.gpu_util.append(util)
                self.gpu_mem_mib.append(mem)

    def summary(self) -> dict[str, Any]:
        return {
            "gpu_util_mean_pct": sum(self.gpu_util) / len(self.gpu_util) if self.gpu_util else None,
            "gpu_mem_peak_mib": max(self.gpu_mem_mib, default=None),
            "server_rss_peak_mib": max(self.rss_mib, default=None),
        }


def group_rss_mib(pgid: int) -> float:
    """Resident memory of every live process in group `pgid`, in MiB (processes gone meanwhile skipped)."""
    total_kib = 0
    for pid in live_group_members(pgid):
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
    return total_kib / 1024
