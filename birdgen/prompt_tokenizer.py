"""SDXL's two CLIP tokenizers as one: the token ids both text encoders get, in serving and in training.

Why one module: served images must equal StableDiffusionXLPipeline's, and a LoRA is trained on the
embeddings the served pipeline will feed it, so the entry pipeline (`birdgen.ensemble.pipeline`) and
LoRA training (`birdgen.training.lora`) must tokenize exactly as diffusers' `encode_prompt` does, and
the same way as each other. In the core so both may import it; transformers and torch are imported
only when used, as the torch-free client imports the core too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from birdgen.contracts import TOKENIZER_DIRS

if TYPE_CHECKING:
    import torch
    from transformers import CLIPTokenizer


class PromptTokenizer:
    """`tokenizer` and `tokenizer_2` (for `text_encoder` and `text_encoder_2`), called as `encode_prompt`
    calls them: padded and truncated to each one's `model_max_length` (77 in SDXL)."""

    def __init__(self, tokenizers: Sequence[CLIPTokenizer]) -> None:
        self.tokenizers = tuple(tokenizers)

    @classmethod
    def from_folder(cls, folder: Path) -> PromptTokenizer:
        """From a diffusers SDXL folder, or an entry model's version folder (export copies both there)."""
        from transformers import CLIPTokenizer

        return cls([CLIPTokenizer.from_pretrained(Path(folder) / name) for name in TOKENIZER_DIRS])

    def __call__(self, texts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The ids for the first and the second text encoder: (len(texts) or 1, 77) int64 on the CPU.

        int64 is the text-encoder stages' input type (`birdgen.stages`); a long text keeps its start.
        """
        import torch

        ids, ids_2 = (
            tokenizer(
                texts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(torch.int64)
            for tokenizer in self.tokenizers
        )
        return ids, ids_2

    def truncated(self, text: str) -> bool:
        """Whether either tokenizer cut `text` short: diffusers only logs it, birdgen's metadata says it."""
        over = [len(tokenizer(text).input_ids) > tokenizer.model_max_length for tokenizer in self.tokenizers]
        return any(over)
