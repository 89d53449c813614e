"""The quality-assurance thresholds (data/qa.yaml), validated at load; no torch here.

One copy, read by pre-generation's gates, the review queue and the report, so a threshold changed
in the file changes every one of them. docs/qa.md says what each number means.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from birdgen.prompts import DATA_DIR, load_data_file

DEFAULT_QA_CONFIG = DATA_DIR / "qa.yaml"
# Where `birdgen tiny-model` writes its random-weight CLIP verifier, and where `--qa` looks for one
# in the model folder by default (a real one is a separate download: docs/qa.md).
SPECIES_VERIFIER_FOLDER = "species-verifier"
# The fields a verification prompt may name: a catalogue species' own.
PROMPT_FIELDS = ("common_name", "scientific_name", "family", "taxonomic_family", "species_id")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Verification(_Strict):
    prompt: str = Field(min_length=1)
    top_k: int = Field(ge=1)
    min_probability: float = Field(ge=0.0, le=1.0)
    classifier_min_probability: float = Field(ge=0.0, le=1.0)

    @field_validator("prompt")
    @classmethod
    def _names_known_fields(cls, prompt: str) -> str:
        try:
            prompt.format(**{name: "x" for name in PROMPT_FIELDS})
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"prompt {prompt!r} does not format ({exc!r}); it may name {', '.join(PROMPT_FIELDS)}"
            ) from None
        return prompt


class Gates(_Strict):
    brisque_max: float
    sharpness_min: float = Field(ge=0.0)
    max_regenerations: int = Field(ge=0, le=20)


class Review(_Strict):
    share: float = Field(ge=0.0, le=1.0)


class Report(_Strict):
    margin: float = Field(ge=0.0, le=1.0)


class QaConfig(_Strict):
    verification: Verification
    gates: Gates
    review: Review
    report: Report

    @classmethod
    def load(cls, path: Path | None = None) -> QaConfig:
        return load_data_file(path or DEFAULT_QA_CONFIG, cls)
