"""The torch engine kind: parity with ONNX Runtime and diffusers on CPU, rebuilt from its own files,
hosted as Triton asks; its GPU paths (fp16, CUDA graphs captured at load, DLPack on the device) where
CUDA exists."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from birdgen.client import BirdClient
from birdgen.engines import engine_kind
from birdgen.engines.modules import UNet, stage_module
from birdgen.engines.torch import RECIPE_FILE, WEIGHTS_FILE, TorchEngine, TorchKind, optimise
from birdgen.ensemble.triton_model import run_batched, timed
from birdgen.export.exporter import export_repository
from birdgen.model_folder import ModelDims
from birdgen.server import TritonServer
from birdgen.stages import StageSpec, captured_sizes, image_sizes, repository_specs, stage_specs
from birdgen.triton_config import parse_pbtxt, stage_config, to_pbtxt
from tests.conftest import ROBIN
from tests.loras import random_lora
from tests.test_parity import assert_close_to_reference, diffusers_image

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: the torch kind's fp16, CUDA-graph and on-device DLPack paths run only there",
)


@pytest.fixture(scope="module")
def torch_repository(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported with the torch kind for CPU hosting (no ONNX, exact checks; the checks
    run every stage at two sizes, the motion UNet's clips the longest, so two processes)."""
    repo = tmp_path_factory.mktemp("torch-repo") / "model_repository"
    manifest = export_repository(
        tiny_model,
        repo,
        engine="torch",
        device="cpu",
        max_frames=96,
        entry_instances=1,
        progress=lambda _: None,
        jobs=2,
    )
    assert manifest["engine"] == "torch"
    # The CPU engine is the rebuilt module itself: the export's check finds float reordering at most
    # (the rebuilt motion UNet's attention kernels sum in another order on some CPUs: 1.3e-6 on an
    # AMD EPYC, 0 elsewhere).
    assert all(stage["max_abs_error"] <= 1e-5 for stage in manifest["stages"].values())
    return repo


def specs_of(repo: Path) -> dict[str, StageSpec]:
    return repository_specs(json.loads((repo / "manifest.json").read_text()))


def close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], spec: StageSpec, tolerance: float) -> None:
    for tensor in spec.outputs:
        a, b = got[tensor.name].astype(np.float64), want[tensor.name].astype(np.float64)
        assert a.shape == b.shape, (spec.name, tensor.name)
        # uint8 pixels: a float on a .5 rounding boundary flips one level
        limit = 1 if tensor.dtype == "UINT8" else tolerance
        assert np.abs(a - b).max() <= limit, (spec.name, tensor.name, np.abs(a - b).max())


def test_every_stage_matches_the_onnxruntime_engine(
    tiny_model: Path, repository: Path, torch_repository: Path
) -> None:
    """torch kind vs ONNX Runtime kind, per stage (motion UNet included), on shapes neither export
    checked: batch 2, 128x192 px, a 20-frame clip."""
    dims = ModelDims.from_folder(tiny_model)
    torch_kind, ort_kind = engine_kind("torch", "cpu"), engine_kind("onnxruntime")
    specs = specs_of(torch_repository)
    assert set(specs) == set(specs_of(repository)) >= {"unet", "motion_unet"}
    for name, spec in specs.items():
        sample = spec.sample_inputs(
            min(2, spec.max_batch_size), image_sizes(dims, 16, 24, 20), dims.vocab_size, seed=5
        )
        ours = torch_kind.load(spec, torch_repository / name / "1")
        assert isinstance(ours, TorchEngine) and ours.dtype == torch.float32 and not ours.prepared
        theirs = ort_kind.load(spec, repository / name / "1").infer(sample)
        close(ours.infer(sample), theirs, spec, 1e-4)


def test_image_through_torch_engines_matches_diffusers(torch_repository: Path, reference_pipeline) -> None:
    """The whole pipeline in-process on the torch repository vs StableDiffusionXLPipeline."""
    from birdgen.ensemble.pipeline import ImagePipeline
    from birdgen.ensemble.runners import LocalRunner
    from birdgen.schema import parse_image_request

    pipeline = ImagePipeline(torch_repository / "bird_image" / "1", LocalRunner(torch_repository))
    request = parse_image_request({**ROBIN, "steps": 2, "width": 320, "height": 256, "seed": 77})
    result = pipeline(request)
    assert_close_to_reference(result.pixels, diffusers_image(reference_pipeline, result.metadata, 77))


@pytest.mark.triton
def test_served_image_through_torch_stages_matches_diffusers(
    torch_repository: Path, reference_pipeline
) -> None:
    """One request through real Triton: the stage models run the torch engines and pass tensors by
    DLPack (run_batched's TensorEngine path), on CPU here."""
    assert 'string_value: "torch"' in (torch_repository / "unet" / "config.pbtxt").read_text()
    image_models = ["bird_image", "text_encoder", "text_encoder_2", "unet", "vae_decoder"]
    with (
        TritonServer(torch_repository, model_control="explicit", load_models=image_models) as server,
        BirdClient(server.grpc_url) as client,
    ):
        served = client.generate_image(**{**ROBIN, "seed": 2024})
    pixels = np.asarray(Image.open(io.BytesIO(served.data)).convert("RGB"))
    assert_close_to_reference(pixels, diffusers_image(reference_pipeline, served.metadata, 2024))


def test_build_writes_a_recipe_and_weights_that_load_without_the_source(
    tiny_model: Path, tmp_path: Path
) -> None:
    """A family UNet (LoRA fused) built from a folder that is gone when it loads: same outputs exactly,
    from a JSON recipe and a safetensors file (nothing pickled)."""
    from birdgen.export.lora import fused_unet

    source = shutil.copytree(tiny_model, tmp_path / "source")
    lora = random_lora(source, tmp_path / "lora", seed=3)
    module = UNet(fused_unet(source, lora, "Passeriformes")).eval()
    dims = ModelDims.from_folder(source)
    spec = stage_specs(dims)["unet"]
    version = tmp_path / "unet_passeriformes" / "1"
    version.mkdir(parents=True)
    kind = TorchKind("cpu")
    assert kind.build(spec, module, {}, version) == [version / RECIPE_FILE, version / WEIGHTS_FILE]
    shutil.rmtree(source)
    shutil.rmtree(tmp_path / "lora")
    recipe = json.loads((version / RECIPE_FILE).read_text())
    assert recipe["wrapper"] == "UNet" and recipe["model"]["class"] == "UNet2DConditionModel"
    assert recipe["settings"]["device"] == "cpu"

    sample = spec.sample_inputs(2, image_sizes(dims, 16, 24), dims.vocab_size, seed=9)
    got = kind.load(spec, version).infer(sample)["noise_pred"]
    with torch.no_grad():
        want = module(*(torch.from_numpy(sample[t.name]) for t in spec.inputs))[0].numpy()
        base = stage_module(tiny_model, "unet")(*(torch.from_numpy(sample[t.name]) for t in spec.inputs))[0]
    assert np.array_equal(got, want)
    assert np.abs(got - base.numpy()).max() > 1e-3  # the LoRA is in there


@pytest.mark.parametrize("stage", ["unet", "vae_decoder", "motion_unet"])
def test_gpu_preparation_keeps_the_numbers_on_cpu(
    torch_repository: Path, tiny_model: Path, stage: str
) -> None:
    """`optimise` in float32 on CPU: fused QKV projections (FusedAttnProcessor2_0), channels-last
    weights; the outputs stay those of the plain module. (fp16 and graphs need CUDA, below.)"""
    dims = ModelDims.from_folder(tiny_model)
    spec = specs_of(torch_repository)[stage]
    kind = engine_kind("torch", "cpu")
    plain = kind.load(spec, torch_repository / stage / "1")
    fast = optimise(kind.load(spec, torch_repository / stage / "1").module, torch.device("cpu"), half=False)
    processors = {
        type(p).__name__
        for p in (fast.model if stage != "vae_decoder" else fast.vae).attn_processors.values()
    }
    assert processors == {"FusedAttnProcessor2_0"}
    convs = [m.weight for m in fast.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    sample = spec.sample_inputs(1, image_sizes(dims, 8, 16, 16), dims.vocab_size, seed=2)
    close(TorchEngine(spec, fast, torch.device("cpu")).infer(sample), plain.infer(sample), spec, 1e-4)


def test_triton_hosting_follows_the_target_device(tiny_model: Path) -> None:
    dims = ModelDims.from_folder(tiny_model)
    spec = stage_specs(dims)["unet"]
    gpu = parse_pbtxt(to_pbtxt(stage_config(spec, dims, TorchKind("cuda").triton_hosting(spec))))
    assert gpu.backend == "python" and gpu.parameters["engine"].string_value == "torch"
    assert gpu.instance_group[0].kind == gpu.instance_group[0].KIND_GPU
    assert gpu.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
    cpu = stage_config(spec, dims, TorchKind("cpu").triton_hosting(spec))
    assert cpu.instance_group[0].kind == cpu.instance_group[0].KIND_CPU
    assert "FORCE_CPU_ONLY_INPUT_TENSORS" not in cpu.parameters
    assert TorchKind("cuda").settings != TorchKind("cpu").settings  # a re-export for the other target
    with pytest.raises(ValueError, match="allowed: cpu, cuda"):
        TorchKind("tpu")
    with pytest.raises(ValueError, match="onnxruntime kind is hosted on cpu"):
        engine_kind("onnxruntime", "cuda")


def test_captured_shape_buckets_come_from_the_spec(tiny_model: Path) -> None:
    dims = ModelDims.from_folder(tiny_model)
    specs = repository_specs({"dims": dims.to_dict(), "motion_max_frames": 96})
    assert captured_sizes(specs["text_encoder"]) == [{}]
    assert captured_sizes(specs["unet"]) == [
        {"latent_height": 64, "latent_width": 64},
        {"latent_height": 128, "latent_width": 128},
    ]
    clip = captured_sizes(specs["motion_unet"], (512,))
    assert clip == [
        {"latent_height": 64, "latent_width": 64, "frames": 16, "windows": 1, "window_length": 16}
    ]
    engine = TorchEngine(specs["vae_decoder"], torch.nn.Linear(1, 1), torch.device("cpu"))
    buckets = engine.bucket_inputs((512, 1024))
    assert len(buckets) == 2 * specs["vae_decoder"].max_batch_size
    assert tuple(buckets[0][0].shape) == (4, 4, 128, 128)  # largest first


# -- the stage model's DLPack path, with a stand-in for triton_python_backend_utils ---------------------


class FakeTensor:
    def __init__(self, name: str, value: Any) -> None:
        self.name, self.value = name, torch.as_tensor(value)

    def to_dlpack(self) -> Any:
        return torch.utils.dlpack.to_dlpack(self.value)

    def as_numpy(self) -> np.ndarray:
        return self.value.numpy()

    @classmethod
    def from_dlpack(cls, name: str, capsule: Any) -> FakeTensor:
        return cls(name, torch.from_dlpack(capsule))


class FakePb:
    Tensor = FakeTensor

    class InferenceResponse:
        def __init__(self, output_tensors: list[FakeTensor] | None = None, error: Any = None) -> None:
            self.outputs = {t.name: t.value for t in output_tensors or []}
            self.error = error

    @staticmethod
    def get_input_tensor_by_name(request: dict[str, FakeTensor], name: str) -> FakeTensor:
        return request[name]


def served_batches(engine: TorchEngine, spec: StageSpec, device: str) -> Iterator[tuple[dict, dict]]:
    """Three requests (batch 1, 2, 1) merged by run_batched: each response with its own inputs."""
    sizes = {"latent_height": 8, "latent_width": 8}
    requests = [
        {
            name: FakeTensor(name, torch.from_numpy(value).to(device))
            for name, value in spec.sample_inputs(batch, sizes, vocab_size=100, seed=batch).items()
        }
        for batch in (1, 2, 1)
    ]
    added: list[float] = []
    responses = run_batched(FakePb, spec, timed(engine, added.append), requests)
    assert len(added) == 1 and len(responses) == 3
    for request, response in zip(requests, responses, strict=True):
        assert response.error is None
        yield {n: t.value for n, t in request.items()}, response.outputs


def test_stage_execute_passes_tensors_by_dlpack(torch_repository: Path) -> None:
    spec = specs_of(torch_repository)["text_encoder_2"]
    engine = engine_kind("torch", "cpu").load(spec, torch_repository / "text_encoder_2" / "1")
    for inputs, outputs in served_batches(engine, spec, "cpu"):
        alone = engine.infer_tensors(inputs)
        for name, value in outputs.items():
            assert value.shape == alone[name].shape and torch.allclose(value, alone[name], atol=1e-5)


# -- GPU only ----------------------------------------------------------------------------------------------


@needs_cuda
def test_gpu_fp16_stages_track_cpu_float32(torch_repository: Path, tiny_model: Path) -> None:
    dims = ModelDims.from_folder(tiny_model)
    kind = engine_kind("torch", "cpu")
    for name, spec in specs_of(torch_repository).items():
        sample = spec.sample_inputs(1, image_sizes(dims, 64, 64, 16), dims.vocab_size, seed=4)
        gpu = kind.load(spec, torch_repository / name / "1", "cuda:0")
        cpu = kind.load(spec, torch_repository / name / "1").infer(sample)
        got = gpu.infer(sample)
        for tensor in spec.outputs:
            diff = np.abs(got[tensor.name].astype(np.float64) - cpu[tensor.name].astype(np.float64))
            # fp16 (UNets, text encoders) and TF32 convolutions in the float32 VAE
            limit = 4 if tensor.dtype == "UINT8" else 3e-2 * max(1.0, np.abs(cpu[tensor.name]).max())
            assert diff.max() <= limit, (name, tensor.name, diff.max())


@needs_cuda
def test_gpu_graphs_are_captured_at_load_and_replayed_without_python(
    torch_repository: Path, tiny_model: Path
) -> None:
    dims = ModelDims.from_folder(tiny_model)
    spec = specs_of(torch_repository)["unet"]
    engine = engine_kind("torch", "cpu").load(spec, torch_repository / "unet" / "1", "cuda:0")
    assert engine.dtype == torch.float16
    assert len(engine.prepared) == len(captured_sizes(spec)) * spec.max_batch_size
    at_512 = spec.sample_inputs(3, image_sizes(dims, 64, 64), dims.vocab_size, seed=1)
    other = spec.sample_inputs(1, image_sizes(dims, 40, 48), dims.vocab_size, seed=1)
    eager = {k: torch.from_numpy(v).cuda() for k, v in at_512.items()}
    with torch.inference_mode():
        want = engine.module(*(engine._input(t, eager[t.name]) for t in spec.inputs))[0].float()

    def no_python(*args: Any) -> Any:
        raise AssertionError("the module ran: no graph for this shape")

    engine.module = no_python  # type: ignore[assignment]
    got = engine.infer_tensors(eager)["noise_pred"]
    assert torch.allclose(got, want, atol=1e-3)
    assert len(engine.prepared) == len(captured_sizes(spec)) * spec.max_batch_size  # nothing new
    with pytest.raises(AssertionError, match="the module ran"):
        engine.infer(other)  # an uncaptured size runs eagerly (and captures nothing)


@needs_cuda
def test_gpu_stage_keeps_tensors_on_the_device(torch_repository: Path) -> None:
    spec = specs_of(torch_repository)["unet"]
    engine = engine_kind("torch", "cpu").load(spec, torch_repository / "unet" / "1", "cuda:0")
    for _, outputs in served_batches(engine, spec, "cuda"):
        assert all(value.is_cuda and value.dtype == torch.float32 for value in outputs.values())


# -- the entry loop keeps its tensors where the stages answer -------------------------------------------


def stage_inputs_seen(repository: Path, device: str, pipeline_class: type, request: Any) -> tuple[Any, dict]:
    """Run `request` in-process on `device`, noting the type and device of every stage input."""
    from birdgen.ensemble.runners import LocalRunner

    seen: dict[tuple[str, str], set[tuple[type, str]]] = {}

    class Recording(LocalRunner):
        def run(self, stage: str, inputs: Any, model: str | None = None, version: int = 1) -> Any:
            for name, value in inputs.items():
                where = value.device.type if isinstance(value, torch.Tensor) else "host"
                seen.setdefault((stage, name), set()).add((type(value), where))
            return super().run(stage, inputs, model, version)

    result = pipeline_class(repository / "bird_image" / "1", Recording(repository, device))(request)
    return result, seen


def assert_device_resident(seen: dict, device: str) -> None:
    """Only token ids come from the host (the tokenizers); every other stage input is a tensor already
    on the stages' device: latents, noise predictions and embeddings never visit the host."""
    for (stage, name), kinds in seen.items():
        want = "cpu" if name == "input_ids" else torch.device(device).type
        assert kinds == {(torch.Tensor, want)}, (stage, name, kinds)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda:0", marks=needs_cuda)])
def test_image_loop_keeps_tensors_on_the_stage_device(
    torch_repository: Path, reference_pipeline, device: str
) -> None:
    from birdgen.ensemble.pipeline import ImagePipeline
    from birdgen.schema import parse_image_request

    request = parse_image_request({**ROBIN, "steps": 2, "width": 256, "height": 256, "seed": 5})
    result, seen = stage_inputs_seen(torch_repository, device, ImagePipeline, request)
    assert {stage for stage, _ in seen} == {"text_encoder", "text_encoder_2", "unet", "vae_decoder"}
    assert_device_resident(seen, device)
    want = diffusers_image(reference_pipeline, result.metadata, 5)
    if device == "cpu":
        assert_close_to_reference(result.pixels, want)
    else:  # fp16 stages against diffusers' float32 on CPU (stated tolerance, in uint8 levels)
        diff = np.abs(result.pixels.astype(np.int16) - want.astype(np.int16))
        assert diff.mean() <= 2.0 and np.percentile(diff, 99) <= 12, (diff.mean(), diff.max())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda:0", marks=needs_cuda)])
def test_clip_loop_keeps_tensors_on_the_stage_device(torch_repository: Path, device: str) -> None:
    from birdgen.ensemble.animation import AnimationPipeline
    from birdgen.schema import AnimationRequest
    from tests.conftest import CLIP

    request = AnimationRequest(**CLIP, steps=2, format="webp")
    result, seen = stage_inputs_seen(torch_repository, device, AnimationPipeline, request)
    assert ("motion_unet", "context_blend") in seen and ("vae_decoder", "latent") in seen
    assert_device_resident(seen, device)
    assert result.frames.shape == (16, 256, 256, 3) and result.frames.dtype == np.uint8
