"""Random-weight SDXL-Turbo folders: the real architectures, at the widths a preset names.

No model hub is reachable here, so tests, the demo and the benchmarks build this folder instead of
downloading stabilityai/sdxl-turbo. It has every part the real one has (two CLIP tokenizers with a BPE
vocab generated locally, CLIPTextModel, CLIPTextModelWithProjection, a `text_time` UNet, an 8x VAE,
the Euler-ancestral scheduler config sdxl-turbo ships, an AnimateDiff motion adapter, and an openpose
and a depth ControlNet), so the real weights go through the same code. Beside them, in `svd/`, a
Stable Video Diffusion folder in diffusers' StableVideoDiffusionPipeline layout (docs/svd.md). Presets
(data/model_presets.yaml): `tiny` for the tests, `mini` for CPU benchmarks, `sdxl-full` with
sdxl-turbo's own configs, whose timings are the real model's.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, RootModel, model_validator

from birdgen.contracts import CONTROLNET_KINDS, MOTION_ADAPTER, SVD_FOLDER, controlnet_folder
from birdgen.model_folder import SVD_CLIP_SIZE
from birdgen.prompts import DATA_DIR, PromptLibrary, load_data_file
from birdgen.qa_config import SPECIES_VERIFIER_FOLDER

SEED = 20261125
MAX_TOKENS = 77
PRESETS_FILE = DATA_DIR / "model_presets.yaml"
# The UNet config keys a ControlNet copies (diffusers' ControlNetModel.from_unet passes these);
# the preset's `controlnet` mapping adds the conditioning embedding and may override the depths.
CONTROLNET_UNET_KEYS = (
    "encoder_hid_dim",
    "encoder_hid_dim_type",
    "addition_embed_type",
    "addition_time_embed_dim",
    "transformer_layers_per_block",
    "in_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "only_cross_attention",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "act_fn",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "class_embed_type",
    "num_class_embeds",
    "upcast_attention",
    "resnet_time_scale_shift",
    "projection_class_embeddings_input_dim",
    "mid_block_type",
)
# diffusers zero-initialises these (zero_module), so a fresh ControlNet's residuals are exactly 0 and a
# parity test on it would pass with the ControlNet ignored; the tiny nets re-draw them.
CONTROLNET_ZERO_PARTS = (
    "controlnet_down_blocks.",
    "controlnet_mid_block.",
    "controlnet_cond_embedding.conv_out.",
)
CONTROLNET_REDRAW_STD = 0.02

# The scheduler config of stabilityai/sdxl-turbo (scheduler/scheduler_config.json).
TURBO_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

# The scheduler config of stabilityai/stable-video-diffusion-img2vid(-xt) (scheduler_config.json): the
# EDM schedule (Karras sigmas from 700 to 0.002, continuous timesteps 0.25 ln sigma, v-prediction).
SVD_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "sigma_max": 700.0,
    "sigma_min": 0.002,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "timestep_type": "continuous",
    "trained_betas": None,
    "use_karras_sigmas": True,
}
# Its feature_extractor/preprocessor_config.json. The pipeline only normalises with the mean and std
# (its own antialiased resize to 224 x 224 comes first), but the folder carries the real file.
SVD_FEATURE_EXTRACTOR = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 224},
}
# SVD parts are drawn under seed + this (the ControlNets use + 1, + 2), after every SDXL part.
SVD_SEED_OFFSET = 3
VERIFIER_SEED_OFFSET = 4
# The species verifier's tiny CLIP: these transformers CLIPTextConfig / CLIPVisionConfig fields for
# both towers, then the text's 77 positions and the vision's 32 px picture in 8 px patches.
VERIFIER_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
VERIFIER_TEXT = VERIFIER_TOWER | dict(max_position_embeddings=MAX_TOKENS)
VERIFIER_VISION = VERIFIER_TOWER | dict(image_size=32, patch_size=8)

# CLIP's pre-tokenizer pattern (openai/CLIP simple_tokenizer.py), lower-cased input.
_CLIP_WORDS = re.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-printable-character table (the base alphabet of a byte-level BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def build_clip_bpe(corpus: str, vocab_size: int) -> tuple[dict[str, int], list[str]]:
    """Learn a CLIP-format BPE (vocab.json, merges.txt) from `corpus`, deterministically.

    Layout as in openai/CLIP: 256 byte characters, the same with `</w>`, one entry per merge,
    then the two special tokens.
    """
    byte_chars = list(_bytes_to_unicode().values())
    words = Counter(_CLIP_WORDS.findall(corpus.lower()))
    table = _bytes_to_unicode()
    segmented = {
        word: [table[b] for b in word.encode("utf-8")[:-1]] + [table[word.encode("utf-8")[-1]] + "</w>"]
        for word in words
    }
    merges: list[str] = []
    budget = vocab_size - 2 * len(byte_chars) - 2
    while len(merges) < budget:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, parts in segmented.items():
            for a, b in itertools.pairwise(parts):
                pairs[(a, b)] += words[word]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(f"{best[0]} {best[1]}")
        for word, parts in segmented.items():
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            segmented[word] = merged
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    # Filler entries keep the vocab exactly `vocab_size` long when the corpus runs out of merges.
    tokens += [f"<|unused{i}|>" for i in range(vocab_size - len(tokens))]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def _write_tokenizer(path: Path, vocab: dict[str, int], merges: list[str], pad_token: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (path / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": pad_token,
                "unk_token": "<|endoftext|>",
            }
        )
    )
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": MAX_TOKENS,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": pad_token,
                "unk_token": "<|endoftext|>",
                "do_lower_case": True,
            }
        )
    )


class SvdPreset(BaseModel):
    """A preset's Stable Video Diffusion folder: each part's constructor arguments, as they are."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_encoder: dict[str, Any]  # transformers.CLIPVisionConfig
    unet: dict[str, Any]  # diffusers.UNetSpatioTemporalConditionModel
    vae: dict[str, Any]  # diffusers.AutoencoderKLTemporalDecoder

    @model_validator(mode="after")
    def _parts_fit_together(self) -> SvdPreset:
        """What StableVideoDiffusionPipeline would only fail on at its first call."""
        unet, vae, encoder = self.unet, self.vae, self.image_encoder
        wrong = []
        if unet["cross_attention_dim"] != encoder["projection_dim"]:
            wrong.append(
                f"unet.cross_attention_dim {unet['cross_attention_dim']} must be "
                f"image_encoder.projection_dim ({encoder['projection_dim']})"
            )
        added = 3 * unet["addition_time_embed_dim"]
        if unet["projection_class_embeddings_input_dim"] != added:
            wrong.append(
                f"unet.projection_class_embeddings_input_dim {unet['projection_class_embeddings_input_dim']} "
                f"must be 3 x addition_time_embed_dim ({added}: fps, motion bucket, noise strength)"
            )
        if (
            unet["in_channels"] != 2 * vae["latent_channels"]
            or unet["out_channels"] != vae["latent_channels"]
        ):
            wrong.append(
                f"unet in/out_channels {unet['in_channels']}/{unet['out_channels']} must be "
                f"2 x / 1 x vae.latent_channels ({vae['latent_channels']}): noise and image latents in"
            )
        if encoder.get("image_size") != SVD_CLIP_SIZE:
            wrong.append(
                f"image_encoder.image_size {encoder.get('image_size')} must be {SVD_CLIP_SIZE} (the pipeline "
                "resizes every conditioning image to it)"
            )
        for part, channels in (("unet", unet["block_out_channels"]), ("vae", vae["block_out_channels"])):
            if any(c % 32 for c in channels):
                wrong.append(
                    f"{part}.block_out_channels {channels} must be multiples of 32 (32 GroupNorm groups)"
                )
        if wrong:
            raise ValueError("svd: " + "; ".join(wrong))
        return self


class ModelPreset(BaseModel):
    """One preset: each part's constructor arguments, passed as they are to its class."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = Field(min_length=1)
    vocab_size: int = Field(ge=512)  # at least the 2 x 256 byte tokens of a CLIP BPE
    text_encoder: dict[str, Any]
    text_encoder_2: dict[str, Any]
    unet: dict[str, Any]
    vae: dict[str, Any]
    motion_adapter: dict[str, Any]
    controlnet: dict[str, Any]
    svd: SvdPreset

    @model_validator(mode="after")
    def _parts_fit_together(self) -> ModelPreset:
        """The checks diffusers would only fail at the first forward pass, with a shape error."""
        hidden = self.text_encoder["hidden_size"] + self.text_encoder_2["hidden_size"]
        if self.unet["cross_attention_dim"] != hidden:
            raise ValueError(
                f"unet.cross_attention_dim {self.unet['cross_attention_dim']} must be the text encoders' "
                f"hidden sizes added ({hidden})"
            )
        added = 6 * self.unet["addition_time_embed_dim"] + self.text_encoder_2["projection_dim"]
        if self.unet["projection_class_embeddings_input_dim"] != added:
            raise ValueError(
                f"unet.projection_class_embeddings_input_dim "
                f"{self.unet['projection_class_embeddings_input_dim']} must be 6 x addition_time_embed_dim "
                f"+ text_encoder_2.projection_dim ({added})"
            )
        if self.motion_adapter["block_out_channels"] != self.unet["block_out_channels"]:
            raise ValueError("motion_adapter.block_out_channels must equal unet.block_out_channels")
        embedding = self.controlnet["conditioning_embedding_out_channels"]
        if len(embedding) != len(self.vae["block_out_channels"]):
            raise ValueError(
                f"controlnet.conditioning_embedding_out_channels {embedding} must have as many entries as "
                f"vae.block_out_channels ({len(self.vae['block_out_channels'])}): the embedding downsamples "
                "the control image by the VAE's factor onto the latent grid"
            )
        return self


class ModelPresets(RootModel[dict[str, ModelPreset]]):
    """The validated model_presets.yaml: preset name -> ModelPreset."""

    @classmethod
    def load(cls, path: Path = PRESETS_FILE) -> dict[str, ModelPreset]:
        return load_data_file(path, cls).root


def write_tiny_model(out: Path, seed: int = SEED, preset: str = "tiny") -> Path:
    """Write the `preset` SDXL-Turbo folder (random weights) to `out` and return it."""
    presets = ModelPresets.load()
    if preset not in presets:
        raise ValueError(f"invalid 'preset': got {preset!r}; allowed: {', '.join(presets)}")
    config = presets[preset]

    import torch
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, MotionAdapter, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_clip_bpe(PromptLibrary.load().corpus(), config.vocab_size)
    # As in sdxl-turbo: tokenizer pads with <|endoftext|>, tokenizer_2 with "!".
    _write_tokenizer(out / "tokenizer", vocab, merges, pad_token="<|endoftext|>")
    _write_tokenizer(out / "tokenizer_2", vocab, merges, pad_token="!")

    eos = vocab["<|endoftext|>"]
    bos = vocab["<|startoftext|>"]
    common = dict(
        vocab_size=config.vocab_size,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        layer_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**config.text_encoder, **common))
    text_encoder.eval().save_pretrained(out / "text_encoder")
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config.text_encoder_2, **common))
    text_encoder_2.eval().save_pretrained(out / "text_encoder_2")
    unet = UNet2DConditionModel(**config.unet)
    unet.save_pretrained(out / "unet")
    AutoencoderKL(**config.vae).save_pretrained(out / "vae")
    # AnimateDiff's SDXL motion module is a separate download (not part of sdxl-turbo); this one sits
    # beside the parts, where `birdgen export` looks for it by default.
    MotionAdapter(**config.motion_adapter).save_pretrained(out / MOTION_ADAPTER)

    # Separate downloads too (e.g. diffusers/controlnet-depth-sdxl-1.0), not in model_index.json. Each
    # under its own seed, built last so the parts above keep their bytes.
    for offset, kind in enumerate(CONTROLNET_KINDS, start=1):
        build_controlnet(unet.config, config.controlnet, seed + offset).save_pretrained(
            out / controlnet_folder(kind)
        )

    EulerAncestralDiscreteScheduler.from_config(TURBO_SCHEDULER).save_pretrained(out / "scheduler")
    # A separate model too (not in model_index.json), under its own seed and last, so the SDXL parts
    # keep their bytes; `birdgen export` looks for it here by default (docs/svd.md).
    write_svd_folder(out / SVD_FOLDER, config.svd, seed + SVD_SEED_OFFSET, preset)
    write_species_verifier(out / SPECIES_VERIFIER_FOLDER, vocab, merges, seed + VERIFIER_SEED_OFFSET)
    _write_model_index(
        out,
        "StableDiffusionXLPipeline",
        preset,
        {
            "force_zeros_for_empty_prompt": True,
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )
    return out


def build_controlnet(unet_config: Any, overrides: dict[str, Any], seed: int) -> Any:
    """A random-weight ControlNetModel fitting a UNet of `unet_config`, residuals not zero.

    Nothing is copied from the UNet: its own weights under `seed`, then the zero-initialised output
    layers (CONTROLNET_ZERO_PARTS) re-drawn from N(0, CONTROLNET_REDRAW_STD^2) with the same seed.
    """
    import torch
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel(**{key: unet_config[key] for key in CONTROLNET_UNET_KEYS} | overrides)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if name.startswith(CONTROLNET_ZERO_PARTS):
                param.copy_(torch.randn(param.shape, generator=generator) * CONTROLNET_REDRAW_STD)
    return controlnet.eval()


def write_svd_folder(out: Path, config: SvdPreset, seed: int, preset: str = "tiny") -> Path:
    """Write a random-weight Stable Video Diffusion folder (StableVideoDiffusionPipeline's layout:
    image_encoder, feature_extractor, unet, vae, scheduler, model_index.json) to `out`; return it.

    The parts are drawn in that order after torch.manual_seed(seed): the same seed, the same bytes.
    """
    import torch
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**config.image_encoder))
    encoder.eval().save_pretrained(out / "image_encoder")
    CLIPImageProcessor(**SVD_FEATURE_EXTRACTOR).save_pretrained(out / "feature_extractor")
    UNetSpatioTemporalConditionModel(**config.unet).save_pretrained(out / "unet")
    AutoencoderKLTemporalDecoder(**config.vae).save_pretrained(out / "vae")
    EulerDiscreteScheduler.from_config(SVD_SCHEDULER).save_pretrained(out / "scheduler")
    _write_model_index(
        out,
        "StableVideoDiffusionPipeline",
        preset,
        {
            "feature_extractor": ["transformers", "CLIPImageProcessor"],
            "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "unet": ["diffusers", "UNetSpatioTemporalConditionModel"],
            "vae": ["diffusers", "AutoencoderKLTemporalDecoder"],
        },
    )
    return out


def write_species_verifier(out: Path, vocab: dict[str, int], merges: list[str], seed: int) -> Path:
    """Write a tiny random-weight CLIPModel folder (model, tokenizer, image processor) for the
    species verifier's code path (birdgen.qa.verifier); every preset gets the same tiny one, since a
    real verifier is a separate download (docs/qa.md)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    out = Path(out)
    eos, bos = vocab["<|endoftext|>"], vocab["<|startoftext|>"]
    text = dict(VERIFIER_TEXT, vocab_size=len(vocab), bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=VERIFIER_VISION, projection_dim=16))
    model.eval().save_pretrained(out)
    side = VERIFIER_VISION["image_size"]
    CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    ).save_pretrained(out)
    _write_tokenizer(out, vocab, merges, pad_token="<|endoftext|>")
    return out


def _write_model_index(out: Path, pipeline: str, preset: str, entries: dict[str, Any]) -> None:
    """The folder's model_index.json: the pipeline class, the diffusers version the folders are
    written for, the birdgen preset, then `entries` (the parts) in their order. One writer, so an
    SDXL folder keeps its bytes (the tests compare them)."""
    index = {
        "_class_name": pipeline,
        "_diffusers_version": "0.42.1",
        "_birdgen_preset": preset,
        **entries,
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
