"""Species verification: how well a picture shows the species it was asked for.

Two judges, each from a local model folder (no hub):
- **zero-shot** (`ZeroShotVerifier`): a transformers CLIPModel folder. The picture's embedding is
  compared with one text per catalogue species (data/qa.yaml's prompt), and the requested species'
  softmax probability among them is the score, as in CLIP's zero-shot classification. It passes when
  the species ranks within `top_k` and its probability reaches the threshold: a rank holds its
  meaning however many species the catalogue has, where a probability spreads thinner. A species the
  catalogue lacks is added as one more candidate, so it is still scored against the catalogue.
- **classifier** (`ClassifierVerifier`, optional): an image-classification folder (e.g. a bird
  classifier fine-tuned on CUB/NABirds) whose labels are catalogue species ids or names; the score is
  the requested species' probability. A species outside its labels is "not covered", not a failure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from birdgen.catalogue import Catalogue, Species
from birdgen.schema import ImageRequest


@dataclass(frozen=True)
class Verification:
    """One judge's verdict on one picture; `score` is None when the judge cannot tell (not covered)."""

    judge: str  # "zero_shot" or "classifier"
    score: float | None  # the requested species' probability
    predicted: str  # the most probable species (id, or the label when it is not in the catalogue)
    threshold: float  # the least probability that passes
    rank: int | None = None  # the requested species' place among the candidates (1: most probable)
    top_k: int | None = None  # the worst rank that passes (None: any)

    @property
    def passed(self) -> bool:
        if self.score is None:
            return True
        ranked = self.rank is None or self.top_k is None or self.rank <= self.top_k
        return ranked and self.score >= self.threshold

    @property
    def failure(self) -> str:
        """Why it did not pass, in a few words (the redraw reason)."""
        place = (
            f", rank {self.rank} > {self.top_k}"
            if self.rank and self.top_k and self.rank > self.top_k
            else ""
        )
        return (
            f"{self.judge} {self.score:.3f} (threshold {self.threshold:g}{place}; predicted {self.predicted})"
        )

    def record(self) -> dict[str, Any]:
        score = None if self.score is None else round(self.score, 6)
        return {
            "score": score,
            "predicted": self.predicted,
            "rank": self.rank,
            "threshold": self.threshold,
            "top_k": self.top_k,
            "passed": self.passed,
        }


def requested_species(request: ImageRequest, catalogue: Catalogue) -> Species:
    """The catalogue's entry for the request's species, or one made of the request's own names."""
    found = catalogue.lookup(
        species_id=request.species_id, scientific_name=request.scientific_name, common_name=request.species
    )
    if found is not None:
        return found
    return Species(
        species_id=request.species_id or request.species,
        common_name=request.species,
        scientific_name=request.scientific_name or "",
        family=request.family or "",
        taxonomic_family="",
    )


def _folder(path: Path, what: str) -> Path:
    """Weights are read from safetensors only (docs/security.md): a pickled .bin folder is refused."""
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{what} folder {path} has no config.json (a transformers model folder)")
    return path


class ZeroShotVerifier:
    """CLIP zero-shot over the catalogue's species; text embeddings computed once."""

    judge = "zero_shot"

    def __init__(self, folder: Path, catalogue: Catalogue, prompt: str, threshold: float, top_k: int) -> None:
        from transformers import AutoProcessor, CLIPModel

        folder = _folder(Path(folder), "zero-shot verifier")
        self.model = CLIPModel.from_pretrained(folder, use_safetensors=True).eval()
        self.processor = AutoProcessor.from_pretrained(folder)  # no weights
        self.prompt = prompt
        self.threshold = threshold
        self.top_k = top_k
        self.species = list(catalogue.species)
        self.catalogue_texts = self._embed_texts(self.species)

    def _embed_texts(self, species: Sequence[Species]) -> torch.Tensor:
        texts = [self.prompt.format(**vars(s)) for s in species]
        tokens = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        with torch.inference_mode():
            embeds = self.model.get_text_features(**tokens)
        return torch.nn.functional.normalize(_tensor(embeds), dim=-1)

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Unit-length CLIP image embeddings of processed pixels (differentiable)."""
        return torch.nn.functional.normalize(
            _tensor(self.model.get_image_features(pixel_values=pixel_values)), dim=-1
        )

    def embed_image(self, image: Image.Image) -> torch.Tensor:
        pixels = self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            return self.image_embeddings(pixels)[0]

    def verify(self, image: Image.Image, species: Species) -> Verification:
        candidates, texts = self.species, self.catalogue_texts
        ids = [s.species_id for s in candidates]
        if species.species_id not in ids:
            candidates = [*candidates, species]
            texts = torch.cat([texts, self._embed_texts([species])])
            ids.append(species.species_id)
        with torch.inference_mode():
            probabilities = (self.model.logit_scale.exp() * texts @ self.embed_image(image)).softmax(dim=0)
        score = probabilities[ids.index(species.species_id)]
        rank = 1 + int((probabilities > score).sum())
        predicted = ids[int(probabilities.argmax())]
        return Verification(self.judge, float(score), predicted, self.threshold, rank, self.top_k)


class ClassifierVerifier:
    """A local image classifier whose labels name catalogue species (id, scientific or common name)."""

    judge = "classifier"

    def __init__(self, folder: Path, catalogue: Catalogue, threshold: float) -> None:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        folder = _folder(Path(folder), "classifier")
        self.model = AutoModelForImageClassification.from_pretrained(folder, use_safetensors=True).eval()
        self.processor = AutoImageProcessor.from_pretrained(folder)  # no weights
        self.threshold = threshold
        self.labels: list[str] = []  # per class index: the species id, or the raw label
        for index in range(self.model.config.num_labels):
            label = self.model.config.id2label[index]
            found = catalogue.lookup(species_id=label, scientific_name=label, common_name=label)
            self.labels.append(found.species_id if found else label)

    def verify(self, image: Image.Image, species: Species) -> Verification:
        pixels = self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            probabilities = self.model(pixel_values=pixels).logits[0].softmax(dim=0)
        predicted = self.labels[int(probabilities.argmax())]
        if species.species_id not in self.labels:
            return Verification(self.judge, None, predicted, self.threshold)
        score = probabilities[self.labels.index(species.species_id)]
        rank = 1 + int((probabilities > score).sum())
        return Verification(self.judge, float(score), predicted, self.threshold, rank)


def _tensor(output: Any) -> torch.Tensor:
    """transformers 5 may return a model output where 4 returned the pooled tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
