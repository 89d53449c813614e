"""The quality gates of a generated picture, and pre-generation's `--qa` (`QaGate`).

`QualityChecker.check` measures one picture: BRISQUE, sharpness and each species judge, each
against data/qa.yaml's threshold; the failures are the reasons a redraw is asked for.
`QaGate` is what `birdgen pregenerate --qa` plugs into a run (client.pregenerate.QualityGate):
it judges each draw off the event loop, and queues sampled and flagged items for review.
An animation is judged by its poster frame (the still the platform shows first), or its first frame.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from birdgen.catalogue import Catalogue, Species
from birdgen.client.calls import GeneratedAnimation, GeneratedEink, GeneratedImage
from birdgen.client.pregenerate import Request, WorkItem
from birdgen.contracts import GIF, POSTER, WEBP
from birdgen.qa import measures
from birdgen.qa.review import ReviewQueue, picture_seed, sampled, status
from birdgen.qa.verifier import Verification, requested_species
from birdgen.qa_config import QaConfig

Result = GeneratedImage | GeneratedAnimation


class SpeciesJudge(Protocol):
    """A verifier (birdgen.qa.verifier): the requested species' score on a picture."""

    judge: str

    def verify(self, image: Image.Image, species: Species) -> Verification: ...


@dataclass(frozen=True)
class QaVerdict:
    brisque: float
    sharpness: float
    verifications: tuple[Verification, ...]
    failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures

    def record(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "failures": list(self.failures),
            "brisque": round(self.brisque, 3),
            "sharpness": round(self.sharpness, 3),
            **{v.judge: v.record() for v in self.verifications},
        }


class QualityChecker:
    """The gates of data/qa.yaml over one picture; judges are optional (none: quality gates only)."""

    def __init__(
        self, config: QaConfig, judges: Sequence[SpeciesJudge] = (), catalogue: Catalogue | None = None
    ) -> None:
        self.config = config
        self.judges = tuple(judges)
        self.catalogue = catalogue or Catalogue.load()

    def check(self, image: Image.Image, request: Request) -> QaVerdict:
        gates = self.config.gates
        brisque = measures.brisque(image)
        sharpness = measures.sharpness(image)
        failures = []
        if brisque > gates.brisque_max:
            failures.append(f"brisque {brisque:.1f} > {gates.brisque_max:g}")
        if sharpness < gates.sharpness_min:
            failures.append(f"sharpness {sharpness:.1f} < {gates.sharpness_min:g}")
        species = requested_species(request, self.catalogue)
        verifications = tuple(judge.verify(image, species) for judge in self.judges)
        failures += [v.failure for v in verifications if not v.passed]
        return QaVerdict(brisque, sharpness, verifications, tuple(failures))


def judged_picture(result: Result) -> tuple[bytes, str]:
    """The encoded picture QA judges, and its file suffix: an image's own file, an animation's
    poster (or, without one, its first frame as PNG)."""
    if isinstance(result, GeneratedEink):
        raise ValueError("QA judges photos, not e-ink previews: run --qa on the png catalogue")
    if isinstance(result, GeneratedImage):
        return result.data, {"jpeg": ".jpg"}.get(result.format, f".{result.format}")
    if POSTER in result.files:
        return result.files[POSTER], ".png"
    clip = result.files.get(WEBP) or result.files[GIF]
    with Image.open(BytesIO(clip)) as frames:
        buffer = BytesIO()
        frames.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue(), ".png"


def _open(data: bytes) -> Image.Image:
    image = Image.open(BytesIO(data))
    image.load()
    return image


class QaGate:
    """Pre-generation's quality gate: checks draws, queues sampled and flagged items for review."""

    def __init__(self, checker: QualityChecker, review_folder: Path) -> None:
        self.checker = checker
        self.max_regenerations = checker.config.gates.max_regenerations
        self.share = checker.config.review.share
        self.queue = ReviewQueue(review_folder)

    async def judge(self, request: Request, result: Result) -> dict[str, Any]:
        data, _ = judged_picture(result)
        verdict = await asyncio.to_thread(self.checker.check, _open(data), request)
        return verdict.record()

    def review(self, item: WorkItem, record: Mapping[str, Any], result: Result) -> bool:
        qa = record["qa"]
        replaces = qa.get("replaces") is not None
        if not (qa["flagged"] or replaces or sampled(item.id, self.share)):
            return False
        data, suffix = judged_picture(result)
        reason = "flagged" if qa["flagged"] else "replaces a rejected picture" if replaces else "sampled"
        entry = {
            "id": item.id,
            "kind": item.kind,
            "species_id": item.species_id,
            "species": item.request.species,
            "family": result.metadata.get("family"),
            "reason": reason,
            "qa": qa,
            "metadata": result.metadata,
            "files": record.get("files", {}),
        }
        self.queue.enqueue(entry, data, suffix)
        return True

    def rejected(self, records: Mapping[str, Mapping[str, Any]]) -> set[str]:
        decided = self.queue.decisions()  # read once for the whole manifest
        return {
            item_id
            for item_id, record in records.items()
            if status(decided.get(item_id), picture_seed(record)) == "rejected"
        }


def load_judges(
    config: QaConfig, verifier: Path | None, classifier: Path | None, catalogue: Catalogue | None = None
) -> list[SpeciesJudge]:
    """The species judges from local folders (either may be None): zero-shot CLIP, then a classifier."""
    from birdgen.qa.verifier import ClassifierVerifier, ZeroShotVerifier

    catalogue = catalogue or Catalogue.load()
    judges: list[SpeciesJudge] = []
    if verifier is not None:
        v = config.verification
        judges.append(ZeroShotVerifier(verifier, catalogue, v.prompt, v.min_probability, v.top_k))
    if classifier is not None:
        judges.append(
            ClassifierVerifier(classifier, catalogue, config.verification.classifier_min_probability)
        )
    return judges
