"""The one tokenizing path of serving and training: the ids diffusers' encode_prompt feeds both encoders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from birdgen.prompt_tokenizer import PromptTokenizer

LONG = ", ".join(["an American Robin perched on a mossy branch in spring"] * 12)  # well past 77 tokens


def encode_prompt_ids(pipe, prompt: str, negative: str) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    """The input ids StableDiffusionXLPipeline.encode_prompt gives text_encoder, text_encoder_2 (prompt,
    then negative prompt), caught on their way into the encoders."""
    seen: list[torch.Tensor] = []
    hooks = [
        encoder.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
        for encoder in (pipe.text_encoder, pipe.text_encoder_2)
    ]
    try:
        pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=True, negative_prompt=negative)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def test_ids_equal_diffusers_encode_prompt_for_a_long_prompt_and_an_empty_negative(
    tiny_model: Path, reference_pipeline
) -> None:
    tokenizer = PromptTokenizer.from_folder(tiny_model)
    want = encode_prompt_ids(reference_pipeline, LONG, "")
    got = [*tokenizer(LONG), *tokenizer("")]
    assert len(want) == len(got) == 4
    for ids, expected in zip(got, want, strict=True):
        assert ids.dtype == torch.int64 and ids.shape == (1, 77)
        assert torch.equal(ids, expected)
    long_1, long_2, empty_1, empty_2 = got
    for ids in (long_1, long_2):  # cut, but still ending the sequence
        assert ids[0, -1] == reference_pipeline.tokenizer.eos_token_id
    # The second tokenizer pads with "!", the first with <|endoftext|>: each encoder gets its own ids.
    assert not torch.equal(empty_1, empty_2)
    assert tokenizer.truncated(LONG) and not tokenizer.truncated("")


def test_a_batch_is_its_texts_one_by_one(tiny_model: Path) -> None:
    """Training tokenizes a batch of captions; serving one prompt: the same ids either way."""
    tokenizer = PromptTokenizer.from_folder(tiny_model)
    captions = ["a robin", LONG, ""]
    batch = tokenizer(captions)
    for i, caption in enumerate(captions):
        for ids, one in zip(batch, tokenizer(caption), strict=True):
            assert torch.equal(ids[i : i + 1], one)


def test_importing_it_loads_neither_torch_nor_transformers() -> None:
    """It lives in the core, which the torch-free client imports."""
    code = "import sys, birdgen.prompt_tokenizer; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout == "[]\n"
