"""The entry pipeline's prompt-embedding cache: a repeated prompt makes no text-encoder call and gives
the same image as a cold pipeline; the cache is bounded in bytes and read-only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from birdgen.ensemble.pipeline import ImagePipeline, PromptEmbeddingCache
from birdgen.ensemble.runners import LocalRunner
from birdgen.schema import ImageRequest
from tests.conftest import ROBIN


class CountingRunner(LocalRunner):
    """The in-process engines, counting the calls each stage gets."""

    def __init__(self, repository: Path) -> None:
        super().__init__(repository)
        self.calls: dict[str, int] = {}

    def run_many(self, calls: Sequence[tuple[str, Mapping[str, np.ndarray]]]) -> list[dict[str, np.ndarray]]:
        for stage, _ in calls:
            self.calls[stage] = self.calls.get(stage, 0) + 1
        return super().run_many(calls)


def embeddings(size: int) -> tuple[np.ndarray, np.ndarray, bool]:
    return np.zeros(size // 4, dtype=np.float32), np.zeros(0, dtype=np.float32), False


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


def test_cached_arrays_are_read_only() -> None:
    cache = PromptEmbeddingCache()
    cache.put("a", embeddings(16))
    embeds, pooled, _ = cache.get("a")  # type: ignore[misc]
    with pytest.raises(ValueError, match="read-only"):
        embeds[0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        pooled += 1.0


def test_repeated_prompt_skips_the_encoders_and_draws_the_same_image(repository: Path) -> None:
    runner = CountingRunner(repository)
    warm = ImagePipeline(repository / "bird_image" / "1", runner)
    warm(ImageRequest(**{**ROBIN, "seed": 1}))
    second = warm(ImageRequest(**{**ROBIN, "seed": 2}))
    assert runner.calls["text_encoder"] == runner.calls["text_encoder_2"] == 1
    cold = ImagePipeline(repository / "bird_image" / "1", LocalRunner(repository))
    assert cold(ImageRequest(**{**ROBIN, "seed": 2})).data == second.data
    other = warm(ImageRequest(**{**ROBIN, "seed": 2, "pose": "flying"}))  # another prompt: encoded
    assert runner.calls["text_encoder"] == 2 and other.metadata["prompt"] != second.metadata["prompt"]
