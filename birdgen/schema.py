"""The image request: its fields, limits, normalisation and errors, in one place with no torch.

The client, the HTTP gateway and the Triton models all import this module, so a request means the
same thing everywhere: the same defaults, the same canonical form (cache key and derived seed) and
the same error for the same mistake. Limits come from `data/limits.yaml`, vocabulary values
(pose, season, ...) from `data/vocabulary.yaml`, family groups from `data/catalogue.yaml`.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from birdgen.catalogue import Catalogue
from birdgen.prompts import DATA_DIR, PromptLibrary, load_data_file

DEFAULT_LIMITS = DATA_DIR / "limits.yaml"
_SPECIES_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SEED_MASK = (1 << 63) - 1


class _Missing(enum.Enum):
    MISSING = "MISSING"

    def __repr__(self) -> str:
        return "<missing>"


MISSING = _Missing.MISSING  # RequestError.value when a required field was not given


class RequestError(ValueError):
    """A bad request, naming the field, the value it got and what is allowed (a 4xx, never a 5xx)."""

    def __init__(self, field: str, value: object, allowed: str) -> None:
        super().__init__(field, value, allowed)  # keeps the error picklable across processes
        self.field = field
        self.value = value
        self.allowed = allowed

    def __str__(self) -> str:
        if self.value is MISSING:
            return f"missing {self.field!r}; allowed: {self.allowed}"
        return f"invalid {self.field!r}: got {_short_repr(self.value)}; allowed: {self.allowed}"


def _short_repr(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class IntRange(_Strict):
    min: int
    max: int
    multiple_of: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        if self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self

    def contains(self, value: int) -> bool:
        return self.min <= value <= self.max and value % self.multiple_of == 0

    def describe(self) -> str:
        step = f", multiple of {self.multiple_of}" if self.multiple_of > 1 else ""
        return f"an integer {self.min}..{self.max}{step}"


class DefaultedRange(IntRange):
    default: int

    @model_validator(mode="after")
    def _default_inside(self) -> DefaultedRange:
        if not self.contains(self.default):
            raise ValueError(f"default {self.default} is outside {self.describe()}")
        return self


class MaxLength(_Strict):
    name: int = Field(ge=1)
    species_id: int = Field(ge=1)
    prompt: int = Field(ge=1)


class Limits(_Strict):
    """The validated limits.yaml."""

    width: DefaultedRange
    height: DefaultedRange
    steps: DefaultedRange
    seed: IntRange
    max_length: MaxLength
    formats: list[str] = Field(min_length=1)
    default_format: str
    format_aliases: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Limits:
        if any(f != f.lower() or not f for f in self.formats) or len(set(self.formats)) != len(self.formats):
            raise ValueError(f"formats must be unique, non-empty and lower-case, got {self.formats}")
        if self.default_format not in self.formats:
            raise ValueError(f"default_format {self.default_format!r} is not one of {self.formats}")
        for alias, target in self.format_aliases.items():
            if alias != alias.lower() or alias in self.formats or target not in self.formats:
                raise ValueError(
                    f"format_aliases.{alias}: must be a lower-case non-format mapping to a format"
                )
        return self

    @classmethod
    def load(cls, path: Path | None = None) -> Limits:
        """The limits from `path`, or the bundled ones (read once per process)."""
        return _load_default_limits() if path is None else load_data_file(path, cls)

    def canonical_format(self, value: str) -> str | None:
        key = value.strip().lower()
        return key if key in self.formats else self.format_aliases.get(key)


@functools.cache
def _load_default_limits() -> Limits:
    return load_data_file(DEFAULT_LIMITS, Limits)


LIMITS = Limits.load()
VOCABULARY = PromptLibrary.load()
CATALOGUE = Catalogue.load()
_DEFAULTS = VOCABULARY.defaults


def _allowed(field: str) -> str:
    """What `field` accepts, in words: the `allowed` of every RequestError about it."""
    n = LIMITS.max_length
    if field in ("width", "height", "steps"):
        return getattr(LIMITS, field).describe()
    if field == "seed":
        return f"{LIMITS.seed.describe()}, or null for a seed derived from the request"
    if field == "species":
        return f"a non-empty string of at most {n.name} characters"
    if field == "scientific_name":
        return f"a string of at most {n.name} characters, or null"
    if field == "species_id":
        return f"letters, digits and _ . : - (at most {n.species_id} characters), or null"
    if field in ("prompt", "negative_prompt"):
        return f"a string of at most {n.prompt} characters, or null"
    if field == "family":
        return f"{', '.join(CATALOGUE.groups)}, or null"
    if field == "format":
        aliases = ", ".join(f"{a} = {t}" for a, t in LIMITS.format_aliases.items())
        return ", ".join(LIMITS.formats) + (f" (also {aliases})" if aliases else "")
    if field == "habitat":
        return f"{', '.join(VOCABULARY.allowed(field))}, or null"
    if field in ("pose", "season", "lighting", "style"):
        return ", ".join(VOCABULARY.allowed(field))
    return f"the fields {', '.join(ImageRequest.model_fields)}"


def _text(value: str, field: str) -> str:
    """Stripped text; rejects what cannot be encoded (lone surrogates) so hashing never fails later."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(field, value, f"valid Unicode text: {_allowed(field)}") from None
    return value.strip()


class ImageRequest(BaseModel):
    """One image to generate. Values are normalised on construction (stripped, canonical spelling).

    Case and spelling variants are accepted and stored canonically: "Perched" -> "perched",
    "Golden Hour" -> "golden-hour", "fall" -> "autumn" (vocabulary aliases), "passeriformes" ->
    "Passeriformes", "JPG" -> "jpeg". Empty optional strings mean null. Integers are strict: no
    bools, floats or numeric strings. Invalid input raises RequestError, never a pydantic error.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    species: str
    scientific_name: str | None = None
    species_id: str | None = None
    family: str | None = None
    pose: str = _DEFAULTS.pose
    season: str = _DEFAULTS.season
    lighting: str = _DEFAULTS.lighting
    style: str = _DEFAULTS.style
    habitat: str | None = _DEFAULTS.habitat
    width: int = LIMITS.width.default
    height: int = LIMITS.height.default
    steps: int = LIMITS.steps.default
    seed: int | None = None
    format: str = LIMITS.default_format
    prompt: str | None = None
    negative_prompt: str | None = None

    def __init__(self, **data: Any) -> None:
        for key, value in data.items():
            if key not in type(self).model_fields:
                raise RequestError(key, value, _allowed("request"))
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _request_error(exc) from None

    @field_validator("species", "scientific_name")
    @classmethod
    def _name(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        name = " ".join(_text(value, info.field_name).split())
        if not name and info.field_name != "species":
            return None
        if not name or len(name) > LIMITS.max_length.name or _CONTROL.search(name):
            raise RequestError(info.field_name, value, _allowed(info.field_name))
        return name

    @field_validator("species_id")
    @classmethod
    def _species_id(cls, value: str | None) -> str | None:
        text = _text(value, "species_id") if value is not None else ""
        if not text:
            return None
        if len(text) > LIMITS.max_length.species_id or not _SPECIES_ID.match(text):
            raise RequestError("species_id", value, _allowed("species_id"))
        return text

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _prompt(cls, value: str | None, info: ValidationInfo) -> str | None:
        text = _text(value, info.field_name) if value is not None else ""
        if len(text) > LIMITS.max_length.prompt:
            raise RequestError(info.field_name, value, _allowed(info.field_name))
        return text or None

    @field_validator("family")
    @classmethod
    def _family(cls, value: str | None) -> str | None:
        text = _text(value, "family") if value is not None else ""
        if not text:
            return None
        family = CATALOGUE.canonical_group(text)
        if family is None:
            raise RequestError("family", value, _allowed("family"))
        return family

    @field_validator("pose", "season", "lighting", "style", "habitat")
    @classmethod
    def _vocabulary(cls, value: str | None, info: ValidationInfo) -> str | None:
        text = _text(value, info.field_name) if value is not None else ""
        if not text and info.field_name == "habitat":
            return None
        key = VOCABULARY.canonical(info.field_name, text)
        if key is None:
            raise RequestError(info.field_name, value, _allowed(info.field_name))
        return key

    @field_validator("width", "height", "steps", "seed")
    @classmethod
    def _in_range(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not getattr(LIMITS, info.field_name).contains(value):
            raise RequestError(info.field_name, value, _allowed(info.field_name))
        return value

    @field_validator("format")
    @classmethod
    def _format(cls, value: str) -> str:
        fmt = LIMITS.canonical_format(_text(value, "format"))
        if fmt is None:
            raise RequestError("format", value, _allowed("format"))
        return fmt

    def to_dict(self) -> dict[str, Any]:
        """Every field, normalised and JSON-ready: what a client sends."""
        return self.model_dump(mode="json")

    def canonical_json(self) -> str:
        """The request as one canonical string: equal requests give equal text (cache keys, seeds)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    def resolved_seed(self) -> int:
        """The seed, or one derived from the request so a repeated request gives the same image.

        The output format is left out: the PNG and the WebP of one request show the same picture.
        """
        if self.seed is not None:
            return self.seed
        picture = {k: v for k, v in self.to_dict().items() if k not in ("seed", "format")}
        text = json.dumps(picture, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        digest = hashlib.sha256(text.encode("utf-8"))
        return int.from_bytes(digest.digest()[:8], "big") & _SEED_MASK


def _request_error(exc: ValidationError) -> RequestError:
    """The first problem pydantic found, as a RequestError naming field, value and what is allowed."""
    err = exc.errors()[0]
    field = str(err["loc"][0]) if err["loc"] else "request"
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, RequestError):
        return cause
    if err["type"] == "missing":
        return RequestError(field, MISSING, _allowed(field))
    return RequestError(field, err.get("input"), _allowed(field))


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise RequestError(key, value, "each field at most once")
        result[key] = value
    return result


def parse_image_request(data: Mapping[str, Any] | str | bytes | ImageRequest) -> ImageRequest:
    """An ImageRequest from a mapping or JSON text; raises RequestError for the first problem.

    Unknown fields are reported before anything else (usually a typo), then fields in declaration
    order. Invalid JSON or a non-object is reported for the field "request".
    """
    if isinstance(data, ImageRequest):
        return data
    if isinstance(data, str | bytes | bytearray):
        try:
            data = json.loads(data, object_pairs_hook=_reject_duplicates)
        except RequestError:
            raise
        except (ValueError, RecursionError) as exc:
            raise RequestError("request", data, f"a JSON object of request fields ({exc})") from None
    if not isinstance(data, Mapping):
        raise RequestError("request", data, f"a JSON object with {_allowed('request')}")
    for key in data:
        if not isinstance(key, str):
            raise RequestError("request", key, f"string keys naming {_allowed('request')}")
    return ImageRequest(**data)
