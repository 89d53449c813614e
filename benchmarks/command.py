"""`birdgen bench` options: light to import (the harness and its libraries load when it runs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from birdgen.benchmarks.scenarios import (
    BASELINE_MODES,
    CPU_CONCURRENCY,
    CPU_SCENARIOS,
    GPU_CONCURRENCY,
    GPU_SCENARIOS,
    WORK_DIR,
    parse_scenarios,
)
from birdgen.engines import ENGINE_KINDS  # no torch: a kind imports its libraries when used


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"got {text!r}; allowed: comma-separated integers >= 1, e.g. 1,2,4")
    return values


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip() and m.strip() != "none"]
    if any(m not in BASELINE_MODES for m in modes):
        raise argparse.ArgumentTypeError(f"got {text!r}; allowed: eager, compile (comma-separated) or none")
    return modes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`birdgen bench` options (the CLI module adds the subcommand and calls `main`)."""
    what = parser.add_argument_group("what to measure")
    what.add_argument(
        "--scenarios",
        type=parse_scenarios,
        help=f"comma-separated; default on GPU: {','.join(GPU_SCENARIOS)}; on CPU: {','.join(CPU_SCENARIOS)}",
    )
    what.add_argument(
        "--concurrency",
        type=_int_list,
        help=f"closed-loop clients per point; default GPU {GPU_CONCURRENCY}, CPU {CPU_CONCURRENCY}",
    )
    per_point = what.add_mutually_exclusive_group()
    per_point.add_argument("--requests", type=int, help="requests per point (default 20)")
    per_point.add_argument("--duration-s", type=float, help="seconds per point instead of a request count")
    what.add_argument("--warmup", type=int, default=3, help="untimed requests per scenario first (default 3)")
    what.add_argument(
        "--baselines", type=_modes, default=list(BASELINE_MODES), help="eager,compile (default) or none"
    )
    what.add_argument("--baseline-requests", type=int, default=10, help="timed diffusers calls (default 10)")
    what.add_argument(
        "--compile-on-cpu", action="store_true", help="also run the torch.compile baseline on CPU"
    )
    where = parser.add_argument_group("model and server")
    where.add_argument("--preset", default="mini", help="random-weight model to build when no --model-dir")
    where.add_argument("--model-dir", type=Path, help="a diffusers SDXL folder (real or random weights)")
    where.add_argument("--repository", type=Path, help="export into / serve this repository")
    where.add_argument(
        "--engine",
        choices=ENGINE_KINDS,
        help="engine kind to export and serve (default: torch on a GPU, onnxruntime on a CPU)",
    )
    where.add_argument("--url", help="benchmark this running server (gRPC host:port) instead of starting one")
    where.add_argument("--metrics-url", help="its Prometheus URL, for the time split (with --url)")
    where.add_argument("--redis-url", help="Redis for the cached scenario (default: a local redis-server)")
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<device>)")
    out.add_argument("--work-dir", type=Path, default=WORK_DIR, help="built models and repositories")
    out.add_argument("--force", action="store_true", help="measure again what results.json already has")


def main(args: argparse.Namespace) -> int:
    """Run the benchmark with the parsed options (every BenchSettings field has its option)."""
    from birdgen.benchmarks.harness import Bench, BenchSettings

    fields = set(BenchSettings.__dataclass_fields__)
    Bench(BenchSettings(**{k: v for k, v in vars(args).items() if k in fields})).run()
    return 0
