"""results.json -> the headline numbers, the targets with pass/fail, results.md and the PNG plots.

Everything here reads the results dictionary only, so a report can be rebuilt from a results.json
without re-running anything (`write_report`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PLOTS = ("latency.png", "throughput.png")


@dataclass(frozen=True)
class Target:
    """A goal from the issue / MISSION.md on one headline number; `scenario` None means every
    scenario that has the number."""

    device: str  # "cpu" or "cuda": where the goal applies
    scenario: str | None
    metric: str  # a key of headline()
    op: str  # "<=" or ">="
    limit: float
    text: str


TARGETS = (
    Target("cpu", None, "p50_vs_eager", "<=", 0.8, "served p50 at concurrency 1 ≤ 0.8 × diffusers eager"),
    Target(
        "cpu",
        None,
        "best_rps_vs_eager",
        ">=",
        1.2,
        "throughput at the best concurrency ≥ 1.2 × diffusers eager",
    ),
    Target("cpu", None, "overhead_ms", "<=", 5.0, "Triton's own overhead ≤ 5 ms per request"),
    Target("cuda", "image-512-1step", "p50_ms", "<=", 20.0, "512² 1 step ≤ 20 ms at concurrency 1"),
    Target("cuda", "image-512-1step", "best_rps", ">=", 80.0, "512² 1 step ≥ 80 images/s"),
    Target("cuda", "image-512-1step", "eager_speedup", ">=", 5.0, "≥ 5× faster than diffusers fp16 eager"),
    Target(
        "cuda", "image-512-1step", "compile_speedup", ">=", 2.0, "≥ 2× faster than diffusers + torch.compile"
    ),
    Target("cuda", "image-1024-1step", "p50_ms", "<=", 60.0, "1024² 1 step ≤ 60 ms"),
    Target("cuda", "animation-16f-512-4step", "p50_ms", "<=", 1000.0, "16-frame 512² 4-step clip ≤ 1.0 s"),
    Target("cuda", "cached", "p99_ms", "<=", 5.0, "cached response p99 ≤ 5 ms"),
)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def headline(scenario: dict[str, Any]) -> dict[str, Any]:
    """One scenario's key numbers: latency at concurrency 1, the best throughput, the baselines, the
    floor, the ratios (birdgen ÷ baseline for times, so < 1 is faster) and Triton's overhead."""
    points = scenario.get("points", {})
    first = points.get("1", {})
    best = max(points.values(), key=lambda p: p["throughput_rps"], default={})
    baselines = scenario.get("baselines", {})
    eager, compiled = baselines.get("eager", {}), baselines.get("compile", {})
    p50 = first.get("p50_ms")
    return {
        "p50_ms": p50,
        "p99_ms": first.get("p99_ms"),
        "best_rps": best.get("throughput_rps"),
        "best_concurrency": best.get("concurrency"),
        "eager_p50_ms": eager.get("p50_ms"),
        "eager_rps": eager.get("sequential_rps"),
        "compile_p50_ms": compiled.get("p50_ms"),
        "floor_ms": scenario.get("floor_ms"),
        "p50_vs_eager": _ratio(p50, eager.get("p50_ms")),
        "p50_vs_compile": _ratio(p50, compiled.get("p50_ms")),
        "p50_vs_floor": _ratio(p50, scenario.get("floor_ms")),
        "best_rps_vs_eager": _ratio(best.get("throughput_rps"), eager.get("sequential_rps")),
        "eager_speedup": _ratio(eager.get("p50_ms"), p50),
        "compile_speedup": _ratio(compiled.get("p50_ms"), p50),
        "overhead_ms": first.get("overhead", {}).get("triton_overhead_ms"),
    }


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets for this run's device, each with its value and "pass", "FAIL" or "not measured"."""
    device = results["device"]["kind"]
    rows = []
    for target in (t for t in TARGETS if t.device == device):
        names = [target.scenario] if target.scenario else list(results["scenarios"])
        for name in names:
            scenario = results["scenarios"].get(name)
            value = headline(scenario)[target.metric] if scenario else None
            if value is None and target.scenario is None:
                continue  # a generic goal on a scenario without that number (cached has no baseline)
            status = "not measured"
            if value is not None:
                ok = value <= target.limit if target.op == "<=" else value >= target.limit
                status = "pass" if ok else "FAIL"
            rows.append(
                {
                    "scenario": name,
                    "goal": target.text,
                    "metric": target.metric,
                    "limit": f"{target.op} {target.limit:g}",
                    "value": value,
                    "status": status,
                }
            )
    return rows


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.3g}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + [
        "| " + " | ".join(_fmt(v) if not isinstance(v, str) else v for v in row) + " |" for row in rows
    ]


def markdown(results: dict[str, Any]) -> str:
    """results.md: the run's setting, the targets, then per-scenario and per-point tables."""
    device, model, settings = results["device"], results["model"], results["settings"]
    matmul = device.get("matmul", {})
    out = [
        f"# birdgen benchmark: {device['name']}",
        "",
        f"- Device: {device['description']}; matrix throughput measured in this run: "
        f"{_fmt((matmul.get('flops_per_s') or 0) / 1e12, 3)} TFLOP/s ({matmul.get('dtype')}, "
        f"{matmul.get('size')}² matmul).",
        f"- Model: `{model.get('preset') or model['dir']}` ({model.get('model_version')}), engine "
        f"{model.get('engine')}; birdgen served by Triton; diffusers {device.get('diffusers')}, "
        f"torch {device.get('torch')}, onnxruntime {device.get('onnxruntime')}.",
        f"- Load: closed loop, {settings['per_point']} per point after one untimed request per client, "
        f"{settings['warmup']} warm-up requests per scenario, distinct seeds (Triton's response cache "
        "never answers a whole request; CPU-hosted text encoders answer the repeated prompt from it, "
        f"as for any species asked for before). Started {results['started']}.",
        "- Times in ms. Ratios are birdgen ÷ reference for times (< 1: birdgen faster) and birdgen ÷ "
        "diffusers for throughput (> 1: birdgen more). Floor = FLOPs ÷ measured matrix throughput.",
        "",
        "## Targets",
        "",
    ]
    targets = evaluate_targets(results)
    out += (
        _table(
            ["scenario", "goal", "value", "limit", "status"],
            [
                [t["scenario"], t["goal"], _fmt(t["value"], 2), t["limit"], f"**{t['status']}**"]
                for t in targets
            ],
        )
        if targets
        else ["No targets apply to this device."]
    )
    out += ["", "## Summary (concurrency 1 and best throughput)", ""]
    rows = []
    for name, scenario in results["scenarios"].items():
        h = headline(scenario)
        flops = scenario.get("flops", {}).get("total")
        rows.append(
            [
                name,
                _fmt(flops / 1e9 if flops else None),
                h["floor_ms"],
                h["eager_p50_ms"],
                h["compile_p50_ms"],
                h["p50_ms"],
                _fmt(h["p50_vs_eager"], 2),
                _fmt(h["p50_vs_floor"], 1),
                _fmt(h["best_rps"], 2) + (f" @{h['best_concurrency']}" if h["best_concurrency"] else ""),
                _fmt(h["eager_rps"], 2),
                _fmt(h["best_rps_vs_eager"], 2),
                _fmt(h["overhead_ms"], 2),
            ]
        )
    out += _table(
        [
            "scenario",
            "GFLOP",
            "floor",
            "eager p50",
            "compile p50",
            "birdgen p50",
            "vs eager",
            "vs floor",
            "birdgen req/s",
            "eager seq req/s",
            "req/s vs eager",
            "Triton overhead",
        ],
        rows,
    )
    out += ["", "## Every point", ""]
    rows = []
    for name, scenario in results["scenarios"].items():
        eager = scenario.get("baselines", {}).get("eager", {}).get("p50_ms")
        compiled = scenario.get("baselines", {}).get("compile", {}).get("p50_ms")
        for point in scenario.get("points", {}).values():
            res = point.get("resources", {})
            rows.append(
                [
                    name,
                    point["concurrency"],
                    point["p50_ms"],
                    point["p95_ms"],
                    point["p99_ms"],
                    _fmt(point["throughput_rps"], 2),
                    _fmt(_ratio(point["p50_ms"], eager), 2),
                    _fmt(_ratio(point["p50_ms"], compiled), 2),
                    _fmt(_ratio(point["p50_ms"], scenario.get("floor_ms")), 1),
                    f"{point['errors']}/{point['requests']}",
                    _fmt(res.get("gpu_util_mean_pct"), 0),
                    _fmt(res.get("gpu_mem_peak_mib"), 0),
                    _fmt(res.get("server_rss_peak_mib"), 0),
                ]
            )
    out += _table(
        [
            "scenario",
            "conc.",
            "p50",
            "p95",
            "p99",
            "req/s",
            "vs eager",
            "vs compile",
            "vs floor",
            "errors",
            "GPU util %",
            "GPU mem MiB",
            "server RSS MiB",
        ],
        rows,
    )
    out += ["", "## Where a request's time goes (concurrency 1, means)", ""]
    rows = []
    for name, scenario in results["scenarios"].items():
        o = scenario.get("points", {}).get("1", {}).get("overhead")
        if o:
            rows.append(
                [
                    name,
                    o["latency_ms"],
                    o["engine_ms"],
                    o["entry_own_ms"],
                    o["compute_ms"],
                    o["triton_overhead_ms"],
                    o["stage_queue_ms"],
                    o["bls_and_transfer_ms"],
                    o["grpc_and_entry_queue_ms"],
                ]
            )
    out += _table(
        [
            "scenario",
            "served",
            "engines",
            "entry's own work",
            "compute",
            "Triton overhead",
            "of which stage queues",
            "BLS + stub transfers",
            "client, gRPC, entry queue",
        ],
        rows,
    )
    out += [
        "",
        "served = compute + Triton overhead. Engines: time inside the stage engines "
        "(birdgen_stage_engine_seconds). Entry's own work: prompt, tokenizers, scheduler maths and "
        "encoding in the entry model (timings_ms total − stage_calls). Stage queues: Triton's queue "
        "time in the stage models (waiting for a busy instance: no stage holds a request for batch-mates).",
    ]
    skipped = [
        f"- {name} {mode}: {b['skipped']}"
        for name, s in results["scenarios"].items()
        for mode, b in s.get("baselines", {}).items()
        if "skipped" in b
    ]
    errors = [f"- {name}: {e}" for name, s in results["scenarios"].items() for e in s.get("errors", [])]
    if skipped:
        out += ["", "## Baselines not run", "", *skipped]
    if errors:
        out += ["", "## Errors", "", *errors]
    return "\n".join(out) + "\n"


def plot(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """latency.png (p50 solid, p99 dashed, diffusers eager dotted) and throughput.png (diffusers
    eager sequential dotted) versus concurrency, one colour per scenario."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display here
    import matplotlib.pyplot as plt

    figures = {name: plt.subplots(figsize=(8, 5)) for name in PLOTS}
    (_, latency), (_, rate) = figures["latency.png"], figures["throughput.png"]
    for i, (name, scenario) in enumerate(results["scenarios"].items()):
        points = sorted(scenario.get("points", {}).values(), key=lambda p: p["concurrency"])
        if not points:
            continue
        colour = f"C{i % 10}"
        xs = [p["concurrency"] for p in points]
        latency.plot(xs, [p["p50_ms"] for p in points], "o-", color=colour, label=f"{name} p50")
        latency.plot(xs, [p["p99_ms"] for p in points], "--", color=colour, alpha=0.6, label=f"{name} p99")
        rate.plot(xs, [p["throughput_rps"] for p in points], "o-", color=colour, label=name)
        eager = scenario.get("baselines", {}).get("eager", {})
        if "p50_ms" in eager:
            latency.axhline(eager["p50_ms"], color=colour, linestyle=":", label=f"{name} diffusers eager")
            rate.axhline(
                eager["sequential_rps"], color=colour, linestyle=":", label=f"{name} diffusers eager"
            )
    title = f"birdgen on {results['device']['name']} ({results['model'].get('preset') or 'model'})"
    levels = sorted(
        {p["concurrency"] for s in results["scenarios"].values() for p in s.get("points", {}).values()}
    )
    for axes, ylabel in ((latency, "latency (ms, log)"), (rate, "throughput (requests/s, log)")):
        axes.set_xscale("log", base=2)
        axes.set_xticks(levels, [str(c) for c in levels])
        axes.set_yscale("log")
        axes.set_xlabel("concurrency (closed-loop clients)")
        axes.set_ylabel(ylabel)
        axes.set_title(title)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=7, loc="best")
    written = []
    for name, (figure, _) in figures.items():
        figure.tight_layout()
        figure.savefig(out_dir / name, dpi=120)
        plt.close(figure)
        written.append(out_dir / name)
    return written


def write_json(results: dict[str, Any], out_dir: Path) -> Path:
    """Atomically (temporary file + rename): an interrupted run leaves the previous complete file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RESULTS_JSON
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    temporary.replace(path)
    return path


def write_report(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """results.json, results.md and the plots under `out_dir`; returns the paths."""
    results["targets"] = evaluate_targets(results)
    paths = [write_json(results, out_dir)]
    (out_dir / RESULTS_MD).write_text(markdown(results))
    return [*paths, out_dir / RESULTS_MD, *plot(results, out_dir)]
