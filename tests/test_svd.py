"""Stable Video Diffusion (issue 18, docs/svd.md), slice 1: the tiny SVD folder and its loaders.

The folder `birdgen tiny-model` writes beside the SDXL parts must load in diffusers'
StableVideoDiffusionPipeline as it is and through birdgen's checked loaders, which a real
stable-video-diffusion-img2vid(-xt) folder passes too. Tiny sizes (64 px, 3 frames, 2 steps): each
pipeline call is ~0.1 s on 2 cores.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from birdgen.contracts import SVD_FOLDER, SVD_STAGES, family_of
from birdgen.model_folder import (
    SVD_PARTS,
    ModelFolderError,
    SvdDims,
    check_model_folder,
    check_svd_folder,
    load_svd_part,
)
from birdgen.tiny_model import SEED, SVD_SEED_OFFSET, ModelPresets, SvdPreset, write_svd_folder

# A conditioning picture of another size than the clip, so both of diffusers' resizes run (the
# antialiased one to 224 px for the image encoder, Lanczos to the clip size for the VAE).
PICTURE_SIZE = (96, 80)
CLIP = {"height": 64, "width": 64, "num_frames": 3, "num_inference_steps": 2}


def picture(seed: int = 0):  # type: ignore[no-untyped-def]
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (PICTURE_SIZE[1], PICTURE_SIZE[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def svd(tiny_model: Path) -> Path:
    return tiny_model / SVD_FOLDER


@pytest.fixture(scope="module")
def svd_pipeline(svd: Path):  # type: ignore[no-untyped-def]
    from diffusers import StableVideoDiffusionPipeline

    pipe = StableVideoDiffusionPipeline.from_pretrained(svd, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, seed: int, **overrides) -> np.ndarray:  # type: ignore[no-untyped-def]
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(picture(), generator=generator, output_type="np", **(CLIP | overrides)).frames


def test_the_tiny_svd_runs_in_diffusers(svd_pipeline) -> None:  # type: ignore[no-untyped-def]
    frames = run(svd_pipeline, seed=7)
    assert frames.shape == (1, CLIP["num_frames"], CLIP["height"], CLIP["width"], 3)
    assert np.isfinite(frames).all() and frames.min() >= 0 and frames.max() <= 1
    # Random weights, yet a picture to compare: few clamped pixels, frames that differ.
    assert ((frames <= 0) | (frames >= 1)).mean() < 0.05
    assert np.abs(frames[0, 1:] - frames[0, :-1]).mean() > 1e-3
    # No classifier-free guidance at max_guidance_scale <= 1: a different (single-batch) path.
    plain = run(svd_pipeline, seed=7, min_guidance_scale=1.0, max_guidance_scale=1.0)
    assert plain.shape == frames.shape and not np.array_equal(plain, frames)


def test_birdgen_loads_the_parts_diffusers_loads(svd: Path, svd_pipeline) -> None:  # type: ignore[no-untyped-def]
    """load_svd_part gives diffusers' own parts: the pipeline built from them draws the same clip
    (and a fixed generator the same clip twice)."""
    from diffusers import StableVideoDiffusionPipeline

    parts = {part: load_svd_part(svd, part) for part in SVD_PARTS}
    assert {part: type(obj).__name__ for part, obj in parts.items()} == {
        "image_encoder": "CLIPVisionModelWithProjection",
        # transformers picks its PIL backend without torchvision (this venv): the same arithmetic.
        "feature_extractor": type(svd_pipeline.feature_extractor).__name__,
        "unet": "UNetSpatioTemporalConditionModel",
        "vae": "AutoencoderKLTemporalDecoder",
        "scheduler": "EulerDiscreteScheduler",
    }
    ours = StableVideoDiffusionPipeline(**parts)
    ours.set_progress_bar_config(disable=True)
    assert np.array_equal(run(ours, seed=3), run(svd_pipeline, seed=3))


def test_svd_dims(svd: Path) -> None:
    dims = SvdDims.from_folder(svd)
    assert dims == SvdDims(
        latent_channels=4,
        vae_scale_factor=8,
        unet_levels=2,
        image_embed_dim=32,
        clip_size=224,
        default_frames=14,
        scaling_factor=0.18215,
    )
    assert dims.pixel_stride == 16
    assert SvdDims.from_dict(json.loads(json.dumps(dims.to_dict()))) == dims


def test_the_svd_folder_is_separate(tiny_model: Path, svd: Path) -> None:
    """The SDXL folder is unchanged by it: model_index.json does not list it, export sources are the
    part folders (unet, vae, ...), so the existing stage keys do not see it."""
    index = check_model_folder(tiny_model)
    assert SVD_FOLDER not in index
    assert set(check_svd_folder(svd)) >= set(SVD_PARTS)
    weights = [p for p in svd.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert {p.parent.name for p in weights} == {"image_encoder", "unet", "vae"}
    assert all(p.suffix == ".safetensors" for p in weights)
    assert all(family_of(name) is None for name in SVD_STAGES)


def test_the_tiny_svd_is_reproducible(svd: Path, tmp_path: Path) -> None:
    again = write_svd_folder(tmp_path / "svd", ModelPresets.load()["tiny"].svd, SEED + SVD_SEED_OFFSET)
    for rel in ("unet/diffusion_pytorch_model.safetensors", "image_encoder/model.safetensors"):
        assert (again / rel).read_bytes() == (svd / rel).read_bytes()


@pytest.mark.parametrize("part", sorted(SVD_PARTS))
def test_a_missing_part_is_named(svd: Path, tmp_path: Path, part: str) -> None:
    broken = shutil.copytree(svd, tmp_path / "svd")
    shutil.rmtree(broken / part)
    with pytest.raises(ModelFolderError, match=f"part '{part}' is missing"):
        check_svd_folder(broken)


def test_not_an_svd_folder(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match=r"model_index\.json is missing"):
        check_svd_folder(tmp_path)
    with pytest.raises(ModelFolderError, match="lists no 'image_encoder'"):
        check_svd_folder(tiny_model)  # the SDXL folder


def test_pickle_weights_are_refused(svd: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(svd, tmp_path / "svd")
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ModelFolderError, match=r"part 'unet' has only pickle weights.*safe_serialization"):
        load_svd_part(broken, "unet")


def test_parts_that_do_not_fit_are_named(svd: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(svd, tmp_path / "svd")
    config = json.loads((broken / "unet" / "config.json").read_text())
    (broken / "unet" / "config.json").write_text(json.dumps(config | {"cross_attention_dim": 64}))
    with pytest.raises(ModelFolderError, match=r"unet\.cross_attention_dim: 64, expected 32"):
        check_svd_folder(broken)
    index = json.loads((broken / "model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFolderError, match="part 'unet' is a UNet2DConditionModel"):
        check_svd_folder(broken)


def test_the_fp16_variant_file_names_load(svd: Path, tmp_path: Path) -> None:
    """A download with only `*.fp16.safetensors` (as the img2vid-xt repository offers) loads too."""
    folder = shutil.copytree(svd, tmp_path / "svd")
    for part in ("unet", "image_encoder"):
        for weights in (folder / part).glob("*.safetensors"):
            weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    unet = load_svd_part(folder, "unet")
    encoder = load_svd_part(folder, "image_encoder")
    reference = load_svd_part(svd, "unet")
    for a, b in zip(unet.state_dict().values(), reference.state_dict().values(), strict=True):
        assert a.equal(b)
    assert encoder.config.projection_dim == 32


def test_presets_that_do_not_fit_are_refused() -> None:
    tiny = ModelPresets.load()["tiny"].svd.model_dump()
    bad = {
        "cross_attention_dim": (["unet", "cross_attention_dim"], 48),
        "image_size": (["image_encoder", "image_size"], 32),
        "multiples of 32": (["vae", "block_out_channels"], [32, 48, 48, 48]),
        "2 x / 1 x": (["unet", "in_channels"], 4),
    }
    for message, ((part, key), value) in bad.items():
        config = {**tiny, part: {**tiny[part], key: value}}
        with pytest.raises(ValueError, match=message):
            SvdPreset(**config)


def test_the_full_preset_is_svd_xt_sized() -> None:
    """sdxl-full's svd entry is stable-video-diffusion-img2vid-xt's configs: its parameter counts,
    built on the meta device (no memory, ~0.1 s)."""
    import torch
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    svd = ModelPresets.load()["sdxl-full"].svd
    with torch.device("meta"):
        parts = (
            UNetSpatioTemporalConditionModel(**svd.unet),
            AutoencoderKLTemporalDecoder(**svd.vae),
            CLIPVisionModelWithProjection(CLIPVisionConfig(**svd.image_encoder)),
        )
    counts = [sum(p.numel() for p in part.parameters()) for part in parts]
    assert counts == [1_524_623_082, 97_742_847, 632_076_800]
