"""Tiny random-weight SDXL-Turbo: the real architectures at small widths, in the diffusers folder layout.

No model hub is reachable here, so tests and the demo build this folder instead of downloading
stabilityai/sdxl-turbo. It has every part the real one has (two CLIP tokenizers with a BPE vocab
generated locally, CLIPTextModel, CLIPTextModelWithProjection, a `text_time` UNet, an 8x VAE and the
Euler-ancestral scheduler config sdxl-turbo ships), so the real weights go through the same code.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from pathlib import Path

from birdgen.prompts import PromptLibrary

SEED = 20261125
MOTION_ADAPTER = "motion_adapter"
VOCAB_SIZE = 1000
MAX_TOKENS = 77

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


def build_clip_bpe(corpus: str, vocab_size: int = VOCAB_SIZE) -> tuple[dict[str, int], list[str]]:
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


def write_tiny_model(out: Path, seed: int = SEED) -> Path:
    """Write the tiny SDXL-Turbo folder to `out` and return it."""
    import torch
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, MotionAdapter, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_clip_bpe(PromptLibrary.load().corpus())
    # As in sdxl-turbo: tokenizer pads with <|endoftext|>, tokenizer_2 with "!".
    _write_tokenizer(out / "tokenizer", vocab, merges, pad_token="<|endoftext|>")
    _write_tokenizer(out / "tokenizer_2", vocab, merges, pad_token="!")

    eos = vocab["<|endoftext|>"]
    bos = vocab["<|startoftext|>"]
    common = dict(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    # Different widths for the two encoders, so swapping them cannot go unnoticed.
    text_config = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=3,
        projection_dim=32,
        **common,
    )
    text_config_2 = CLIPTextConfig(
        hidden_size=48,
        intermediate_size=96,
        num_attention_heads=4,
        num_hidden_layers=3,
        projection_dim=40,
        hidden_act="gelu",
        **{k: v for k, v in common.items() if k != "hidden_act"},
    )
    torch.manual_seed(seed)
    CLIPTextModel(text_config).eval().save_pretrained(out / "text_encoder")
    CLIPTextModelWithProjection(text_config_2).eval().save_pretrained(out / "text_encoder_2")

    addition_time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=32 + 48,
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + 40,
    )
    unet.save_pretrained(out / "unet")

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=512,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    vae.save_pretrained(out / "vae")

    # AnimateDiff's SDXL motion module is a separate download (not part of sdxl-turbo); the tiny one
    # sits beside the parts, where `birdgen export` looks for it by default. Its widths follow the UNet's.
    MotionAdapter(
        block_out_channels=(32, 64, 64),
        motion_layers_per_block=1,
        motion_num_attention_heads=2,
        motion_norm_num_groups=8,
        motion_max_seq_length=32,
        use_motion_mid_block=False,
    ).save_pretrained(out / MOTION_ADAPTER)

    EulerAncestralDiscreteScheduler.from_config(TURBO_SCHEDULER).save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionXLPipeline",
                "_diffusers_version": "0.42.1",
                "_birdgen_tiny": True,
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
