"""The entry pipeline's prompt-embedding cache: a repeated prompt makes no text-encoder call and gives
the same image as a cold pipeline; the cache is bounded in bytes and owns its tensors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from birdgen.ensemble.pipeline import ImagePipeline, PromptEmbeddingCache
from birdgen.ensemble.runners import LocalRunner
from birdgen.schema import ImageRequest
from tests.conftest import ROBIN


class CountingRunner(LocalRunner):
    """The in-process engines, counting the calls each stage gets."""

    def __init__(self, repository: Path) -> None:
        super().__init__(repository)
        self.calls: dict[str, int] = {}
        self.outputs: list[dict[str, torch.Tensor]] = []

    def run_many(
        self, calls: Sequence[tuple[str, Mapping[str, torch.Tensor]]]
    ) -> list[dict[str, torch.Tensor]]:
        for stage, _ in calls:
            self.calls[stage] = self.calls.get(stage, 0) + 1
        self.outputs += super().run_many(calls)
        return self.outputs[-len(calls) :]


def embeddings(size: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    return torch.zeros(size // 4, dtype=torch.float32), torch.zeros(0, dtype=torch.float32), False


def test_least_recently_used_prompts_leave_first_within_the_byte_bound() -> None:
    cache = PromptEmbeddingCache(max_bytes=3000)
    for text in ("a", "b", "c"):
        cache.put(text, embeddings(1000))
    assert cache.get("a") is not None  # now the most recently used
    cache.put("d", embeddings(1000))
    assert list(cache.entries) == ["c", "a", "d"] and cache.bytes == 3000
    cache.put("e", embeddings(2500))  # bigger than what is left: both oldest go
    assert list(cache.entries) == ["e"] and cache.bytes == 2500
    cache.put("e", embeddings(1000))  # replacing counts the old value out
    assert cache.bytes == 1000


def test_repeated_prompt_skips_the_encoders_and_draws_the_same_image(repository: Path) -> None:
    runner = CountingRunner(repository)
    warm = ImagePipeline(repository / "bird_image" / "1", runner)
    warm(ImageRequest(**{**ROBIN, "seed": 1}))
    second = warm(ImageRequest(**{**ROBIN, "seed": 2}))
    assert runner.calls["text_encoder"] == runner.calls["text_encoder_2"] == 1
    # The cache keeps its own copies, never a view of a stage response's memory (BLS shared memory).
    embeds, pooled, _ = warm.prompt_embeddings.get(second.metadata["prompt"])  # type: ignore[misc]
    stage_memory = {t.untyped_storage().data_ptr() for out in runner.outputs for t in out.values()}
    assert not {embeds.untyped_storage().data_ptr(), pooled.untyped_storage().data_ptr()} & stage_memory
    cold = ImagePipeline(repository / "bird_image" / "1", LocalRunner(repository))
    assert cold(ImageRequest(**{**ROBIN, "seed": 2})).data == second.data
    other = warm(ImageRequest(**{**ROBIN, "seed": 2, "pose": "flying"}))  # another prompt: encoded
    assert runner.calls["text_encoder"] == 2 and other.metadata["prompt"] != second.metadata["prompt"]
