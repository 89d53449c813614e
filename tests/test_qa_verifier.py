"""Species verification: the code path on the tiny model's random-weight CLIP, and two cases whose
answer is known: a picture optimised towards one species' text embedding, and a tiny classifier
trained here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from birdgen.catalogue import Catalogue
from birdgen.qa.verifier import ClassifierVerifier, ZeroShotVerifier, requested_species
from birdgen.qa_config import SPECIES_VERIFIER_FOLDER, QaConfig
from birdgen.schema import ImageRequest

PROMPT = QaConfig.load().verification.prompt


@pytest.fixture(scope="module")
def verifier(tiny_model: Path) -> ZeroShotVerifier:
    return ZeroShotVerifier(
        tiny_model / SPECIES_VERIFIER_FOLDER, Catalogue.load(), PROMPT, threshold=0.0, top_k=1
    )


def species(common_name: str) -> object:
    return requested_species(ImageRequest(species=common_name), Catalogue.load())


def picture_towards(verifier: ZeroShotVerifier, target: torch.Tensor, steps: int = 300) -> Image.Image:
    """An 8-bit picture whose CLIP image embedding points along `target` (gradient ascent on the
    pixels, through the processor's own normalisation), at the processor's input size."""
    side = verifier.processor.image_processor.crop_size["height"]
    mean = torch.tensor(verifier.processor.image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(verifier.processor.image_processor.image_std).view(1, 3, 1, 1)
    logits = torch.zeros(1, 3, side, side, requires_grad=True)
    optimiser = torch.optim.Adam([logits], lr=0.1)
    torch.manual_seed(0)
    for _ in range(steps):
        pixels = (torch.sigmoid(logits) - mean) / std
        loss = -(verifier.image_embeddings(pixels) @ target).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    array = (torch.sigmoid(logits)[0].permute(1, 2, 0).detach().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def test_a_picture_made_from_one_species_text_verifies_as_that_species_and_not_another(
    verifier: ZeroShotVerifier,
) -> None:
    robin, jay = species("American Robin"), species("Blue Jay")
    index = [s.species_id for s in verifier.species].index(robin.species_id)
    image = picture_towards(verifier, verifier.catalogue_texts[index])
    as_robin = verifier.verify(image, robin)
    assert as_robin.predicted == "amerob" and as_robin.rank == 1 and as_robin.passed
    as_jay = verifier.verify(image, jay)
    assert as_jay.predicted == "amerob" and as_jay.rank > 1 and not as_jay.passed
    assert as_robin.score > 3 * as_jay.score
    assert as_jay.record() == {
        "score": round(as_jay.score, 6),
        "predicted": "amerob",
        "rank": as_jay.rank,
        "threshold": 0.0,
        "top_k": 1,
        "passed": False,
    }
    assert as_jay.failure.startswith(f"zero_shot {as_jay.score:.3f} (threshold 0, rank {as_jay.rank} > 1")


def test_a_species_outside_the_catalogue_is_scored_against_it(verifier: ZeroShotVerifier) -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 48, 3), dtype=np.uint8))
    unknown = requested_species(
        ImageRequest(species="Imaginary Warbler", species_id="imawar"), Catalogue.load()
    )
    verdict = verifier.verify(image, unknown)
    assert unknown.species_id == "imawar" and 0.0 < verdict.score < 1.0
    assert len(verifier.species) == len(Catalogue.load().species)  # the catalogue texts stay as they were


COLOURS = {"amerob": (200, 60, 30), "blujay": (40, 80, 210), "mallar3": (40, 160, 60)}


def coloured(species_id: str, rng: np.random.Generator, side: int = 32) -> Image.Image:
    base = np.array(COLOURS[species_id], dtype=np.float64)
    pixels = base + rng.normal(0.0, 25.0, (side, side, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ViT trained here to tell three catalogue species apart by colour, saved as a folder."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    labels = ["amerob", "Blue Jay", "Anas platyrhynchos"]  # an id, a common and a scientific name
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=3, id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )  # fmt: skip
    torch.manual_seed(0)
    model = ViTForImageClassification(config)
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    rng = np.random.default_rng(0)
    ids = list(COLOURS)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        targets = rng.integers(0, 3, 24)
        pixels = processor(images=[coloured(ids[t], rng) for t in targets], return_tensors="pt")[
            "pixel_values"
        ]
        loss = model(pixel_values=pixels, labels=torch.tensor(targets)).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    folder = tmp_path_factory.mktemp("classifier")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_a_trained_classifier_verifies_the_right_species_and_rejects_the_wrong_one(
    classifier_folder: Path,
) -> None:
    classifier = ClassifierVerifier(classifier_folder, Catalogue.load(), threshold=0.5)
    assert classifier.labels == ["amerob", "blujay", "mallar3"]  # names resolved to catalogue ids
    rng = np.random.default_rng(1)
    for species_id, name in (("amerob", "American Robin"), ("blujay", "Blue Jay"), ("mallar3", "Mallard")):
        image = coloured(species_id, rng)
        right = classifier.verify(image, species(name))
        assert right.predicted == species_id and right.passed and right.score > 0.9
        wrong_name = "Blue Jay" if species_id != "blujay" else "Mallard"
        wrong = classifier.verify(image, species(wrong_name))
        assert not wrong.passed and wrong.score < 0.1
    not_covered = classifier.verify(coloured("amerob", rng), species("Northern Cardinal"))
    assert not_covered.score is None and not_covered.passed and not_covered.predicted == "amerob"


def test_a_folder_without_a_model_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"zero-shot verifier folder {tmp_path} has no config.json"):
        ZeroShotVerifier(tmp_path, Catalogue.load(), PROMPT, threshold=0.5, top_k=1)
