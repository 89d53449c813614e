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


# Slice 2: the stage modules, specs and export (docs/svd.md, "Stage split").


@pytest.fixture(scope="module")
def svd_modules(svd: Path):  # type: ignore[no-untyped-def]
    from birdgen.engines.modules import svd_stage_module

    return {name: svd_stage_module(svd, name) for name in SVD_STAGES}


# A batch of 2 against one item alone: float reordering only (docs/svd.md measured <= 1.4e-6).
BATCHED = 2e-6


def _max_diff(a, b) -> float:  # type: ignore[no-untyped-def]
    return float((a.double() - b.double()).abs().max())


@pytest.mark.parametrize(("latent", "frames", "chunk"), [((8, 8), 3, 2), ((8, 12), 2, 1)])
def test_each_stage_module_is_diffusers_own_computation(
    svd_pipeline, svd_modules, latent, frames, chunk
) -> None:  # type: ignore[no-untyped-def]
    """Each wrapper at batch 2 (a clip's CFG halves; two decode chunks) against the pipeline's own
    parts called as StableVideoDiffusionPipeline calls them."""
    import torch

    pipe, torch_rng = svd_pipeline, torch.Generator().manual_seed(sum(latent) + frames)
    (h, w), size = latent, (latent[0] * 8, latent[1] * 8)
    with torch.no_grad():
        pixels = torch.randn(2, 3, 224, 224, generator=torch_rng)
        (embeds,) = svd_modules["svd_image_encoder"](pixels)
        assert _max_diff(embeds, pipe.image_encoder(pixels).image_embeds) <= 1e-6

        image = torch.rand(2, 3, *size, generator=torch_rng) * 2 - 1
        (latents,) = svd_modules["svd_vae_encoder"](image)
        for i in range(2):  # each picture alone, as the pipeline encodes one
            assert (
                _max_diff(latents[i : i + 1], pipe.vae.encode(image[i : i + 1]).latent_dist.mode()) <= BATCHED
            )

        # CFG: the uncond half is an item with zero embeddings and zero image latents.
        sample = torch.randn(1, frames, 4, h, w, generator=torch_rng)
        z = torch.cat([torch.zeros_like(latents[1:]), latents[1:]])
        emb = torch.cat([torch.zeros_like(embeds[1:]), embeds[1:]])
        ids = torch.tensor([[6, 127, 0.02]]).repeat(2, 1)
        t = torch.tensor(0.7)
        (noise,) = svd_modules["svd_unet"](
            sample.repeat(2, 1, 1, 1, 1), z, t.reshape(1, 1).expand(2, 1), emb, ids
        )
        inp = torch.cat([sample.repeat(2, 1, 1, 1, 1), z[:, None].repeat(1, frames, 1, 1, 1)], dim=2)
        want = pipe.unet(inp, t, encoder_hidden_states=emb[:, None], added_time_ids=ids).sample
        assert noise.shape == want.shape and _max_diff(noise, want) <= 1e-6

        lat = torch.randn(2, chunk, 4, h, w, generator=torch_rng)
        (frames_out,) = svd_modules["svd_vae_decoder"](lat)
        assert frames_out.shape == (2, chunk, *size, 3) and frames_out.dtype == torch.uint8
        for i in range(2):  # each chunk alone, as decode_latents decodes it
            decoded = pipe.vae.decode(1 / pipe.vae.config.scaling_factor * lat[i], num_frames=chunk).sample
            want = pipe.video_processor.postprocess(decoded, output_type="pt")  # [0, 1], NCHW
            want_u8 = (want.permute(0, 2, 3, 1) * 255).round()
            diff = (frames_out[i].double() - want_u8.double()).abs()
            # Batched with another chunk vs alone: float differences ~1e-6 flip a rounding boundary rarely.
            assert diff.max() <= 1 and (diff > 0).float().mean() <= 1e-3
            (alone,) = svd_modules["svd_vae_decoder"](lat[i : i + 1])
            assert torch.equal(alone[0], want_u8.to(torch.uint8))  # alone: diffusers' exact computation


def hand_loop(svd: Path, modules, seed: int, chunk: int, **overrides) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The SVD denoising loop as the entry runs it: the caller's preprocessing, then the four stage
    modules (docs/svd.md, "What diffusers computes"); uint8 frames (F, H, W, 3)."""
    import torch
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
        _resize_with_antialiasing,
    )
    from PIL import Image

    clip = CLIP | overrides
    frames, height, width = clip["num_frames"], clip["height"], clip["width"]
    fps, motion, aug = 7, 127, 0.02
    g_min, g_max = clip.get("min_guidance_scale", 1.0), clip.get("max_guidance_scale", 3.0)
    cfg = g_max > 1
    generator = torch.Generator("cpu").manual_seed(seed)
    extractor = load_svd_part(svd, "feature_extractor")
    scheduler = load_svd_part(svd, "scheduler")
    pic = picture()

    def to_tensor(image) -> torch.Tensor:  # type: ignore[no-untyped-def]
        return torch.from_numpy(np.array(image).astype(np.float32) / 255).permute(2, 0, 1)[None].contiguous()

    # 1. The image encoder's input: antialiased resize of the original picture, CLIP normalisation.
    x = (_resize_with_antialiasing(to_tensor(pic) * 2 - 1, (224, 224)) + 1) / 2
    mean = torch.tensor(extractor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(extractor.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    with torch.no_grad():
        (emb,) = modules["svd_image_encoder"]((x - mean) / std)
        # 2. The picture at the clip size (Lanczos), generator draw 1: the noise augmentation.
        y = to_tensor(pic.resize((width, height), Image.LANCZOS)) * 2 - 1
        y = y + aug * torch.randn(y.shape, generator=generator)
        (z,) = modules["svd_vae_encoder"](y)
        # 3. The schedule, then draw 2: the latents.
        scheduler.set_timesteps(clip["num_inference_steps"])
        shape = (1, frames, 4, height // 8, width // 8)
        latents = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
        ids = torch.tensor([[fps - 1, motion, aug]], dtype=torch.float32)
        scale = torch.linspace(g_min, g_max, frames).view(1, frames, 1, 1, 1)
        halves = 2 if cfg else 1
        items_z = torch.cat([torch.zeros_like(z), z]) if cfg else z
        items_emb = torch.cat([torch.zeros_like(emb), emb]) if cfg else emb
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(latents, t).repeat(halves, 1, 1, 1, 1)
            timestep = t.reshape(1, 1).expand(halves, 1)
            (noise,) = modules["svd_unet"](inp, items_z, timestep, items_emb, ids.repeat(halves, 1))
            if cfg:
                uncond, cond = noise.chunk(2)
                noise = uncond + scale * (cond - uncond)
            latents = scheduler.step(noise, t, latents).prev_sample
        # 4. Decode `chunk` frames per call (one item each here; the entry may batch chunks).
        flat = latents[0]
        parts = [modules["svd_vae_decoder"](flat[None, i : i + chunk])[0][0] for i in range(0, frames, chunk)]
    return torch.cat(parts).numpy()


@pytest.mark.parametrize("guidance", [{}, {"min_guidance_scale": 1.0, "max_guidance_scale": 1.0}])
def test_a_loop_over_the_stage_modules_draws_the_pipeline_clip(
    svd: Path, svd_pipeline, svd_modules, guidance
) -> None:  # type: ignore[no-untyped-def]
    """CFG (1 -> 3 per frame) and max <= 1 (no uncond half), 3 frames decoded in chunks of 2: within
    the image path's tolerance (only the VAE encoder's contiguous input differs, docs/svd.md)."""
    from tests.test_parity import assert_close_to_reference

    ours = hand_loop(svd, svd_modules, seed=11, chunk=2, **guidance)
    reference = run(svd_pipeline, seed=11, decode_chunk_size=2, **guidance)[0]
    assert_close_to_reference(ours, (reference * 255).round().astype(np.uint8))


def test_svd_sample_inputs_run_through_the_stage_modules(svd: Path, svd_modules) -> None:  # type: ignore[no-untyped-def]
    import torch

    from birdgen.stages import image_sizes, svd_stage_specs

    dims = SvdDims.from_folder(svd)
    specs = svd_stage_specs(dims, 25)
    assert list(specs) == list(SVD_STAGES)
    sizes = image_sizes(dims, 8, 12, 3, 2)
    for name, spec in specs.items():
        sample = spec.sample_inputs(2, sizes, 0)
        if name == "svd_unet":  # plausible: EDM timesteps, fps - 1, motion bucket, augmentation
            assert (np.abs(sample["timestep"]) <= 1.7).all()
            ids = sample["added_time_ids"]
            assert ((ids >= [4, 1, 0]) & (ids <= [29, 255, 1])).all()
        with torch.no_grad():
            outs = svd_modules[name](*(torch.from_numpy(sample[t.name]) for t in spec.inputs))
        for tensor, out in zip(spec.outputs, outs, strict=True):
            assert tuple(out.shape) == (2, *tensor.concrete(sizes)), name
            assert str(out.dtype) == {"FP32": "torch.float32", "UINT8": "torch.uint8"}[tensor.dtype]
            assert torch.isfinite(out.float()).all()


def test_svd_specs_and_their_tensorrt_profiles(svd: Path) -> None:
    from birdgen.engines.tensorrt_profiles import profiles
    from birdgen.model_folder import ModelDims
    from birdgen.stages import captured_sizes, repository_specs, stage_specs, svd_info, svd_stage_specs

    dims = SvdDims.from_folder(svd)
    specs = svd_stage_specs(dims, 25)
    unet, decoder = specs["svd_unet"], specs["svd_vae_decoder"]
    assert unet.dynamic_axes["frames"] == (2, 14, 25) and decoder.dynamic_axes["chunk"] == (1, 8, 25)
    assert [s.max_batch_size for s in specs.values()] == [8, 4, 4, 4]
    for spec in specs.values():
        found = profiles(spec)  # raises for an input axis without a range
        low, high = {}, {}
        for tensor in spec.inputs:  # the dynamic profile spans every axis's whole range
            shapes = found[0].shapes[tensor.name]
            assert shapes[0][0] == 1 and shapes[2][0] == spec.max_batch_size
            for i, d in enumerate(tensor.dims, start=1):
                if isinstance(d, str):
                    low[d], high[d] = shapes[0][i], shapes[2][i]
        assert {d: (low[d], high[d]) for d in low} == {
            d: (spec.dynamic_axes[d][0], spec.dynamic_axes[d][2]) for d in low
        }
        if low:  # a static profile per hot size (512, 1024 px) at the default clip length and chunk
            assert len(found) == 3
            assert all(s.get("frames", 14) == 14 and s.get("chunk", 8) == 8 for s in captured_sizes(spec))
        else:
            assert spec.name == "svd_image_encoder" and len(found) == 1
    # manifest.json / pipeline.json record them; repository_specs reads them back.
    base = ModelDims(77, 32, 32, 32, 4, 8, 2, 1000)
    with_svd = repository_specs({"dims": base.to_dict(), "svd": svd_info(dims, 25)})
    assert with_svd.keys() == stage_specs(base).keys() | set(SVD_STAGES)
    assert with_svd["svd_unet"] == unet
    assert not set(SVD_STAGES) & repository_specs({"dims": base.to_dict(), "svd": None}).keys()


def test_core_models_leave_the_svd_stages_out(tmp_path: Path) -> None:
    """SVD stages load on first use, as the ControlNet stages."""
    from birdgen.manifest import core_models

    stages = {name: {} for name in ("text_encoder", "unet", *SVD_STAGES)}
    (tmp_path / "manifest.json").write_text(json.dumps({"entries": ["bird_image"], "stages": stages}))
    assert core_models(tmp_path) == ["bird_image", "text_encoder", "unet"]


def test_the_export_builds_the_svd_stages(repository: Path, svd: Path) -> None:
    """The session export (the tiny folder's `svd`): four stages checked against torch, the dims and
    longest clip in the manifest and every entry's pipeline.json."""
    from birdgen.stages import SVD_MAX_FRAMES, repository_specs, svd_info

    manifest = json.loads((repository / "manifest.json").read_text())
    assert manifest["svd"] == svd_info(SvdDims.from_folder(svd), SVD_MAX_FRAMES)
    for name in SVD_STAGES:
        assert manifest["stages"][name]["max_abs_error"] <= 1e-4 or name == "svd_vae_decoder"
        assert (repository / name / "config.pbtxt").is_file()
    assert manifest["stages"]["svd_vae_decoder"]["max_abs_error"] <= 1  # uint8: a rounding boundary
    assert set(SVD_STAGES) <= repository_specs(manifest).keys()
    for entry in manifest["entries"]:
        version = max(int(p.name) for p in (repository / entry).iterdir() if p.name.isdigit())
        info = json.loads((repository / entry / str(version) / "pipeline.json").read_text())
        assert info["svd"] == manifest["svd"]
