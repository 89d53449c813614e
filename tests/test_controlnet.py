"""The tiny ControlNets (issue 17, docs/controlnet.md): diffusers loads them, their residuals are not
zero (a parity test on zero residuals would pass with ControlNets ignored) and differ between the two
kinds, and a ControlNet that does not fit the UNet is refused, naming what does not fit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from birdgen.contracts import CONTROLNET_KINDS, controlnet_folder
from birdgen.model_folder import ModelFolderError, check_model_folder, load_controlnet
from birdgen.prompts import DataFileError
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
