"""The tensorrt engine kind: everything that needs no TensorRT is tested here, on every machine
(profiles, cache keys, ONNX preparation, fp16 report, refit map, Triton configs); building and
running plans only where `import tensorrt` works."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from birdgen.engines.onnx_weights import (
    SCOPES_KEY,
    onnx_weights,
    refit_arrays,
    refit_weight_map,
    structure_sha256,
)
from birdgen.engines.tensorrt import PLAN_FILE, TensorRtSettings, plan_cache_key
from birdgen.engines.tensorrt_onnx import fp16_report, prepare_onnx
from birdgen.engines.tensorrt_profiles import ort_tensorrt_config, profiles, tensorrt_hosting
from birdgen.model_folder import ModelDims
from birdgen.schema import ANIMATION, LIMITS, RequestError, parse_image_request
from birdgen.stages import StageSpec, image_sizes, motion_unet_spec, stage_specs
from birdgen.triton_config import parse_pbtxt, stage_config, to_pbtxt
from tests.conftest import ROBIN

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
NEEDS_TENSORRT = pytest.mark.skipif(
    not HAS_TENSORRT, reason="tensorrt is not importable here; plans build in NVIDIA's container"
)


@pytest.fixture(scope="module")
def dims(tiny_model: Path) -> ModelDims:
    return ModelDims.from_folder(tiny_model)


@pytest.fixture(scope="module")
def specs(dims: ModelDims) -> dict[str, StageSpec]:
    return {**stage_specs(dims), "motion_unet": motion_unet_spec(dims, ANIMATION.max_frames)}


@pytest.fixture(scope="module")
def unet_onnx(repository: Path) -> onnx.ModelProto:
    return onnx.load(str(repository / "unet" / "1" / "model.onnx"))


def _squares(low: int, high: int, step: int) -> list[int]:
    return list(range(low, high + 1, step))


def test_profiles_cover_every_size_and_batch(specs: dict[str, StageSpec], dims: ModelDims) -> None:
    factor = dims.vae_scale_factor
    for spec in specs.values():
        found = profiles(spec)
        dynamic = found[0]
        assert dynamic.name == "dynamic"
        limits = ANIMATION if spec.name == "motion_unet" else LIMITS
        sizes = (
            [
                image_sizes(dims, h // factor, w // factor)
                for h in (limits.height.min, limits.height.max)
                for w in (limits.width.min, limits.width.max)
            ]
            if spec.dynamic_axes
            else [{}]
        )
        for batch in range(1, spec.max_batch_size + 1):
            for size in sizes:
                if "frames" in spec.dynamic_axes:
                    size = {
                        **size,
                        **{
                            a: spec.dynamic_axes[a][i]
                            for a in ("frames", "windows", "window_length")
                            for i in (0,)
                        },
                    }
                shapes = {t.name: (batch, *t.concrete(size)) for t in spec.inputs}
                assert dynamic.covers(shapes), (spec.name, batch, size)
        # The opt point: one request at the common size.
        for tensor in spec.inputs:
            assert dynamic.shapes[tensor.name][1][0] == 1
        if not spec.dynamic_axes:
            assert len(found) == 1  # text encoders: nothing spatial to pin
            continue
        static = {p.name: p for p in found[1:]}
        pinned = {
            f"static_{px // factor}x{px // factor}"
            for px in (512, 1024)
            if px // factor <= spec.dynamic_axes["latent_height"][2]
        }
        assert set(static) == pinned
        for profile in static.values():
            for name, (low, opt, high) in profile.shapes.items():
                assert low[1:] == opt[1:] == high[1:], (spec.name, name)  # static image size
                assert (low[0], high[0]) == (1, spec.max_batch_size)  # the batcher's range


def test_every_request_size_is_covered(specs: dict[str, StageSpec], dims: ModelDims) -> None:
    """Every width x height a request may ask for, at every batch size, fits the dynamic profile."""
    unet, factor = specs["unet"], dims.vae_scale_factor
    dynamic = profiles(unet)[0]
    for h in _squares(LIMITS.height.min, LIMITS.height.max, LIMITS.height.multiple_of):
        for w in _squares(LIMITS.width.min, LIMITS.width.max, LIMITS.width.multiple_of):
            for batch in (1, unet.max_batch_size):
                size = image_sizes(dims, h // factor, w // factor)
                assert dynamic.covers({t.name: (batch, *t.concrete(size)) for t in unet.inputs})


@pytest.mark.parametrize("field", ["width", "height"])
def test_a_size_outside_the_profiles_is_refused_before_any_engine(
    field: str, specs: dict[str, StageSpec], dims: ModelDims
) -> None:
    """The profiles end where limits.yaml ends, and the schema refuses what lies beyond (INVALID_ARGUMENT
    when served), so no request reaches a plan with a shape it has no profile for."""
    unet, factor = specs["unet"], dims.vae_scale_factor
    limit = getattr(LIMITS, field)
    for outside in (limit.max + limit.multiple_of, limit.min - limit.multiple_of):
        px = {"width": LIMITS.width.default, "height": LIMITS.height.default, field: outside}
        size = image_sizes(dims, px["height"] // factor, px["width"] // factor)
        shapes = {t.name: (1, *t.concrete(size)) for t in unet.inputs}
        assert not any(profile.covers(shapes) for profile in profiles(unet))
        with pytest.raises(RequestError) as refused:
            parse_image_request({**ROBIN, **px})
        assert refused.value.field == field


def test_plan_cache_key() -> None:
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in TensorRtSettings().__dict__.items()}
    key = plan_cache_key("a" * 64, settings, "NVIDIA H100", "10.5.0")
    assert key == plan_cache_key("a" * 64, dict(settings), "NVIDIA H100", "10.5.0")
    changed = [
        plan_cache_key("b" * 64, settings, "NVIDIA H100", "10.5.0"),
        plan_cache_key("a" * 64, {**settings, "fp16": False}, "NVIDIA H100", "10.5.0"),
        plan_cache_key("a" * 64, {**settings, "refittable": True}, "NVIDIA H100", "10.5.0"),
        plan_cache_key("a" * 64, {**settings, "hot_sizes_px": [512]}, "NVIDIA H100", "10.5.0"),
        plan_cache_key("a" * 64, settings, "NVIDIA H200", "10.5.0"),
        plan_cache_key("a" * 64, settings, "NVIDIA H100", "10.6.0"),
    ]
    assert len({key, *changed}) == len(changed) + 1
    # Where the caches live does not change what is built.
    moved = {**settings, "cache_dir": "/elsewhere", "timing_cache": "/elsewhere/t.cache"}
    assert plan_cache_key("a" * 64, moved, "NVIDIA H100", "10.5.0") == key


def test_tensorrt_plan_configs_are_valid(specs: dict[str, StageSpec], dims: ModelDims) -> None:
    for spec in specs.values():
        text = to_pbtxt(stage_config(spec, dims, tensorrt_hosting(spec)))
        config = parse_pbtxt(text)  # Triton's ModelConfig schema: raises on anything invalid
        assert config.platform == "tensorrt_plan"
        assert not config.backend
        assert config.max_batch_size == spec.max_batch_size
        (group,) = config.instance_group
        assert group.kind == group.KIND_GPU
        assert list(group.profile) == [str(i) for i in range(len(profiles(spec)))]
        assert [i.name for i in config.input] == [t.name for t in spec.inputs]
        assert config.model_warmup and config.model_warmup[0].batch_size == 1
        assert config.HasField("dynamic_batching")
    unet = parse_pbtxt(to_pbtxt(stage_config(specs["unet"], dims, tensorrt_hosting(specs["unet"]))))
    assert list(unet.dynamic_batching.preferred_batch_size) == list(specs["unet"].preferred_batch_sizes)


def test_onnxruntime_tensorrt_configs_are_valid(specs: dict[str, StageSpec], dims: ModelDims) -> None:
    for spec in specs.values():
        config = parse_pbtxt(to_pbtxt(ort_tensorrt_config(spec, dims, "/models/trt-cache")))
        assert config.platform == "onnxruntime_onnx"
        assert config.instance_group[0].kind == config.instance_group[0].KIND_GPU
        (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
        assert accelerator.name == "tensorrt"
        assert accelerator.parameters["precision_mode"] == "FP16"
        assert accelerator.parameters["trt_engine_cache_path"] == "/models/trt-cache"
    unet = ort_tensorrt_config(specs["unet"], dims, "/c")
    parameters = unet.optimization.execution_accelerators.gpu_execution_accelerator[0].parameters
    low, opt, high = profiles(specs["unet"])[0].shapes["sample"]
    assert f"sample:{'x'.join(map(str, low))}" in parameters["trt_profile_min_shapes"]
    assert f"sample:{'x'.join(map(str, opt))}" in parameters["trt_profile_opt_shapes"]
    assert f"sample:{'x'.join(map(str, high))}" in parameters["trt_profile_max_shapes"]


def test_refit_map_covers_every_lora_weight(
    tiny_model: Path, unet_onnx: onnx.ModelProto, tmp_path: Path
) -> None:
    """Every weight a family LoRA changes maps to exactly one UNet initializer, of its shape and
    (for the base UNet) its values: a refit with the fused weights changes exactly those."""
    from birdgen.engines.modules import stage_module
    from birdgen.export.lora import lora_weight_names, read_lora
    from tests.loras import random_lora

    state, _, _ = read_lora(random_lora(tiny_model, tmp_path / "lora"))
    names = lora_weight_names(state, prefix="model.")  # the stage wrapper holds the UNet as `model`
    assert names and all(n.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v", "0") for n in names)
    mapping = refit_weight_map(unet_onnx, names)
    assert sorted(mapping) == names
    assert len({p.initializer for p in mapping.values()}) == len(names)  # no initializer twice
    weights = {k: v.numpy() for k, v in stage_module(tiny_model, "unet").state_dict().items()}
    initializers = {i.name: numpy_helper.to_array(i) for i in unet_onnx.graph.initializer}
    for name, array in refit_arrays(mapping, weights).items():
        assert initializers[name].shape == array.shape
        np.testing.assert_array_equal(initializers[name], array)


def test_a_family_unet_has_the_base_graph_so_it_is_derived_and_its_plan_is_a_refit(
    tiny_model: Path, repository: Path, specs: dict[str, StageSpec], dims: ModelDims, tmp_path: Path
) -> None:
    """A LoRA-fused family UNet exports to the base UNet's graph with other weights. So ONNX Runtime's
    family engine is the base model.onnx with the LoRA's initializers replaced, equal to the family's
    own export in every node and weight; and TensorRT's refittable plan of one is refitted into the
    other (every weight from the new export) instead of rebuilt."""
    from birdgen.engines.modules import UNet
    from birdgen.engines.onnxruntime import OnnxRuntimeKind, export_onnx
    from birdgen.export.lora import fused_unet, lora_weight_names, read_lora
    from tests.loras import random_lora

    spec = specs["unet"]
    sample = spec.sample_inputs(1, image_sizes(dims, 32, 32), dims.vocab_size)
    lora = random_lora(tiny_model, tmp_path / "lora")
    module = UNet(fused_unet(tiny_model, lora, "Turdidae"))
    family_path = export_onnx(spec, module, sample, tmp_path / "family" / "model.onnx")

    names = lora_weight_names(read_lora(lora)[0], prefix="model.")
    state = {name: module.state_dict()[name].numpy() for name in names}
    derived = OnnxRuntimeKind().derive(spec, repository / "unet" / "1", state, tmp_path / "derived")
    assert derived == [tmp_path / "derived" / "model.onnx"]
    exported, made = onnx.load(str(family_path)), onnx.load(str(derived[0]))
    assert structure_sha256(made) == structure_sha256(exported)
    exported_weights, made_weights = onnx_weights(exported), onnx_weights(made)
    assert exported_weights.keys() == made_weights.keys()
    for name, array in exported_weights.items():
        np.testing.assert_array_equal(made_weights[name], array, err_msg=name)
    refused = OnnxRuntimeKind().derive(
        spec, repository / "unet" / "1", {"model.nothing.weight": np.zeros(1)}, tmp_path / "refused"
    )
    assert refused is None  # a weight the base graph lacks: the exporter builds instead

    base, family = (
        onnx.load(str(prepare_onnx(path, tmp_path / f"{name}-prepared.onnx")))
        for name, path in (("base", repository / "unet" / "1" / "model.onnx"), ("family", family_path))
    )
    assert structure_sha256(base) == structure_sha256(family)
    base_weights, family_weights = onnx_weights(base), onnx_weights(family)
    assert base_weights.keys() == family_weights.keys()  # every refit name found in the new export
    changed = [n for n in base_weights if not np.array_equal(base_weights[n], family_weights[n])]
    assert changed  # the LoRA's weights, which the refit sets with all the others
    other_graph = onnx.load(str(repository / "vae_decoder" / "1" / "model.onnx"))
    assert structure_sha256(other_graph) != structure_sha256(base)
    reshaped = onnx.ModelProto()
    reshaped.CopyFrom(base)
    shape = next(i for i in reshaped.graph.initializer if i.data_type == onnx.TensorProto.INT64 and i.dims)
    shape.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(shape) + 1, shape.name))
    assert structure_sha256(reshaped) != structure_sha256(base)  # integer constants are graph


@NEEDS_TENSORRT
def test_refit_swaps_families_exactly(
    tiny_model: Path, repository: Path, specs: dict[str, StageSpec], dims: ModelDims, tmp_path: Path
) -> None:
    """A -> B -> A gives A's output bit for bit, and B's differs (NVIDIA/TensorRT issue 3628)."""
    from birdgen.engines.tensorrt import TensorRtEngine, TensorRtKind, build_plan, refit_plan

    spec = specs["unet"]
    base = prepare_onnx(repository / "unet" / "1" / "model.onnx", tmp_path / "prepared.onnx")
    settings = TensorRtSettings(refittable=True, hot_sizes_px=(512,))
    plan_a = build_plan(base, tmp_path / "a.plan", profiles(spec, (512,)), settings, tmp_path / "timing")
    weights_a = onnx_weights(onnx.load(str(base)))
    weights_b = {k: (v * 1.01 if v.dtype == np.float32 else v) for k, v in weights_a.items()}
    sample = spec.sample_inputs(1, image_sizes(dims, 32, 32), dims.vocab_size)

    def run(plan: bytes) -> np.ndarray:
        path = tmp_path / "run.plan"
        path.write_bytes(plan)
        return TensorRtEngine(path, TensorRtKind.tolerance).infer(sample)["noise_pred"]

    a = run(plan_a.read_bytes())
    b_plan = refit_plan(plan_a.read_bytes(), weights_b)
    assert not np.array_equal(run(b_plan), a)
    np.testing.assert_array_equal(run(refit_plan(b_plan, weights_a)), a)


def test_refit_map_names_a_missing_weight(unet_onnx: onnx.ModelProto) -> None:
    with pytest.raises(ValueError, match=r"model\.nothing\.weight: 0 initializers"):
        refit_weight_map(unet_onnx, ["model.nothing.weight"])


def test_refit_map_refuses_an_initializer_two_weights_share(unet_onnx: onnx.ModelProto) -> None:
    """Setting a shared initializer would change the other weight too (an exporter may store equal
    constants once): here two Linear layers' pre-transposed weights made one."""
    shared = onnx.ModelProto()
    shared.CopyFrom(unet_onnx)
    initializers = {i.name: tuple(i.dims) for i in shared.graph.initializer}
    matmuls = [n for n in shared.graph.node if n.op_type == "MatMul" and "." not in n.input[1]]
    matmuls = [n for n in matmuls if n.input[1] in initializers]
    one = matmuls[0]
    other = next(n for n in matmuls[1:] if initializers[n.input[1]] == initializers[one.input[1]])
    scopes = [next(p.value for p in n.metadata_props if p.key == SCOPES_KEY) for n in (one, other)]
    weights = [f"{ast.literal_eval(scope)[-2]}.weight" for scope in scopes]
    assert refit_weight_map(shared, weights)  # apart, each has its own
    other.input[1] = one.input[1]
    with pytest.raises(ValueError, match="shared with"):
        refit_weight_map(shared, weights[:1])


def test_prepare_onnx_keeps_outputs_and_names(
    repository: Path, unet_onnx: onnx.ModelProto, specs: dict[str, StageSpec], dims: ModelDims, tmp_path: Path
) -> None:
    import onnxruntime as ort

    prepared = prepare_onnx(repository / "unet" / "1" / "model.onnx", tmp_path / "prepared.onnx")
    model = onnx.load(str(prepared))
    onnx.checker.check_model(model)
    assert len(model.graph.node) <= len(unet_onnx.graph.node)
    assert model.graph.value_info  # shapes inferred for the intermediate tensors
    # Refit names survive the preparation (TensorRT parses the prepared file).
    refit = refit_weight_map(
        unet_onnx, [n for n in (i.name for i in unet_onnx.graph.initializer) if n.endswith("to_out.0.bias")]
    )
    kept = {i.name for i in model.graph.initializer}
    assert refit and all(p.initializer in kept for p in refit.values())
    spec = specs["unet"]
    sample = spec.sample_inputs(2, image_sizes(dims, 32, 48), dims.vocab_size)
    runs = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, sample)
        for p in (repository / "unet" / "1" / "model.onnx", prepared)
    ]
    np.testing.assert_allclose(runs[1][0], runs[0][0], atol=1e-5)


def test_fp16_report() -> None:
    big = numpy_helper.from_array(np.array([1.0, 1e5], np.float32), "big")
    tiny = numpy_helper.from_array(np.full(8, 1e-9, np.float32), "tiny")
    fine = numpy_helper.from_array(np.array([0.0, 1e-9, *[1.0] * 198, 60000.0], np.float32), "fine")
    ids = numpy_helper.from_array(np.array([10**6], np.int64), "ids")
    graph = helper.make_graph([], "g", [], [], initializer=[big, tiny, fine, ids])
    report = fp16_report(helper.make_model(graph))
    # `fine`: one tiny value in 200 flushing to zero is normal, not reported.
    assert [(i.name, i.kind, i.count) for i in report] == [("big", "overflow", 1), ("tiny", "underflow", 8)]
    assert report[0].max_abs == 1e5


def test_export_fails_fast_without_tensorrt(tiny_model: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    if HAS_TENSORRT:
        pytest.skip("tensorrt is importable here")
    from birdgen.cli import main
    from birdgen.engines import engine_kind

    with pytest.raises(ValueError, match=r"tensorrt is not importable here.*NVIDIA's container"):
        engine_kind("tensorrt")
    out = tmp_path / "repo"
    assert main(["export", "--model-dir", str(tiny_model), "--out", str(out), "--engine", "tensorrt"]) == 2
    assert "tensorrt is not importable here" in capsys.readouterr().err
    assert not out.exists()  # nothing written


@NEEDS_TENSORRT
def test_plan_builds_and_matches_onnxruntime(
    repository: Path, specs: dict[str, StageSpec], dims: ModelDims, tmp_path: Path
) -> None:
    from birdgen.engines.tensorrt import TensorRtEngine, TensorRtKind, build_plan

    spec = specs["unet"]
    prepared = prepare_onnx(repository / "unet" / "1" / "model.onnx", tmp_path / "prepared.onnx")
    settings = TensorRtSettings(hot_sizes_px=(512,))
    cache = tmp_path / "timing.cache"
    plan = build_plan(prepared, tmp_path / PLAN_FILE, profiles(spec, (512,)), settings, cache)
    assert cache.stat().st_size > 0  # the timing cache is persisted for the next build
    import onnxruntime as ort

    sample = spec.sample_inputs(2, image_sizes(dims, 32, 48), dims.vocab_size)
    want = ort.InferenceSession(str(prepared), providers=["CPUExecutionProvider"]).run(None, sample)[0]
    got = TensorRtEngine(plan, TensorRtKind.tolerance).infer(sample)["noise_pred"]
    np.testing.assert_allclose(got, want, atol=TensorRtKind.tolerance["FP32"])


@pytest.mark.parametrize("stage", ["controlnet_openpose", "controlled_unet", "svd_unet", "svd_vae_decoder"])
def test_the_controlnet_and_svd_graphs_survive_the_tensorrt_preparation(
    repository: Path, tmp_path: Path, stage: str
) -> None:
    """What TensorRT would parse (issues 17, 18): the prepared graph of each new stage keeps its
    inputs and outputs and computes what the exported one does (the UINT8 control picture and the
    SVD axes included); the plans themselves need NVIDIA's container."""
    import json

    import onnxruntime as ort

    from birdgen.stages import repository_specs, svd_from_info

    manifest = json.loads((repository / "manifest.json").read_text())
    spec = repository_specs(manifest)[stage]
    exported = repository / stage / "1" / "model.onnx"
    prepared = onnx.load(str(prepare_onnx(exported, tmp_path / "prepared.onnx")))
    onnx.checker.check_model(prepared)
    assert [i.name for i in prepared.graph.input] == [t.name for t in spec.inputs]
    assert [o.name for o in prepared.graph.output] == [t.name for t in spec.outputs]
    svd = svd_from_info(manifest)
    if stage.startswith("svd") and svd is not None:
        sizes = image_sizes(svd[0], 32, 32, frames=3, chunk=2)
    else:
        sizes = image_sizes(ModelDims.from_dict(manifest["dims"]), 32, 48)
    sample = spec.sample_inputs(2, sizes, ModelDims.from_dict(manifest["dims"]).vocab_size)
    runs = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, sample)
        for p in (exported, tmp_path / "prepared.onnx")
    ]
    for ours, theirs in zip(runs[1], runs[0], strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-5 if ours.dtype != np.uint8 else 1)
