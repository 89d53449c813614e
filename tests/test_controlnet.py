"""The tiny ControlNets (issue 17, docs/controlnet.md): diffusers loads them, their residuals are not
zero (a parity test on zero residuals would pass with ControlNets ignored) and differ between the two
kinds, and a ControlNet that does not fit the UNet is refused, naming what does not fit."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from birdgen.contracts import CONTROLLED_UNET, CONTROLNET_KINDS, controlnet_folder
from birdgen.engines.modules import ControlledUNet, ControlNet, UNet, controlnet_module
from birdgen.engines.tensorrt_profiles import profiles
from birdgen.engines.torch import TorchEngine
from birdgen.model_folder import ModelDims, ModelFolderError, check_model_folder, load_controlnet, load_part
from birdgen.prompts import DataFileError
from birdgen.schema import LIMITS
from birdgen.stages import (
    StageSpec,
    captured_sizes,
    control_residuals,
    control_stage_specs,
    controlled_unet_spec,
    controlnet_spec,
    image_sizes,
    scaled_axes,
    stage_specs,
)
from birdgen.tiny_model import ModelPresets


def _residuals(controlnet: torch.nn.Module, dims: dict[str, int]) -> list[torch.Tensor]:
    """One small forward pass (latent 8x8, so the control image is 64x64) with fixed inputs."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        down, mid = controlnet(
            torch.randn(1, 4, 8, 8, generator=generator),
            torch.tensor([999]),
            encoder_hidden_states=torch.randn(1, 5, dims["cross"], generator=generator),
            controlnet_cond=torch.rand(1, 3, 64, 64, generator=generator),
            added_cond_kwargs={
                "text_embeds": torch.randn(1, dims["pooled"], generator=generator),
                "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
            },
            return_dict=False,
        )
    return [*down, mid]


def test_tiny_controlnets_load_and_give_distinct_nonzero_residuals(tiny_model: Path) -> None:
    from diffusers import ControlNetModel

    unet = json.loads((tiny_model / "unet" / "config.json").read_text())
    pooled = unet["projection_class_embeddings_input_dim"] - 6 * unet["addition_time_embed_dim"]
    dims = {"cross": unet["cross_attention_dim"], "pooled": pooled}
    outputs = {}
    for kind in CONTROLNET_KINDS:
        folder = tiny_model / controlnet_folder(kind)
        check_model_folder(tiny_model, controlnet=folder)
        net = ControlNetModel.from_pretrained(folder, use_safetensors=True).eval()
        assert dict(load_controlnet(folder, tiny_model).config) == dict(net.config)
        outputs[kind] = _residuals(net, dims)
        # 6 down residuals + mid at levels (32, 64, 64) with 1 layer each (docs/controlnet.md's table).
        assert [r.shape[1:] for r in outputs[kind]] == [
            (32, 8, 8), (32, 8, 8), (32, 4, 4), (64, 4, 4), (64, 2, 2), (64, 2, 2), (64, 2, 2)
        ]  # fmt: skip
        assert all(r.abs().max() > 1e-3 for r in outputs[kind]), f"{kind}: a residual is zero"
    openpose, depth = outputs.values()
    assert all(not torch.allclose(a, b) for a, b in zip(openpose, depth, strict=True))


def test_a_controlnet_that_does_not_fit_the_unet_is_refused_naming_the_keys(
    tiny_model: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "controlnet"
    shutil.copytree(tiny_model / controlnet_folder("depth"), bad)
    config = json.loads((bad / "config.json").read_text())
    config |= {"cross_attention_dim": 64, "block_out_channels": [32, 64, 128]}
    config["conditioning_embedding_out_channels"] = [8, 16, 32]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError) as refused:
        check_model_folder(tiny_model, controlnet=bad)
    message = str(refused.value)
    assert "cross_attention_dim: controlnet 64, expected 80" in message
    assert "block_out_channels: controlnet [32, 64, 128], expected [32, 64, 64]" in message
    assert "conditioning_embedding_out_channels" in message and "addition_time_embed_dim" not in message
    with pytest.raises(ModelFolderError, match="cross_attention_dim"):
        load_controlnet(bad, tiny_model)


def test_a_pickle_only_controlnet_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "controlnet"
    folder.mkdir()
    shutil.copy(tiny_model / controlnet_folder("openpose") / "config.json", folder)
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ModelFolderError, match="pickle"):
        load_controlnet(folder, tiny_model)


def test_diffusers_controlnet_pipeline_runs_on_the_tiny_parts(tiny_model: Path, reference_pipeline) -> None:  # type: ignore[no-untyped-def]
    """The future parity reference: StableDiffusionXLControlNetPipeline over the session's loaded parts.
    At scale 0 it equals the plain pipeline exactly; at scale 1 the tiny net moves the image."""
    import numpy as np
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
    from PIL import Image

    controlnet = ControlNetModel.from_pretrained(
        tiny_model / controlnet_folder("openpose"), use_safetensors=True
    )
    pipe = StableDiffusionXLControlNetPipeline.from_pipe(reference_pipeline, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    control = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    common = {
        "guidance_scale": 0.0,
        "num_inference_steps": 1,
        "width": 256,
        "height": 256,
        "output_type": "np",
    }

    def draw(run, **kwargs):  # type: ignore[no-untyped-def]
        return run("a robin", generator=torch.Generator("cpu").manual_seed(1), **common, **kwargs).images[0]

    plain = draw(reference_pipeline)
    assert np.array_equal(draw(pipe, image=control, controlnet_conditioning_scale=0.0), plain)
    controlled = draw(pipe, image=control, controlnet_conditioning_scale=1.0)
    assert controlled.shape == (256, 256, 3) and np.abs(controlled - plain).max() > 10 / 255


def test_tiny_controlnet_config_is_diffusers_from_unet_but_slimmer(tiny_model: Path) -> None:
    """CONTROLNET_UNET_KEYS stays diffusers' own list: only the preset's overrides differ."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet", use_safetensors=True)
    tiny = ModelPresets.load()["tiny"].controlnet
    embedding = tuple(tiny["conditioning_embedding_out_channels"])
    from_unet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=embedding, load_weights_from_unet=False
    )
    expected = json.loads(json.dumps(dict(from_unet.config)))  # tuples as JSON lists
    written = json.loads((tiny_model / controlnet_folder("openpose") / "config.json").read_text())
    differing = {k for k, v in expected.items() if not k.startswith("_") and v != written[k]}
    assert differing == {"transformer_layers_per_block"}
    assert written["transformer_layers_per_block"] == tiny["transformer_layers_per_block"]


def test_a_controlnet_embedding_off_the_latent_grid_fails_at_preset_load(tmp_path: Path) -> None:
    text = (Path(__file__).parent.parent / "birdgen" / "data" / "model_presets.yaml").read_text()
    broken = tmp_path / "presets.yaml"
    broken.write_text(text.replace("[16, 32, 64, 128]", "[16, 32, 64]"))
    with pytest.raises(DataFileError, match=r"mini: .*conditioning_embedding_out_channels \[16, 32, 64\]"):
        ModelPresets.load(broken)


# -- slice 2: model dims, stage specs and the stage modules -----------------------------------------------


@pytest.fixture(scope="module")
def dims(tiny_model: Path) -> ModelDims:
    return ModelDims.from_folder(tiny_model)


@pytest.fixture(scope="module")
def unet(tiny_model: Path) -> torch.nn.Module:
    return load_part(tiny_model, "unet")


@pytest.fixture(scope="module")
def openpose(tiny_model: Path) -> ControlNet:
    return controlnet_module(tiny_model, tiny_model / controlnet_folder("openpose"))


def _stage_inputs(spec: StageSpec, dims: ModelDims, batch: int, lh: int, lw: int) -> list[torch.Tensor]:
    sample = spec.sample_inputs(batch, image_sizes(dims, lh, lw), dims.vocab_size, seed=lh + lw)
    return [torch.from_numpy(sample[t.name]) for t in spec.inputs]


def test_model_dims_carry_the_unet_widths_and_old_manifests_still_parse(dims: ModelDims) -> None:
    assert (dims.unet_channels, dims.unet_layers) == ((32, 64, 64), 1)
    assert ModelDims.from_dict(json.loads(json.dumps(dims.to_dict()))) == dims  # lists back into tuples
    old = {k: v for k, v in dims.to_dict().items() if k not in ("unet_channels", "unet_layers")}
    before = ModelDims.from_dict(old)
    assert (before.unet_channels, before.unet_layers) == ((), 0)
    assert stage_specs(before) == stage_specs(dims)  # the specs without ControlNets do not use them
    with pytest.raises(ValueError, match="re-export"):
        control_stage_specs(before, CONTROLNET_KINDS)


def test_a_per_level_layers_list_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    for part in tiny_model.iterdir():
        if part.name != "unet":
            (folder / part.name).symlink_to(part)
    (folder / "unet").mkdir()
    for file in (tiny_model / "unet").iterdir():
        (folder / "unet" / file.name).symlink_to(file)
    config = json.loads((tiny_model / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").unlink()
    (folder / "unet" / "config.json").write_text(json.dumps(config | {"layers_per_block": [1, 1, 2]}))
    with pytest.raises(ModelFolderError, match=r"layers_per_block \[1, 1, 2\] is a per-level list"):
        ModelDims.from_folder(folder)


def test_control_residuals_follow_the_design_table(dims: ModelDims) -> None:
    """SDXL-Turbo's widths give 9 + 1 residuals, tiny's 6 + 1 (docs/controlnet.md)."""
    sdxl = dataclasses.replace(dims, unet_channels=(320, 640, 1280), unet_layers=2)
    assert [(t.name, t.dims) for t in control_residuals(sdxl)] == [
        ("down_residual_0", (320, "latent_height", "latent_width")),
        ("down_residual_1", (320, "latent_height", "latent_width")),
        ("down_residual_2", (320, "latent_height", "latent_width")),
        ("down_residual_3", (320, "latent_height_2", "latent_width_2")),
        ("down_residual_4", (640, "latent_height_2", "latent_width_2")),
        ("down_residual_5", (640, "latent_height_2", "latent_width_2")),
        ("down_residual_6", (640, "latent_height_4", "latent_width_4")),
        ("down_residual_7", (1280, "latent_height_4", "latent_width_4")),
        ("down_residual_8", (1280, "latent_height_4", "latent_width_4")),
        ("mid_residual", (1280, "latent_height_4", "latent_width_4")),
    ]
    assert [t.dims[0] for t in control_residuals(dims)] == [32, 32, 32, 64, 64, 64, 64]
    specs = control_stage_specs(dims, CONTROLNET_KINDS)
    assert list(specs) == ["controlnet_openpose", "controlnet_depth", CONTROLLED_UNET]
    unet = stage_specs(dims)["unet"]
    residuals = control_residuals(dims)
    control = specs["controlnet_openpose"]
    assert control.inputs[:5] == unet.inputs and control.outputs == residuals
    assert [(t.name, t.dtype, t.dims) for t in control.inputs[5:]] == [
        ("controlnet_cond", "UINT8", ("image_height", "image_width", 3)),
        ("conditioning_scale", "FP32", (1,)),
    ]
    controlled = specs[CONTROLLED_UNET]
    assert controlled.inputs == (*unet.inputs, *residuals) and controlled.outputs == unet.outputs
    # The ControlNet axes as multiples of one root per direction (export_onnx's derived Dims).
    assert scaled_axes(control) == {
        "latent_height": ("latent_height_4", 4),
        "latent_height_2": ("latent_height_4", 2),
        "latent_height_4": ("latent_height_4", 1),
        "image_height": ("latent_height_4", 32),
        "latent_width": ("latent_width_4", 4),
        "latent_width_2": ("latent_width_4", 2),
        "latent_width_4": ("latent_width_4", 1),
        "image_width": ("latent_width_4", 32),
    }
    assert not any(scaled_axes(spec) for spec in stage_specs(dims).values())  # their graphs stay as they were
    sample = control.sample_inputs(3, image_sizes(dims, 8, 12), dims.vocab_size)
    image, scale = sample["controlnet_cond"], sample["conditioning_scale"]
    assert image.dtype == np.uint8 and image.shape == (3, 64, 96, 3) and image.max() > 200
    assert scale.dtype == np.float32 and scale.shape == (3, 1) and scale.min() >= 0 and scale.max() <= 2


def test_control_stage_buckets_have_every_axis(dims: ModelDims) -> None:
    """The torch kind's CUDA-graph buckets need the image and scaled axes (no KeyError at load)."""
    specs = control_stage_specs(dims, ["depth"])
    assert captured_sizes(specs["controlnet_depth"], (512, 1024))[1] == {
        "latent_height": 128, "latent_width": 128, "latent_height_2": 64, "latent_width_2": 64,
        "latent_height_4": 32, "latent_width_4": 32, "image_height": 1024, "image_width": 1024,
    }  # fmt: skip
    assert "image_height" not in captured_sizes(specs[CONTROLLED_UNET])[0]
    for spec in specs.values():
        engine = TorchEngine(spec, torch.nn.Linear(1, 1), torch.device("cpu"))
        assert len(engine.bucket_inputs((512,))) == spec.max_batch_size


@pytest.mark.parametrize("lh, lw", [(8, 8), (8, 12)])
def test_tiny_controlnet_residuals_have_the_spec_shapes(
    openpose: ControlNet, dims: ModelDims, lh: int, lw: int
) -> None:
    spec = controlnet_spec(dims, "openpose")
    with torch.no_grad():
        residuals = openpose(*_stage_inputs(spec, dims, 2, lh, lw))
    sizes = image_sizes(dims, lh, lw)
    assert [tuple(r.shape) for r in residuals] == [(2, *t.concrete(sizes)) for t in spec.outputs]


def test_controlled_unet_with_zero_residuals_is_the_unet_bit_for_bit(
    unet: torch.nn.Module, dims: ModelDims
) -> None:
    spec = controlled_unet_spec(dims)
    inputs = _stage_inputs(spec, dims, 2, 8, 12)
    zeros = [torch.zeros_like(r) for r in inputs[5:]]
    with torch.no_grad():
        (plain,) = UNet(unet)(*inputs[:5])
        (controlled,) = ControlledUNet(unet)(*inputs[:5], *zeros)
    assert torch.equal(plain, controlled)
    assert [n for n, _ in ControlledUNet(unet).named_parameters()] == [
        n for n, _ in UNet(unet).named_parameters()
    ]  # LoRA names model.<name>, as for the unet stage


def test_controlnet_wrapper_equals_diffusers_controlnet_and_unet(
    openpose: ControlNet, unet: torch.nn.Module, dims: ModelDims
) -> None:
    """Per-item scales equal diffusers' float conditioning_scale bit for bit, the uint8 image equals the
    pipeline's float one, and the controlled UNet on them equals diffusers' UNet on diffusers' residuals."""
    spec = controlnet_spec(dims, "openpose")
    sample, timestep, hidden, text_embeds, time_ids, pixels, _ = _stage_inputs(spec, dims, 2, 8, 12)
    scales = (0.8, 0.35)
    image = torch.from_numpy(pixels.numpy().astype(np.float32) / 255).permute(0, 3, 1, 2)  # the pipeline's
    added = {"text_embeds": text_embeds, "time_ids": time_ids}
    with torch.no_grad():
        ours = openpose(sample, timestep, hidden, text_embeds, time_ids, pixels, torch.tensor([scales]).T)
        for item, scale in enumerate(scales):
            down, mid = openpose.model(
                sample, timestep.reshape(-1), encoder_hidden_states=hidden, controlnet_cond=image,
                conditioning_scale=scale, added_cond_kwargs=added, return_dict=False,
            )  # fmt: skip
            assert all(torch.equal(a[item], b[item]) for a, b in zip(ours, (*down, mid), strict=True))
        # One scale for the batch: the pipeline's UNet call on diffusers' residuals of the last scale.
        same = torch.full((2, 1), scales[-1])
        residuals = openpose(sample, timestep, hidden, text_embeds, time_ids, pixels, same)
        (controlled,) = ControlledUNet(unet)(sample, timestep, hidden, text_embeds, time_ids, *residuals)
        want = unet(
            sample, timestep.reshape(-1), encoder_hidden_states=hidden, added_cond_kwargs=added,
            down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False,
        )[0]  # fmt: skip
    assert torch.equal(controlled, want)
    assert (controlled - UNet(unet)(sample, timestep, hidden, text_embeds, time_ids)[0]).abs().max() > 1e-3


def test_tensorrt_profiles_cover_every_axis_of_the_control_stages(dims: ModelDims) -> None:
    factor = dims.vae_scale_factor
    for spec in control_stage_specs(dims, CONTROLNET_KINDS).values():
        found = profiles(spec)
        axes = {d for t in spec.inputs for d in t.dims if isinstance(d, str)}
        assert axes <= spec.dynamic_axes.keys()
        for h in (LIMITS.height.min, LIMITS.height.default, LIMITS.height.max):
            for w in (LIMITS.width.min, LIMITS.width.max):
                size = image_sizes(dims, h // factor, w // factor)
                for batch in (1, spec.max_batch_size):
                    assert found[0].covers({t.name: (batch, *t.concrete(size)) for t in spec.inputs})
        assert [p.name for p in found] == ["dynamic", "static_64x64", "static_128x128"]
        pinned = found[2].shapes  # 1024 px: every axis fixed
        assert pinned["sample"][0][1:] == pinned["sample"][2][1:] == (4, 128, 128)
        assert all(low[1:] == high[1:] for low, _, high in pinned.values())
        if "controlnet_cond" in pinned:
            assert pinned["controlnet_cond"][0][1:] == (1024, 1024, 3)
