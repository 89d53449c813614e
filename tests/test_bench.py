"""The benchmark harness: its maths and writers on synthetic data, the model presets, the FLOP
counter, the serving timings it reads, and one short `birdgen bench` run against the shared server.

No test here asserts a speed: targets are the harness's to report, not the suite's to enforce.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from birdgen.benchmarks import monitor, stats
from birdgen.benchmarks.load import run_point
from birdgen.benchmarks.report import evaluate_targets, headline, markdown, write_report
from birdgen.benchmarks.scenarios import SCENARIOS, parse_scenarios
from birdgen.client import InvalidRequestError
from birdgen.prompts import DataFileError
from birdgen.tiny_model import ModelPresets
from tests.redis_fixture import redis_server  # noqa: F401


def sample(start: float, latency_ms: float, ok: bool = True, **timings: float) -> stats.Sample:
    return stats.Sample(start, start + latency_ms / 1000, ok, timings)


# -- statistics -----------------------------------------------------------------------------------------


def test_percentiles_interpolate_like_numpy() -> None:
    summary = stats.latency_summary([float(v) for v in range(1, 101)])
    assert summary["p50_ms"] == pytest.approx(50.5)
    assert summary["p95_ms"] == pytest.approx(95.05)
    assert summary["p99_ms"] == pytest.approx(99.01)
    assert (summary["mean_ms"], summary["min_ms"], summary["max_ms"]) == (50.5, 1.0, 100.0)
    with pytest.raises(ValueError, match="no successful requests"):
        stats.latency_summary([])


def test_throughput_counts_successes_over_the_whole_window() -> None:
    # Two workers over [0, 2] s: three answers and one error -> 3 completed in 2 s.
    samples = [sample(0.0, 1000), sample(1.0, 1000), sample(0.0, 500, ok=False), sample(0.5, 1500)]
    assert stats.throughput(samples) == pytest.approx(1.5)
    assert stats.throughput([sample(0.0, 10, ok=False)]) == 0.0
    point = stats.point_summary(samples, concurrency=2)
    assert (point["requests"], point["errors"], point["concurrency"]) == (4, 1, 2)
    assert point["p50_ms"] == pytest.approx(1000.0)  # the error's 500 ms is not a latency


def test_mean_timings_average_each_key_over_the_requests_that_have_it() -> None:
    samples = [sample(0, 1, unet=10.0, total=20.0), sample(0, 1, unet=20.0), sample(0, 1)]
    assert stats.mean_timings(samples) == {"total": 20.0, "unet": 15.0}


def test_overhead_is_latency_minus_engine_and_entry_work() -> None:
    timings = {"total": 90.0, "stage_calls": 70.0, "unet": 60.0}
    split = stats.overhead_breakdown(100.0, timings, engine_ms=60.0, stage_queue_ms=3.0)
    assert split["entry_own_ms"] == 20.0 and split["compute_ms"] == 80.0
    assert split["triton_overhead_ms"] == 20.0
    # The overhead's parts add up to it: gRPC + entry queue, stage queues, BLS + transfers.
    parts = split["grpc_and_entry_queue_ms"] + split["stage_queue_ms"] + split["bls_and_transfer_ms"]
    assert parts == pytest.approx(split["triton_overhead_ms"])
    unknown = stats.overhead_breakdown(100.0, timings, engine_ms=None, stage_queue_ms=3.0)
    assert unknown["triton_overhead_ms"] is None and unknown["entry_own_ms"] == 20.0


# -- the load generator ---------------------------------------------------------------------------------


class FakeServer:
    """An async call that records seeds and how many requests were in flight at once."""

    def __init__(self, fail_every: int = 0) -> None:
        self.seeds: list[int] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.fail_every = fail_every

    async def __call__(self, seed: int) -> dict[str, float]:
        self.seeds.append(seed)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0.001)
        self.in_flight -= 1
        if self.fail_every and seed % self.fail_every == self.fail_every - 1:
            raise InvalidRequestError("invalid 'seed': got it; allowed: another")
        return {"total": 1.0}


def test_a_point_sends_the_requests_asked_with_distinct_seeds_and_concurrency() -> None:
    server = FakeServer(fail_every=5)
    samples, errors = asyncio.run(run_point(server, iter(range(1000)), 4, requests=10))
    assert len(samples) == 10 and sorted(server.seeds) == list(range(10))
    assert server.most_in_flight == 4
    assert sum(not s.ok for s in samples) == 2
    assert errors == ["InvalidRequestError: invalid 'seed': got it; allowed: another"]
    # At least one request per worker, so every worker is measured.
    samples, _ = asyncio.run(run_point(FakeServer(), iter(range(1000)), 8, requests=3))
    assert len(samples) == 8


def test_a_timed_point_starts_nothing_after_its_deadline() -> None:
    """On a clock that ticks 10 ms per reading: the deadline is 50 ms after the first reading, and a
    request's start is the reading right after the check that let it start."""
    ticks = itertools.count()
    samples, _ = asyncio.run(
        run_point(FakeServer(), iter(range(10**6)), 2, duration_s=0.05, clock=lambda: next(ticks) * 0.01)
    )
    assert samples and max(s.start for s in samples) < 0.05 + 0.015  # half a tick for float sums
    with pytest.raises(ValueError, match="exactly one"):
        asyncio.run(run_point(FakeServer(), iter(range(10)), 1))


def test_scenarios_parse_by_name_and_name_the_allowed_ones() -> None:
    assert [s.name for s in parse_scenarios("image-256-1step, cached")] == ["image-256-1step", "cached"]
    with pytest.raises(ValueError, match="allowed: image-256-1step"):
        parse_scenarios("image-999")
    clip = SCENARIOS["animation-16f-512-4step"].request(7)
    assert (clip["duration_seconds"] * clip["fps"], clip["steps"], clip["seed"]) == (16, 4, 7)


# -- Triton metrics ---------------------------------------------------------------------------------------

METRICS_BEFORE = """
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="bird_image",version="1"} 10
nv_inference_request_success{model="unet",version="1"} 10
nv_inference_queue_duration_us{model="bird_image",version="1"} 5000
nv_inference_queue_duration_us{model="unet",version="1"} 20000
nv_inference_queue_duration_us{model="vae_decoder",version="1"} 1000
birdgen_stage_engine_seconds{model="unet",version="1",instance="unet_0_0"} 1.0
birdgen_stage_engine_seconds{model="vae_decoder",version="1",instance="vae_decoder_0_0"} 0.5
"""
METRICS_AFTER = """
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="bird_image",version="1"} 14
nv_inference_request_success{model="unet",version="1"} 14
nv_inference_queue_duration_us{model="bird_image",version="1"} 9000
nv_inference_queue_duration_us{model="unet",version="1"} 28000
nv_inference_queue_duration_us{model="vae_decoder",version="1"} 1400
# TYPE birdgen_stage_engine_seconds counter
birdgen_stage_engine_seconds{model="unet",version="1",instance="unet_0_0"} 1.2
birdgen_stage_engine_seconds{model="vae_decoder",version="1",instance="vae_decoder_0_0"} 0.54
"""


def test_costs_per_request_come_from_the_counters_growth() -> None:
    before, after = monitor.parse_metrics(METRICS_BEFORE), monitor.parse_metrics(METRICS_AFTER)
    assert monitor.stage_models(after) == {"unet", "vae_decoder"}
    costs = monitor.per_request_costs(before, after, "bird_image")
    assert costs["requests"] == 4
    assert costs["engine_ms"] == pytest.approx((0.2 + 0.04) * 1000 / 4)
    assert costs["stage_queue_ms"] == pytest.approx((8000 + 400) / 1000 / 4)  # the entry's queue excluded
    without_engine = monitor.parse_metrics(METRICS_AFTER.replace("birdgen_stage_engine_seconds", "other"))
    assert monitor.per_request_costs(before, without_engine, "bird_image")["engine_ms"] is None
    with pytest.raises(ValueError, match="no successful bird_animation"):
        monitor.per_request_costs(before, after, "bird_animation")


# -- report -----------------------------------------------------------------------------------------------


def point(concurrency: int, p50: float, rps: float, overhead: float | None = None) -> dict[str, Any]:
    result: dict[str, Any] = {
        "concurrency": concurrency,
        "requests": 10,
        "errors": 0,
        "throughput_rps": rps,
        "p50_ms": p50,
        "p95_ms": p50 * 1.2,
        "p99_ms": p50 * 1.5,
        "mean_ms": p50,
        "resources": {"gpu_util_mean_pct": None, "gpu_mem_peak_mib": None, "server_rss_peak_mib": 900.0},
    }
    if overhead is not None:
        # The entry's own work is 4 ms, so engines get the rest of the latency but `overhead`.
        timings = {"total": p50 - 1, "stage_calls": p50 - 5}
        result["overhead"] = stats.overhead_breakdown(p50, timings, p50 - 4 - overhead, 1.0)
    return result


def cpu_results() -> dict[str, Any]:
    eager = {"p50_ms": 400.0, "mean_ms": 400.0, "sequential_rps": 2.5}
    return {
        "schema": 1,
        "started": "2026-11-25T12:00:00+00:00",
        "device": {
            "name": "cpu-2c",
            "kind": "cpu",
            "description": "test CPU",
            "matmul": {"flops_per_s": 1e11},
        },
        "model": {"dir": "/m", "preset": "mini", "model_version": "mini-abc", "engine": "onnxruntime"},
        "settings": {"per_point": "10 requests", "warmup": 3, "concurrency": [1, 2]},
        "scenarios": {
            "image-256-1step": {
                "flops": {"total": 2.4e10},
                "floor_ms": 240.0,
                "baselines": {"eager": eager, "compile": {"skipped": "GPU only"}},
                "points": {"1": point(1, 200.0, 5.0, overhead=2.0), "2": point(2, 350.0, 5.7)},
            },
            "image-512-1step": {
                "flops": {"total": 9.2e10},
                "floor_ms": 920.0,
                "baselines": {"eager": {**eager, "p50_ms": 1000.0, "sequential_rps": 1.0}},
                "points": {"1": point(1, 900.0, 1.1, overhead=7.0)},
            },
            "cached": {"points": {"1": point(1, 2.0, 500.0)}},
        },
    }


def test_headline_ratios_and_cpu_targets() -> None:
    results = cpu_results()
    small = headline(results["scenarios"]["image-256-1step"])
    assert small["p50_vs_eager"] == pytest.approx(0.5) and small["best_rps_vs_eager"] == pytest.approx(
        5.7 / 2.5
    )
    assert small["best_concurrency"] == 2 and small["p50_vs_floor"] == pytest.approx(200 / 240)
    assert small["overhead_ms"] == pytest.approx(2.0) and small["compile_p50_ms"] is None
    status = {(t["scenario"], t["metric"]): t["status"] for t in evaluate_targets(results)}
    assert status == {
        ("image-256-1step", "p50_vs_eager"): "pass",
        ("image-512-1step", "p50_vs_eager"): "FAIL",  # 0.9 > 0.8
        ("image-256-1step", "best_rps_vs_eager"): "pass",
        ("image-512-1step", "best_rps_vs_eager"): "FAIL",  # 1.1 < 1.2
        ("image-256-1step", "overhead_ms"): "pass",
        ("image-512-1step", "overhead_ms"): "FAIL",  # 7 ms > 5 ms
    }  # cached has no baseline and no time split: no generic target applies to it


def test_gpu_targets_say_what_was_not_measured() -> None:
    results = cpu_results()
    results["device"]["kind"] = "cuda"
    rows = {(t["scenario"], t["metric"]): t["status"] for t in evaluate_targets(results)}
    assert rows[("image-1024-1step", "p50_ms")] == "not measured"
    assert rows[("cached", "p99_ms")] == "pass"


def test_report_files(tmp_path: Path) -> None:
    paths = write_report(cpu_results(), tmp_path)
    assert sorted(p.name for p in paths) == ["latency.png", "results.json", "results.md", "throughput.png"]
    written = json.loads((tmp_path / "results.json").read_text())
    assert {"device", "model", "settings", "scenarios", "targets"} <= set(written)
    assert written["targets"][0]["status"] in ("pass", "FAIL")
    for png in ("latency.png", "throughput.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "results.md").read_text()
    assert "| scenario | conc. | p50 | p95 | p99 | req/s | vs eager | vs compile | vs floor |" in text
    assert "| image-512-1step | Triton's own overhead ≤ 5 ms per request | 7.00 | <= 5 | **FAIL** |" in text
    assert "image-256-1step compile: GPU only" in text
    assert text == markdown(written)


# -- model presets --------------------------------------------------------------------------------------

# stabilityai/sdxl-turbo's published unet, vae, text_encoder(_2) configs and
# guoyww/animatediff-motion-adapter-sdxl-beta's: the values that set shapes and FLOPs.
SDXL_TURBO = {
    "unet": {
        "block_out_channels": [320, 640, 1280],
        "layers_per_block": 2,
        "transformer_layers_per_block": [1, 2, 10],
        "attention_head_dim": [5, 10, 20],
        "cross_attention_dim": 2048,
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
        "norm_num_groups": 32,
        "use_linear_projection": True,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    },
    "vae": {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4},
    "text_encoder": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12},
    "text_encoder_2": {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "projection_dim": 1280,
    },
    "motion_adapter": {"block_out_channels": [320, 640, 1280], "motion_layers_per_block": 2},
}


def test_sdxl_full_preset_has_sdxl_turbos_configs() -> None:
    full = ModelPresets.load()["sdxl-full"]
    assert full.vocab_size == 49408
    for part, expected in SDXL_TURBO.items():
        config = getattr(full, part)
        assert {k: config[k] for k in expected} == expected, part


def test_mini_preset_keeps_the_architecture_at_smaller_widths() -> None:
    presets = ModelPresets.load()
    assert set(presets) == {"tiny", "mini", "sdxl-full"}
    mini, full = presets["mini"], presets["sdxl-full"]
    same = ("down_block_types", "up_block_types", "layers_per_block", "addition_embed_type")
    assert {k: mini.unet[k] for k in same} == {k: full.unet[k] for k in same}
    widths = np.array(mini.unet["block_out_channels"]) / np.array(mini.unet["attention_head_dim"])
    assert list(widths) == [64, 64, 64]  # sdxl-turbo's head width
    assert mini.unet["block_out_channels"] == [64, 128, 256]
    assert mini.vae["latent_channels"] == 4 and len(mini.vae["block_out_channels"]) == 4


def test_a_preset_whose_parts_do_not_fit_fails_at_load(tmp_path: Path) -> None:
    text = (Path(__file__).parent.parent / "birdgen" / "data" / "model_presets.yaml").read_text()
    broken = tmp_path / "presets.yaml"
    broken.write_text(text.replace("cross_attention_dim: 640", "cross_attention_dim: 512"))
    with pytest.raises(DataFileError, match=r"mini: .*cross_attention_dim 512 must be .* \(640\)"):
        ModelPresets.load(broken)


def test_unknown_preset_names_the_allowed_ones(tmp_path: Path) -> None:
    from birdgen.tiny_model import write_tiny_model

    with pytest.raises(ValueError, match="allowed: tiny, mini, sdxl-full"):
        write_tiny_model(tmp_path, preset="huge")


# -- FLOPs ----------------------------------------------------------------------------------------------


def test_flops_are_positive_and_proportional_to_steps(tiny_model: Path) -> None:
    from birdgen.benchmarks.baselines import request_flops

    one = request_flops(tiny_model, SCENARIOS["image-256-1step"])
    four = request_flops(tiny_model, SCENARIOS["image-256-4step"])
    assert min(one.values()) > 0
    assert four["total"] - one["total"] == 3 * one["unet_step"]
    big = request_flops(tiny_model, SCENARIOS["image-512-1step"])
    assert big["unet_step"] > 3 * one["unet_step"] and big["text_encoders"] == one["text_encoders"]
    clip = request_flops(tiny_model, SCENARIOS["animation-16f-256-1step"])
    assert clip["unet_step"] > 16 * one["unet_step"]  # 16 frames plus the motion modules
    assert clip["vae_decode"] == 16 * one["vae_decode"]


# -- the serving timings the harness reads -----------------------------------------------------------------


def test_timings_split_the_entrys_own_work_from_stage_calls() -> None:
    import time

    from birdgen.ensemble.pipeline import TimedRunner, Timings

    class Stages:
        def run(self, stage: str, inputs: Any, **where: Any) -> dict[str, np.ndarray]:
            time.sleep(0.002)
            return {"out": np.zeros(1)}

    runner = TimedRunner(Stages())  # type: ignore[arg-type]
    runner.ms = 99.0  # left over from a request that failed half-way
    timings = Timings(runner)
    with timings.stage("unet"):
        runner.run("unet", {}, model="unet", version=1)
    done = timings.finish()
    assert set(done) == {"unet", "stage_calls", "total"}
    assert 0 < done["stage_calls"] <= done["unet"] + 0.001 <= done["total"] + 0.002


def test_timed_engine_counts_each_inference_even_a_failed_one() -> None:
    from birdgen.engines import Engine
    from birdgen.ensemble.triton_model import TimedEngine

    class Flaky(Engine):
        def infer(self, inputs: Any) -> dict[str, np.ndarray]:
            if "bad" in inputs:
                raise RuntimeError("engine failed")
            return {"y": inputs["x"] * 2}

    added: list[float] = []
    engine = TimedEngine(Flaky(), added.append)
    assert engine.infer({"x": np.ones(2)})["y"].tolist() == [2.0, 2.0]
    with pytest.raises(RuntimeError, match="engine failed"):
        engine.infer({"bad": np.ones(1)})
    assert len(added) == 2 and min(added) >= 0


# -- end to end -------------------------------------------------------------------------------------------


@pytest.mark.triton
def test_birdgen_bench_against_the_running_server(server, tiny_model: Path, tmp_path: Path) -> None:
    from birdgen.cli import main

    args = ["bench", "--url", server.grpc_url, "--metrics-url", server.metrics_url]
    args += ["--model-dir", str(tiny_model), "--scenarios", "image-256-1step", "--concurrency", "1,2"]
    args += ["--requests", "3", "--warmup", "1", "--baselines", "eager", "--baseline-requests", "2"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    scenario = results["scenarios"]["image-256-1step"]
    assert scenario["flops"]["total"] > 0 and scenario["floor_ms"] > 0
    assert scenario["baselines"]["eager"]["repeats"] == 2
    assert set(scenario["points"]) == {"1", "2"}
    assert all(p["errors"] == 0 and p["requests"] == 3 for p in scenario["points"].values())
    split = scenario["points"]["1"]["overhead"]
    assert split["engine_ms"] > 0  # the stage models' engine counter reached Triton's /metrics
    assert results["model"]["model_version"].startswith("tiny-sdxl-turbo-")
    assert {t["metric"] for t in results["targets"]} == {"p50_vs_eager", "best_rps_vs_eager", "overhead_ms"}
    assert all((tmp_path / name).is_file() for name in ("results.md", "latency.png", "throughput.png"))
    # A second run resumes: everything is measured already, so nothing is sent again.
    before = json.loads((tmp_path / "results.json").read_text())["scenarios"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["scenarios"] == before


@pytest.mark.triton
def test_cached_scenario_answers_from_redis(server, tiny_model: Path, redis_server, tmp_path: Path) -> None:  # noqa: F811
    from birdgen.benchmarks.harness import Bench, BenchSettings

    settings = BenchSettings(
        scenarios=parse_scenarios("cached"),
        concurrency=[1, 2],
        requests=4,
        baselines=[],
        model_dir=tiny_model,
        url=server.grpc_url,
        redis_url=redis_server.url,
        out=tmp_path,
    )
    results = Bench(settings, log=lambda _: None).run()
    points = results["scenarios"]["cached"]["points"]
    assert [points[c]["cache_hits"] for c in ("1", "2")] == [4, 4]
