"""Random-weight SDXL-Turbo folders: the real architectures, at the widths a preset names.

No model hub is reachable here, so tests, the demo and the benchmarks build this folder instead of
downloading stabilityai/sdxl-turbo. It has every part the real one has (two CLIP tokenizers with a BPE
vocab generated locally, CLIPTextModel, CLIPTextModelWithProjection, a `text_time` UNet, an 8x VAE,
the Euler-ancestral scheduler config sdxl-turbo ships, and an AnimateDiff motion adapter), so the real
weights go through the same code. Presets (data/model_presets.yaml): `tiny` for the tests, `mini`
for CPU benchmarks, `sdxl-full` with sdxl-turbo's own configs, whose timings are the real model's.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, RootModel, model_validator

from birdgen.contracts import MOTION_ADAPTER
from birdgen.prompts import DATA_DIR, PromptLibrary, load_data_file

SEED = 20261125
MAX_TOKENS = 77
PRESETS_FILE = DATA_DIR / "model_presets.yaml"

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
    UNet2DConditionModel(**config.unet).save_pretrained(out / "unet")
    AutoencoderKL(**config.vae).save_pretrained(out / "vae")
    # AnimateDiff's SDXL motion module is a separate download (not part of sdxl-turbo); this one sits
    # beside the parts, where `birdgen export` looks for it by default.
    MotionAdapter(**config.motion_adapter).save_pretrained(out / MOTION_ADAPTER)

    EulerAncestralDiscreteScheduler.from_config(TURBO_SCHEDULER).save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionXLPipeline",
                "_diffusers_version": "0.42.1",
                "_birdgen_preset": preset,
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
            indent=2,
        )
    )
    return out
