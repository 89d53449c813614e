"""Export: the tiny model folder, ONNX engines checked against torch, configs, manifest, skip-if-unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from birdgen.contracts import CONTROLNET_KINDS, MANIFEST, controlnet_folder
from birdgen.engines import engine_kind
from birdgen.engines.modules import stage_module
from birdgen.export.exporter import export_repository
from birdgen.manifest import verify_manifest
from birdgen.model_folder import REQUIRED_PARTS, ModelDims, ModelFolderError, check_model_folder
from birdgen.schema import LIMITS
from birdgen.stages import image_sizes, stage_specs
from birdgen.triton_config import parse_pbtxt, stage_config
from tests.conftest import ENTRY_INSTANCES, EXPORT_OPTIONS


def test_tiny_model_has_the_sdxl_turbo_layout(tiny_model: Path) -> None:
    index = check_model_folder(tiny_model)
    assert index["scheduler"] == ["diffusers", "EulerAncestralDiscreteScheduler"]
    scheduler = json.loads((tiny_model / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["timestep_spacing"] == "trailing" and scheduler["prediction_type"] == "epsilon"
    unet = json.loads((tiny_model / "unet" / "config.json").read_text())
    assert unet["addition_embed_type"] == "text_time"
    pads = [
        json.loads((tiny_model / t / "tokenizer_config.json").read_text())["pad_token"]
        for t in ("tokenizer", "tokenizer_2")
    ]
    assert pads == ["<|endoftext|>", "!"]
    dims = ModelDims.from_folder(tiny_model)
    assert dims.vae_scale_factor == 8 and dims.pixel_stride == 32 and dims.text_hidden != dims.text_hidden_2


def test_tiny_model_is_reproducible(tiny_model: Path, tmp_path: Path) -> None:
    from birdgen.tiny_model import write_tiny_model

    again = write_tiny_model(tmp_path / "again")
    weights = ["unet", *(controlnet_folder(kind) for kind in CONTROLNET_KINDS)]
    rels = [f"{part}/diffusion_pytorch_model.safetensors" for part in weights]
    for rel in (*rels, "tokenizer/vocab.json", "tokenizer/merges.txt"):
        assert (again / rel).read_bytes() == (tiny_model / rel).read_bytes()


@pytest.mark.parametrize("part", sorted(REQUIRED_PARTS))
def test_missing_part_is_named(tiny_model: Path, tmp_path: Path, part: str) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    shutil.rmtree(broken / part)
    with pytest.raises(ModelFolderError, match=f"'{part}'"):
        check_model_folder(broken)


def test_not_a_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match=r"model_index\.json"):
        check_model_folder(tmp_path)


def test_every_stage_engine_matches_torch(tiny_model: Path, repository: Path) -> None:
    """ONNX Runtime vs torch per stage, on shapes the export check did not use (batch 3, 320x448 px)."""
    dims = ModelDims.from_folder(tiny_model)
    kind = engine_kind("onnxruntime")
    manifest = json.loads((repository / MANIFEST).read_text())
    for name, spec in stage_specs(dims).items():
        assert manifest["stages"][name]["max_abs_error"] < 1e-3 or name == "vae_decoder"
        engine = kind.load(spec, repository / name / "1")
        module = stage_module(tiny_model, name)
        batch = 3 if spec.max_batch_size >= 3 else 2
        sample = spec.sample_inputs(batch, image_sizes(dims, 40, 56), dims.vocab_size, seed=11)
        got = engine.infer(sample)
        with torch.no_grad():
            want = module(*(torch.from_numpy(sample[t.name]) for t in spec.inputs))
        for tensor, expected in zip(spec.outputs, want, strict=True):
            diff = np.abs(got[tensor.name].astype(np.float64) - expected.numpy().astype(np.float64))
            assert got[tensor.name].shape == tuple(expected.shape)
            # float stages: reordered sums only; the uint8 VAE output: a .5 boundary flips one level at most
            assert diff.max() <= (1 if tensor.dtype == "UINT8" else 1e-4), (name, tensor.name, diff.max())


def test_configs_are_valid_triton_model_configs(repository: Path, tiny_model: Path) -> None:
    specs = stage_specs(ModelDims.from_folder(tiny_model))
    for name, spec in specs.items():
        config = parse_pbtxt((repository / name / "config.pbtxt").read_text())
        assert config.name == name and config.max_batch_size == spec.max_batch_size
        assert [i.name for i in config.input] == [t.name for t in spec.inputs]
        assert [o.name for o in config.output] == [t.name for t in spec.outputs]
        assert list(config.dynamic_batching.preferred_batch_size) == list(spec.preferred_batch_sizes)
        assert config.model_warmup and config.parameters["stage"].string_value == name
        # Only the text encoders' outputs repeat (same prompt, any seed): only they use the cache.
        assert config.response_cache.enable == spec.cacheable == name.startswith("text_encoder")
        on_gpu = stage_config(spec, ModelDims.from_folder(tiny_model), {"backend": "python", "gpu": True})
        assert not on_gpu.response_cache.enable  # Triton caches CPU buffers; GPU outputs stay there
        assert not config.dynamic_batching.HasField("default_queue_policy")  # only entries are bounded
    entry = parse_pbtxt((repository / "bird_image" / "config.pbtxt").read_text())
    assert entry.response_cache.enable and entry.instance_group[0].count == ENTRY_INSTANCES
    for name in ("bird_image", "bird_animation", "bird_animation_stream"):  # limits.yaml's queue bound
        queue = parse_pbtxt((repository / name / "config.pbtxt").read_text()).dynamic_batching
        assert queue.default_queue_policy.max_queue_size == LIMITS.serving.max_queue_size
    stream = parse_pbtxt((repository / "bird_animation_stream" / "config.pbtxt").read_text())
    assert stream.model_transaction_policy.decoupled and not stream.response_cache.enable
    assert [o.name for o in stream.output][-1] == "progress"


def test_manifest_lists_every_file_with_its_checksum(repository: Path, tiny_model: Path) -> None:
    manifest = json.loads((repository / MANIFEST).read_text())
    assert manifest["source"] == str(tiny_model.resolve()) and manifest["engine"] == "onnxruntime"
    files = {str(p.relative_to(repository)) for p in repository.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(manifest["files"]) == {f for f in files if "__pycache__" not in f}
    assert verify_manifest(repository) == []


def test_reexport_skips_unchanged_stages_and_redoes_a_damaged_one(
    repository: Path, tiny_model: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(repository, repo)
    before = json.loads((repo / MANIFEST).read_text())
    messages: list[str] = []
    after = export_repository(tiny_model, repo, **EXPORT_OPTIONS, progress=messages.append)
    assert all("up to date" in m for m in messages) and len(messages) == len(before["stages"])
    assert after["model_version"] == before["model_version"] and after["files"] == before["files"]

    onnx = repo / "text_encoder" / "1" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-10])
    assert verify_manifest(repo) == ["text_encoder/1/model.onnx"]
    (repo / "unet" / "1" / "model.py").write_text("stale")
    messages.clear()
    export_repository(tiny_model, repo, **EXPORT_OPTIONS, progress=messages.append)
    assert [m.split(":")[0] for m in messages if "exporting" in m] == ["text_encoder"]
    assert verify_manifest(repo) == []
    assert "TritonPythonModel" in (repo / "unet" / "1" / "model.py").read_text()  # stale code rewritten


def test_real_sdxl_layout_loads_fp16_variant_weights(tiny_model: Path, tmp_path: Path) -> None:
    """sdxl-turbo ships some parts only as *.fp16.safetensors; the loader must take those."""
    from birdgen.model_folder import load_part

    folder = tmp_path / "fp16only"
    shutil.copytree(tiny_model, folder)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.rename(folder / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    vae = load_part(folder, "vae")
    assert next(vae.parameters()).dtype == torch.float32
