"""The image and animation requests: fields, limits, normalisation and errors, in one place, no torch.

The client, the HTTP gateway and the Triton models all import this module, so a request means the
same thing everywhere: the same defaults, the same canonical form (cache key and derived seed) and
the same error for the same mistake. Limits come from `data/limits.yaml`, vocabulary values
(pose, behaviour, season, ...) from `data/vocabulary.yaml`, families from `data/catalogue.yaml`,
e-ink panels and palettes from `data/eink_panels.yaml`.
The two requests share every field they have in common: each is declared and validated once.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from birdgen.catalogue import Catalogue
from birdgen.contracts import CONTROLNET_KINDS
from birdgen.control import ControlSettings
from birdgen.eink_panels import DITHERS, FITS
from birdgen.eink_panels import PRESETS as EINK_PRESETS
from birdgen.prompts import DATA_DIR, FIELDS, PromptLibrary, load_data_file
from birdgen.request_error import MISSING, RequestError

DEFAULT_LIMITS = DATA_DIR / "limits.yaml"
_SPECIES_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
# C0 and C1 control characters and DEL: refused in names and prompts (terminal escapes, NULs).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SEED_MASK = (1 << 63) - 1
# The image format that renders the PNG of the same request for an e-paper panel (birdgen.eink).
EINK = "eink"
EINK_FIELDS = ("eink_panel", "eink_palette", "eink_dither", "eink_fit")
EINK_SOURCE_FORMAT = "png"  # lossless: the panel picture is the same wherever it is rendered
# Fields that choose how a result is delivered, not what is drawn: left out of the derived seed.
OUTPUT_CHOICES = ("format", "poster_frame", *EINK_FIELDS)
# Left out of the derived seed as well: ControlNet guidance steers the scene's own noise, so adding
# control (or a scale-0 control) keeps the seed of the uncontrolled twin.
SEEDLESS_FIELDS = (*OUTPUT_CHOICES, "control")
# Room in a controlled request for one kind's JSON around its base64 image (the field names, the
# source key, scale, start and end): Limits.max_controlled_request_bytes.
_CONTROL_JSON_BYTES = 256
# The animation engines (limits.yaml `svd.engines`, in this order; the first is the default).
ENGINE_ANIMATEDIFF = "animatediff"
ENGINE_SVD = "svd"
ENGINES = (ENGINE_ANIMATEDIFF, ENGINE_SVD)
# An animation request's fields only an svd request may carry (null with animatediff): the picture
# to animate, the pose of a still drawn for it, and SVD's own settings (docs/svd.md). Declared last,
# in this order, so their errors are reported after every shared field's.
SVD_SETTINGS = (
    "motion_bucket_id",
    "noise_aug_strength",
    "min_guidance_scale",
    "max_guidance_scale",
    "decode_chunk_size",
)
SVD_FIELDS = ("image", "pose", *SVD_SETTINGS)
# Bounds of a request's JSON (Limits.max_request_json_bytes): bytes per character of text at most
# (a surrogate pair of \uXXXX escapes) and room for everything that is not free text.
_JSON_BYTES_PER_CHAR = 12
_JSON_OTHER_BYTES = 4096


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class NumberRange(_Strict):
    """min..max; real numbers (a duration of 2.5 s) unless a subclass narrows them."""

    min: float
    max: float

    @model_validator(mode="after")
    def _ordered(self) -> NumberRange:
        if self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self

    def contains(self, value: float) -> bool:
        return self.min <= value <= self.max  # False for NaN

    def describe(self) -> str:
        return f"a number {self.min:g}..{self.max:g}"


class IntRange(NumberRange):
    min: int
    max: int
    multiple_of: int = Field(default=1, ge=1)

    def contains(self, value: float) -> bool:
        return super().contains(value) and value % self.multiple_of == 0

    def describe(self) -> str:
        step = f", multiple of {self.multiple_of}" if self.multiple_of > 1 else ""
        return f"an integer {self.min}..{self.max}{step}"


def _check_default(limit: Any) -> Any:
    """A DefaultedRange's or DefaultedNumberRange's default must lie inside the range."""
    if not limit.contains(limit.default):
        raise ValueError(f"default {limit.default} is outside {limit.describe()}")
    return limit


class DefaultedRange(IntRange):
    default: int

    _default_inside = model_validator(mode="after")(_check_default)


class DefaultedNumberRange(NumberRange):
    default: float

    _default_inside = model_validator(mode="after")(_check_default)


class MaxLength(_Strict):
    name: int = Field(ge=1)
    species_id: int = Field(ge=1)
    prompt: int = Field(ge=1)


class _OutputLimits(_Strict):
    """What each kind of request limits on its own: its size, steps and output formats."""

    width: DefaultedRange
    height: DefaultedRange
    steps: DefaultedRange
    formats: list[str] = Field(min_length=1)
    default_format: str
    format_aliases: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent_formats(self) -> _OutputLimits:
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

    def canonical_format(self, value: str) -> str | None:
        key = value.strip().lower()
        return key if key in self.formats else self.format_aliases.get(key)


class AnimationLimits(_OutputLimits):
    """The `animation` section of limits.yaml: an animation's size, steps, formats and length."""

    duration_seconds: DefaultedNumberRange
    fps: DefaultedRange
    max_frames: int = Field(ge=1)

    @model_validator(mode="after")
    def _default_length_fits(self) -> AnimationLimits:
        frames = _frame_count(self.duration_seconds.default, self.fps.default)
        if frames is None or frames > self.max_frames:
            raise ValueError(
                f"the default duration_seconds x fps ({self.duration_seconds.default:g} x "
                f"{self.fps.default}) must be a whole number of frames, at most max_frames {self.max_frames}"
            )
        return self


class SvdLimits(_Strict):
    """The `svd` section: the animation engines, and what an svd animation request limits on its own
    (its length, fps and steps, and Stable Video Diffusion's settings; docs/svd.md). Its sizes and
    formats are the animation's."""

    engines: list[str]
    min_frames: int = Field(ge=1)
    max_frames: int = Field(ge=1)
    fps: DefaultedRange
    duration_seconds: DefaultedNumberRange
    steps: DefaultedRange
    motion_bucket_id: DefaultedRange
    noise_aug_strength: DefaultedNumberRange
    min_guidance_scale: DefaultedNumberRange
    max_guidance_scale: DefaultedNumberRange
    decode_chunk_size: DefaultedRange

    @model_validator(mode="after")
    def _consistent(self) -> SvdLimits:
        _check_names("engines", self.engines, ENGINES, "the first is the default; birdgen.schema.ENGINES")
        if self.min_frames > self.max_frames:
            raise ValueError(f"min_frames {self.min_frames} is above max_frames {self.max_frames}")
        if self.fps.min < 1:
            raise ValueError(
                f"fps.min must be at least 1 (SVD is conditioned on fps - 1), got {self.fps.min}"
            )
        frames = _frame_count(self.duration_seconds.default, self.fps.default)
        if frames is None or not self.min_frames <= frames <= self.max_frames:
            raise ValueError(
                f"the default duration_seconds x fps ({self.duration_seconds.default:g} x "
                f"{self.fps.default}) must be a whole number of frames, {self.min_frames}..{self.max_frames}"
            )
        if self.decode_chunk_size.max > self.max_frames:
            raise ValueError(
                f"decode_chunk_size.max {self.decode_chunk_size.max} is above max_frames {self.max_frames}"
            )
        if self.min_guidance_scale.default > self.max_guidance_scale.default:
            raise ValueError(
                f"min_guidance_scale.default {self.min_guidance_scale.default:g} is above "
                f"max_guidance_scale.default {self.max_guidance_scale.default:g}"
            )
        return self


class InputImageLimits(_Strict):
    """A client-supplied picture (control or conditioning image): bytes, formats, decoded pixels."""

    max_bytes: int = Field(ge=1)
    max_pixels: int = Field(ge=1)
    formats: list[str] = Field(min_length=1)

    @property
    def max_base64_chars(self) -> int:
        """The longest base64 text that can decode to max_bytes (3 bytes in 4 characters)."""
        return 4 * -(-self.max_bytes // 3)


class ControlKindLimits(_Strict):
    """One ControlNet kind: the conditioning scale a request gets when it names none."""

    scale_default: float


class ControlLimits(_Strict):
    """The `control` section: the ControlNet kinds a request may name, and each setting's range.

    The kinds are contracts.CONTROLNET_KINDS, in that order (the order nets run and residuals are
    summed in). start and end bound the fraction of the steps a net runs on, within diffusers'
    0 <= start < end <= 1.
    """

    kinds: dict[str, ControlKindLimits]
    scale: NumberRange
    start: DefaultedNumberRange
    end: DefaultedNumberRange

    @model_validator(mode="after")
    def _consistent(self) -> ControlLimits:
        _check_names("kinds", self.kinds, CONTROLNET_KINDS, "contracts.CONTROLNET_KINDS")
        for kind, limits in self.kinds.items():
            if not self.scale.contains(limits.scale_default):
                raise ValueError(
                    f"kinds.{kind}.scale_default {limits.scale_default} is outside {self.scale.describe()}"
                )
        if self.start.min < 0 or self.end.max > 1:
            raise ValueError("start and end must lie within 0..1 (fractions of the steps)")
        if self.start.default >= self.end.default:
            raise ValueError(
                f"start.default {self.start.default} must be below end.default {self.end.default}"
            )
        return self


class BatchLimits(_Strict):
    max_items: int = Field(ge=1)


class ServingLimits(_Strict):
    """The server side's bounds: request message size and each entry model's queue.

    max_request_bytes must hold the largest controlled request (Limits.max_controlled_request_bytes,
    checked at load)."""

    max_request_bytes: int = Field(ge=1024)
    max_queue_size: int = Field(ge=1)
    queue_timeout_s: float = Field(gt=0)


class Limits(_OutputLimits):
    """The validated limits.yaml: an image's limits at the top level, an animation's in `animation`,
    client-supplied pictures, batches and the server's queues in their own sections."""

    seed: IntRange
    max_length: MaxLength
    animation: AnimationLimits
    svd: SvdLimits
    input_image: InputImageLimits
    control: ControlLimits
    batch: BatchLimits
    serving: ServingLimits

    @model_validator(mode="after")
    def _controlled_request_fits(self) -> Limits:
        if self.max_controlled_request_bytes > self.serving.max_request_bytes:
            raise ValueError(
                f"serving.max_request_bytes {self.serving.max_request_bytes} is below the largest "
                f"controlled image request, {self.max_controlled_request_bytes} bytes (the JSON plus "
                f"{len(self.control.kinds)} base64 input images of input_image.max_bytes)"
            )
        if self.max_svd_request_bytes > self.serving.max_request_bytes:
            raise ValueError(
                f"serving.max_request_bytes {self.serving.max_request_bytes} is below the largest svd "
                f"animation request, {self.max_svd_request_bytes} bytes (the JSON plus a base64 image)"
            )
        return self

    @classmethod
    def load(cls, path: Path | None = None) -> Limits:
        """The limits from `path`, or the bundled ones (read once per process)."""
        return _load_default_limits() if path is None else load_data_file(path, cls)

    @property
    def max_request_json_bytes(self) -> int:
        """The most bytes a valid image request's JSON needs: every character of its text fields
        (species, scientific name, species id, prompt, negative prompt) at 12 bytes, what
        json.dumps writes by default for an emoji (two \\uXXXX escapes), plus 4 KiB for the field
        names, numbers and vocabulary words. An animation request has the same text fields."""
        text = 2 * self.max_length.name + self.max_length.species_id + 2 * self.max_length.prompt
        return text * _JSON_BYTES_PER_CHAR + _JSON_OTHER_BYTES

    @property
    def max_body_bytes(self) -> int:
        """The largest HTTP body the gateway reads: a full batch (batch.max_items) of the largest
        valid requests, and never more than serving.max_request_bytes. With the bundled limits
        100 x 31,264 = 3,126,400 bytes (3 MiB): every valid request fits, unless padded with whitespace."""
        return min(self.serving.max_request_bytes, self.batch.max_items * self.max_request_json_bytes)

    @property
    def max_controlled_request_bytes(self) -> int:
        """The most bytes a valid image request with a control image for every kind needs: the JSON
        bound above plus, per kind, the longest base64 image (input_image.max_bytes encoded) and 256
        bytes for its settings. With the bundled limits 31,264 + 2 x (11,184,812 + 256) = 22,401,400
        bytes, within serving.max_request_bytes (a validator keeps it so). A control template's
        settings fit the JSON bound's 4 KiB of room, so batches (templates only) keep max_body_bytes."""
        per_kind = self.input_image.max_base64_chars + _CONTROL_JSON_BYTES
        return self.max_request_json_bytes + len(self.control.kinds) * per_kind

    @property
    def max_svd_request_bytes(self) -> int:
        """The most bytes a valid svd animation request needs: the JSON bound above (its room for
        numbers and words holds the SVD settings) plus one base64 image (input_image.max_bytes
        encoded) and 256 bytes around it. With the bundled limits 31,264 + 11,184,812 + 256 =
        11,216,332 bytes, within serving.max_request_bytes (a validator keeps it so)."""
        return self.max_request_json_bytes + self.input_image.max_base64_chars + _CONTROL_JSON_BYTES


def _check_names(field: str, names: Iterable[str], expected: tuple[str, ...], why: str) -> None:
    """A limits.yaml list that must name exactly `expected`, in that order (code relies on both);
    ValueError saying so, and `why`, else."""
    got = tuple(names)
    if got != expected:
        raise ValueError(
            f"{field} must be {', '.join(expected)} in that order ({why}), got {', '.join(got) or 'none'}"
        )


def _frame_count(duration_seconds: float, fps: int) -> int | None:
    """duration x fps when that is a whole number, else None.

    Exact on the decimal the client wrote (2.1 s at 10 fps is 21 frames, although 2.1 * 10 in binary
    floating point is 21.000000000000004).
    """
    frames = Fraction(repr(duration_seconds)) * fps
    return int(frames) if frames.denominator == 1 else None


@functools.cache
def _load_default_limits() -> Limits:
    return load_data_file(DEFAULT_LIMITS, Limits)


LIMITS = Limits.load()
ANIMATION = LIMITS.animation
SVD = LIMITS.svd
VOCABULARY = PromptLibrary.load()
CATALOGUE = Catalogue.load()
_DEFAULTS = VOCABULARY.defaults


class _Request(BaseModel):
    """What every request shares: strict parsing, one RequestError per problem, canonical form, seed.

    Fields come in groups (the classes below), each declared once; ImageRequest and AnimationRequest
    compose them. The validators here serve whichever request declares the field, checking it
    against that request kind's `_limits` (sizes, steps, formats, and an animation's length).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    _limits: ClassVar[_OutputLimits] = LIMITS

    def __init__(self, **data: Any) -> None:
        for key, value in data.items():
            if key not in type(self).model_fields:
                raise RequestError(key, value, self._allowed("request"))
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _request_error(exc, type(self), data) from None

    @classmethod
    def _allowed(cls, field: str, engine: str | None = None) -> str:
        """What `field` accepts, in words: the `allowed` of every RequestError about it. `engine` is
        an animation request's (canonical, or None when unknown): an svd clip has its own ranges."""
        n = LIMITS.max_length
        if field in ("width", "height", "steps", "fps"):
            return getattr(cls._limits, field).describe()
        if field == "duration_seconds":
            return (
                f"{ANIMATION.duration_seconds.describe()} seconds, with duration × fps a whole number "
                f"of frames, at most {ANIMATION.max_frames}"
            )
        if field == "seed":
            return f"{LIMITS.seed.describe()}, or null for a seed derived from the request"
        if field == "poster_frame":
            return "a frame number, 0 (the first) up to frames - 1 (frames = duration_seconds × fps)"
        if field == "species":
            return f"a non-empty string of at most {n.name} characters"
        if field == "scientific_name":
            return f"a string of at most {n.name} characters, or null"
        if field == "species_id":
            return f"letters, digits and _ . : - (at most {n.species_id} characters), or null"
        if field in ("prompt", "negative_prompt"):
            return (
                f"a string of at most {n.prompt} characters without control characters (a run of "
                "spaces, tabs or line breaks counts as one space), or null"
            )
        if field == "family":
            return f"{', '.join(CATALOGUE.families)}, or null"
        if field == "format":
            aliases = ", ".join(f"{a} = {t}" for a, t in cls._limits.format_aliases.items())
            return ", ".join(cls._limits.formats) + (f" (also {aliases})" if aliases else "")
        if field == "habitat":
            return f"{', '.join(VOCABULARY.allowed(field))}, or null"
        if field in EINK_FIELDS:
            names, note = _eink_names(field.removeprefix("eink_"), None)
            return f"with format {EINK}: {', '.join(names)}{note}; with any other format: null"
        if field == "control" or field.startswith("control."):
            return _control_allowed(field)
        if field in FIELDS:
            return ", ".join(VOCABULARY.allowed(field))
        return f"the fields {', '.join(cls.model_fields)}"

    @classmethod
    def _text(cls, value: str, field: str) -> str:
        """Stripped text; rejects what cannot be encoded (lone surrogates) so hashing never fails later."""
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(field, value, f"valid Unicode text: {cls._allowed(field)}") from None
        return value.strip()

    @field_validator("species", "scientific_name", check_fields=False)
    @classmethod
    def _name(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        name = " ".join(cls._text(value, info.field_name).split())
        if not name and info.field_name != "species":
            return None
        if not name or len(name) > LIMITS.max_length.name or _CONTROL.search(name):
            raise RequestError(info.field_name, value, cls._allowed(info.field_name))
        return name

    @field_validator("species_id", check_fields=False)
    @classmethod
    def _species_id(cls, value: str | None) -> str | None:
        text = cls._text(value, "species_id") if value is not None else ""
        if not text:
            return None
        if len(text) > LIMITS.max_length.species_id or not _SPECIES_ID.match(text):
            raise RequestError("species_id", value, cls._allowed("species_id"))
        return text

    @field_validator("prompt", "negative_prompt", check_fields=False)
    @classmethod
    def _prompt(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Whitespace runs become one space, as CLIP's tokenizer reads them (same tokens, same picture),
        so "a\nb" and "a b" are one request, and a prompt stays one printable line in the metadata."""
        text = " ".join(cls._text(value, info.field_name).split()) if value is not None else ""
        if len(text) > LIMITS.max_length.prompt or _CONTROL.search(text):
            raise RequestError(info.field_name, value, cls._allowed(info.field_name))
        return text or None

    @field_validator("family", check_fields=False)
    @classmethod
    def _family(cls, value: str | None) -> str | None:
        text = cls._text(value, "family") if value is not None else ""
        if not text:
            return None
        return CATALOGUE.family(text)

    @field_validator(*FIELDS, check_fields=False)
    @classmethod
    def _vocabulary(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:  # only an optional field gets here: habitat, an animation's pose
            return None
        text = cls._text(value, info.field_name)
        if not text and info.field_name == "habitat":
            return None
        key = VOCABULARY.canonical(info.field_name, text)
        if key is None:
            raise RequestError(info.field_name, value, cls._allowed(info.field_name))
        return key

    @field_validator("width", "height", "steps", "seed", "duration_seconds", "fps", check_fields=False)
    @classmethod
    def _in_range(cls, value: float | None, info: ValidationInfo) -> float | None:
        engine = info.data.get("engine")  # an animation's, validated first
        limit = cls._range(info.field_name, engine)
        if value is not None and not limit.contains(value):
            raise RequestError(info.field_name, value, cls._allowed(info.field_name, engine))
        return value

    @classmethod
    def _range(cls, field: str, engine: str | None) -> NumberRange:
        """The range of a numeric field: the seed's, an svd clip's (fps, steps, duration) or the
        request kind's own."""
        if field == "seed":
            return LIMITS.seed
        if engine == ENGINE_SVD and field in ("fps", "steps", "duration_seconds"):
            return getattr(SVD, field)
        return getattr(cls._limits, field)

    @classmethod
    def _engine_in(cls, data: Mapping[str, Any]) -> str | None:
        """The engine a request's fields name (an animation's), canonical; None for an image request
        or an engine not known."""
        return None

    @field_validator("format", check_fields=False)
    @classmethod
    def _format(cls, value: str) -> str:
        fmt = cls._limits.canonical_format(cls._text(value, "format"))
        if fmt is None:
            raise RequestError("format", value, cls._allowed("format"))
        return fmt

    @field_validator(*EINK_FIELDS, check_fields=False)
    @classmethod
    def _eink(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Canonical e-ink options with format eink (defaults filled in, so a spelt-out default is the
        same request); null otherwise: an option the chosen format would ignore is a mistake."""
        field = info.field_name
        if info.data.get("format") != EINK:
            if value is not None:
                raise RequestError(field, value, cls._allowed(field))
            return None
        option, panel = field.removeprefix("eink_"), info.data.get("eink_panel")
        if option != "panel" and panel is None:
            return value  # the panel was refused, and that is the error reported
        return eink_option(option, value, panel, field=field)

    def to_dict(self) -> dict[str, Any]:
        """Every field, normalised and JSON-ready: what a client sends.

        The e-ink options are left out unless the format is eink (they are null then), `control`
        unless the request has ControlNet guidance (then with its images, base64, and its defaults
        filled in), and an animation's engine and SVD fields unless its engine is svd, so every other
        request keeps the canonical form, cache key and file metadata it had before they existed.
        """
        return self._as_dict(canonical=False)

    def to_json(self) -> str:
        """to_dict as compact JSON: the text to send. It equals canonical_json() unless the request
        carries a client image (a control image, an svd animation's image), which only this text holds."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    def canonical_json(self) -> str:
        """The request as one canonical string: equal requests give equal text (cache keys, seeds).

        A client image (control, or an svd animation's) appears as the SHA-256 and size of its decoded
        bytes, so cache keys and the metadata embedded in files never carry the picture.
        """
        return json.dumps(
            self._as_dict(canonical=True), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )

    def _as_dict(self, *, canonical: bool) -> dict[str, Any]:
        exclude = {"control"} if self.format == EINK else {"control", *EINK_FIELDS}
        data = self.model_dump(mode="json", exclude=exclude)
        control: Control | None = getattr(self, "control", None)
        if control is not None:
            data["control"] = control.as_dict(canonical=canonical)
        return data

    def resolved_seed(self) -> int:
        """The seed, or one derived from the request so a repeated request gives the same result.

        The output choices are left out: the PNG and the WebP of one request show the same picture
        (the WebP and the GIF of one animation, with any poster frame, the same frames). So is
        `control`: guidance steers the scene's own noise, and a scale-0 request draws exactly its
        uncontrolled twin. An svd animation's image digest, engine and settings are in: the picture
        animated is the clip's content, not guidance of it.
        """
        if self.seed is not None:
            return self.seed
        picture = {
            k: v for k, v in self._as_dict(canonical=True).items() if k != "seed" and k not in SEEDLESS_FIELDS
        }
        text = json.dumps(picture, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        digest = hashlib.sha256(text.encode("utf-8"))
        return int.from_bytes(digest.digest()[:8], "big") & _SEED_MASK


# The field groups. pydantic orders a model's fields base by base starting from its LAST base, so a
# request lists its groups last-first; that order is the order errors are reported in.


class _Engine(_Request):
    # Checked (and its defaults filled in) by AnimationRequest's "before" validator, ahead of every
    # other field: it decides their ranges and defaults. Declared before the fields that read it.
    engine: str = ENGINES[0]


class _Subject(_Request):
    species: str
    scientific_name: str | None = None
    species_id: str | None = None
    family: str | None = None


class _Pose(_Request):
    pose: str = _DEFAULTS.pose


class _Behaviour(_Request):
    behaviour: str = _DEFAULTS.behaviour


class _Picture(_Request):
    """The look and the render settings; the size and steps defaults are an image's."""

    season: str = _DEFAULTS.season
    lighting: str = _DEFAULTS.lighting
    style: str = _DEFAULTS.style
    habitat: str | None = _DEFAULTS.habitat
    width: int = LIMITS.width.default
    height: int = LIMITS.height.default
    steps: int = LIMITS.steps.default
    seed: int | None = None


class _ImageFormat(_Request):
    format: str = LIMITS.default_format
    # With format eink: the panel (required), its palette, the dithering and the fit (names in
    # data/eink_panels.yaml); null with any other format. Validated after `format`, in this order.
    eink_panel: str | None = Field(default=None, validate_default=True)
    eink_palette: str | None = Field(default=None, validate_default=True)
    eink_dither: str | None = Field(default=None, validate_default=True)
    eink_fit: str | None = Field(default=None, validate_default=True)


class _Clip(_Request):
    duration_seconds: float = ANIMATION.duration_seconds.default
    fps: int = ANIMATION.fps.default
    format: str = ANIMATION.default_format
    # Which frame becomes the PNG poster (0 = the first); it picks an output, not the frames.
    poster_frame: int = 0


class _Overrides(_Request):
    prompt: str | None = None
    negative_prompt: str | None = None


class ControlSource(BaseModel):
    """One ControlNet kind of an image request, as validated: its source (a vocabulary pose to draw,
    or a client's base64 image with the SHA-256 and size of its bytes) and its settings, defaults
    filled in. Built by the request's `control` validator, which names each bad field."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    template: str | None = None
    image: str | None = Field(default=None, repr=False)  # up to ~11 MB of base64: kept out of reprs
    image_sha256: str | None = None
    image_bytes: int | None = None
    scale: float
    start: float
    end: float

    def as_dict(self, *, canonical: bool) -> dict[str, Any]:
        """The JSON form: the image itself, or (`canonical`) its digest and size; then the settings."""
        if self.template is not None:
            source: dict[str, Any] = {"template": self.template}
        elif canonical:
            source = {"image_sha256": self.image_sha256, "image_bytes": self.image_bytes}
        else:
            source = {"image": self.image}
        return {**source, "scale": self.scale, "start": self.start, "end": self.end}


class ClientImage(BaseModel):
    """A picture a client sent in a request (an svd animation's `image`), as validated: its base64
    text and the SHA-256 and size of the bytes it holds. Only the syntax and the byte count are
    checked here; the pipeline decodes the picture (birdgen.input_image) before any stage runs."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    text: str = Field(repr=False)  # up to ~11 MB of base64: kept out of reprs
    sha256: str
    nbytes: int

    def json_value(self, *, canonical: bool) -> str | dict[str, Any]:
        """The JSON form: the base64 text (what a client sends), or (`canonical`) the digest and size
        of its bytes, as a control image's: {"image_sha256", "image_bytes"}."""
        if canonical:
            return {"image_sha256": self.sha256, "image_bytes": self.nbytes}
        return self.text


class Control(BaseModel):
    """An image request's ControlNet guidance: one optional ControlSource per kind (CONTROLNET_KINDS)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    openpose: ControlSource | None = None
    depth: ControlSource | None = None

    def sources(self) -> list[tuple[str, ControlSource]]:
        """(kind, source) of each kind given, in CONTROLNET_KINDS order."""
        return [(kind, source) for kind in CONTROLNET_KINDS if (source := getattr(self, kind)) is not None]

    def as_dict(self, *, canonical: bool) -> dict[str, Any]:
        return {kind: source.as_dict(canonical=canonical) for kind, source in self.sources()}


if tuple(Control.model_fields) != CONTROLNET_KINDS:  # pragma: no cover - a contracts edit without this one
    raise RuntimeError(f"schema.Control's fields must be contracts.CONTROLNET_KINDS {CONTROLNET_KINDS}")

_CONTROL_SETTINGS = ("image", "template", "scale", "start", "end")
# What a client sends as an svd request's `image` (the JSON schema of the gateway's body): the text,
# not the ClientImage the schema makes of it.
_IMAGE_JSON_SCHEMA = {
    "anyOf": [{"type": "string", "contentEncoding": "base64"}, {"type": "null"}],
    "description": "a base64 PNG or JPEG picture to animate (engine svd); null draws the still",
}
_BASE64 = "base64 (standard alphabet, no line breaks)"


def _control_allowed(field: str) -> str:
    """What a `control` field accepts, in words (field: control, control.<kind> or control.<kind>.<key>)."""
    parts = field.split(".")
    if len(parts) == 1:
        return (
            f"null, or an object mapping ControlNet kinds ({', '.join(CONTROLNET_KINDS)}) to their "
            "settings {image or template, scale, start, end}"
        )
    kind = parts[1]
    if kind not in CONTROLNET_KINDS:
        return f"the ControlNet kinds {', '.join(CONTROLNET_KINDS)}, each at most once"
    limits, key = LIMITS.control, parts[2] if len(parts) > 2 else None
    if key is None:
        return (
            "null, or an object with exactly one of image (a base64 PNG or JPEG) or template (a pose: "
            f"{', '.join(VOCABULARY.allowed('pose'))}), and optionally scale, start and end"
        )
    if key == "image":
        return _base64_image_allowed("or null with a template")
    if key == "template":
        return f"a pose: {', '.join(VOCABULARY.allowed('pose'))}; or null with an image"
    if key == "scale":
        return f"{limits.scale.describe()}, or null for {limits.kinds[kind].scale_default:g}"
    if key == "start":
        return f"{limits.start.describe()} below end, or null for {limits.start.default:g}"
    if key == "end":
        return f"{limits.end.describe()} above start, or null for {limits.end.default:g}"
    return f"the fields {', '.join(_CONTROL_SETTINGS)}"


def _parse_control(value: object) -> Control | None:
    """The `control` field from what a client sent; RequestError naming the nested field else.

    Kinds match ignoring case and outer spaces; a kind given as null is absent, and a control with
    no kind left is null (the uncontrolled request)."""
    if value is None or isinstance(value, Control):
        return value
    if not isinstance(value, Mapping):
        raise RequestError("control", value, _control_allowed("control"))
    sources: dict[str, ControlSource] = {}
    for key, setting in value.items():
        kind = key.strip().lower() if isinstance(key, str) else None
        if kind not in CONTROLNET_KINDS or kind in sources:  # unknown, or twice ("depth", "Depth")
            raise RequestError(f"control.{_key(key)}", _short(setting), _control_allowed("control.*"))
        if setting is not None:
            sources[kind] = _control_source(kind, setting)
    return Control(**sources) if sources else None


def _control_source(kind: str, value: object) -> ControlSource:
    """One kind's settings, checked field by field (the source, then scale, start, end), defaults
    filled in. An empty image or template string means null, as for other optional strings."""
    prefix = f"control.{kind}"
    if isinstance(value, ControlSource):
        return value
    if not isinstance(value, Mapping):
        raise RequestError(prefix, _short(value), _control_allowed(prefix))
    for key in value:
        if key not in _CONTROL_SETTINGS:
            raise RequestError(f"{prefix}.{_key(key)}", _short(value[key]), _control_allowed(f"{prefix}.*"))
    image, template = (
        None if isinstance(v, str) and not v.strip() else v
        for v in (value.get("image"), value.get("template"))
    )
    if (image is None) == (template is None):
        raise RequestError(prefix, {k: _short(v) for k, v in value.items()}, _control_allowed(prefix))
    source: dict[str, Any]
    if template is not None:
        source = {"template": _control_template(prefix, template)}
    else:
        data = _control_image(prefix, image)
        source = {"image": image, "image_sha256": hashlib.sha256(data).hexdigest(), "image_bytes": len(data)}
    limits = LIMITS.control
    scale = _control_number(
        prefix, "scale", value.get("scale"), limits.kinds[kind].scale_default, limits.scale
    )
    start = _control_number(prefix, "start", value.get("start"), limits.start.default, limits.start)
    end = _control_number(prefix, "end", value.get("end"), limits.end.default, limits.end)
    if start >= end:  # name the one the client gave (end when both), with the other's value
        key, got, other = (
            ("end", end, f"start is {start:g}")
            if value.get("end") is not None
            else ("start", start, f"end is {end:g}")
        )
        field = f"{prefix}.{key}"
        raise RequestError(field, got, f"{_control_allowed(field)} (here {other})")
    return ControlSource(**source, scale=scale, start=start, end=end)


def _base64_image_allowed(otherwise: str) -> str:
    """What a client picture field (a control image, an svd request's image) accepts, in words:
    the input_image limits, then `otherwise` (what its null means)."""
    images = LIMITS.input_image
    formats = " or ".join(f.upper() for f in images.formats)
    return (
        f"{_BASE64} of a {formats} image of at most {images.max_bytes} bytes "
        f"({images.max_base64_chars} characters), {otherwise}"
    )


def _short(value: object) -> object:
    """A value to show in an error: long text (a base64 image) as its length, never the text."""
    return f"{len(value)} characters" if isinstance(value, str) and len(value) > 200 else value


def _key(key: object) -> str:
    """A client's unknown key, as part of a field name: at most 40 characters of it."""
    text = str(key)
    return text if len(text) <= 40 else text[:37] + "..."


def _control_number(prefix: str, key: str, value: object, default: float, limit: NumberRange) -> float:
    """A setting as a float (an int is accepted; bools, strings and NaN are not), null = `default`."""
    if value is None:
        return float(default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not limit.contains(value):
        raise RequestError(f"{prefix}.{key}", value, _control_allowed(f"{prefix}.{key}"))
    return float(value) + 0.0  # -0.0 becomes 0.0: one spelling, one cache key


def _control_template(prefix: str, value: object) -> str:
    """The canonical pose a template names (_pose), errors naming control.<kind>.template."""
    field = f"{prefix}.template"
    return _pose(field, value, _control_allowed(field))


def _pose(field: str, value: object, allowed: str) -> str:
    """The canonical pose `value` names (case, separators and pose aliases as for an image's `pose`):
    a control template's and an svd still's; RequestError naming `field`, with `allowed`, else."""
    pose = VOCABULARY.canonical("pose", value) if isinstance(value, str) else None
    if pose is None:
        raise RequestError(field, value, allowed)
    return pose


def _control_image(prefix: str, value: object) -> bytes:
    """The bytes a control image's base64 text holds (_base64_image), errors naming control.<kind>.image."""
    field = f"{prefix}.image"
    return _base64_image(field, value, _control_allowed(field))


def _base64_image(field: str, value: object, allowed: str) -> bytes:
    """The bytes a base64 image holds, checked for syntax and size only: the pipeline decodes the
    picture (input_image.decode_input_image_base64) before any stage runs. RequestError naming
    `field`, with `allowed`, else."""
    images = LIMITS.input_image
    if not isinstance(value, str):
        raise RequestError(field, value, allowed)
    if len(value) > images.max_base64_chars:
        raise RequestError(field, f"{len(value)} characters of base64", allowed)
    try:
        data = base64.b64decode(value, validate=True)
    except ValueError:  # binascii.Error, or text with non-ASCII characters
        raise RequestError(field, f"{len(value)} characters that are not base64", allowed) from None
    if not data or len(data) > images.max_bytes:
        raise RequestError(field, f"base64 of {len(data)} bytes", allowed)
    return data


class ImageRequest(_Overrides, _ImageFormat, _Picture, _Pose, _Subject):
    """One image to generate. Values are normalised on construction (stripped, canonical spelling).

    Case and spelling variants are accepted and stored canonically: "Perched" -> "perched",
    "Golden Hour" -> "golden-hour", "fall" -> "autumn" (vocabulary aliases), "passeriformes" ->
    "Passeriformes", "JPG" -> "jpeg". Empty optional strings mean null. Integers are strict: no
    bools, floats or numeric strings. Invalid input raises RequestError, never a pydantic error.
    Format eink needs `eink_panel`; the other e-ink options get their defaults filled in.

    `control` (optional) guides the picture with ControlNets: {kind: {image | template, scale,
    start, end}} (docs/controlnet.md). Errors name the nested field ("control.depth.scale").
    """

    # ControlNet guidance, per kind (contracts.CONTROLNET_KINDS); null = none. Declared last, so its
    # errors are reported after every other field's.
    control: Control | None = None

    @field_validator("control", mode="before")
    @classmethod
    def _control(cls, value: object) -> Control | None:
        return _parse_control(value)

    def control_settings(self) -> tuple[ControlSettings, ...]:
        """The request's ControlNets, resolved for the pipeline, in CONTROLNET_KINDS order (the
        order nets run and residuals are summed in); empty without control."""
        if self.control is None:
            return ()
        return tuple(
            ControlSettings(
                kind=kind,
                scale=source.scale,
                start=source.start,
                end=source.end,
                template=source.template,
                image=source.image,
                image_sha256=source.image_sha256,
                image_bytes=source.image_bytes,
            )
            for kind, source in self.control.sources()
        )

    def eink_source(self) -> ImageRequest:
        """The PNG request a format=eink request is rendered from: this one as format png without
        the e-ink options. Same picture (output choices keep the seed), and the same cache entry as
        a plain PNG request, so a cached PNG is rendered for the panel without generating it again."""
        return self.model_copy(update={"format": EINK_SOURCE_FORMAT, **dict.fromkeys(EINK_FIELDS)})


class AnimationRequest(_Overrides, _Clip, _Picture, _Behaviour, _Engine, _Subject):
    """One animation to generate: the image request's fields, with a behaviour (what the bird does:
    "flying", "feeding") in place of the pose, and a length; drawn by one of two engines.

    engine "animatediff" (the default): a motion module in the SDXL-Turbo UNet. Normalised and
    validated like ImageRequest, against the `animation` limits (smaller sizes, 4 steps by default,
    webp/gif/both). duration_seconds may be fractional (2.5) as long as duration × fps is a whole
    number of frames (2.5 s at 8 fps is 20), at most `max_frames`; an int duration is stored as a
    float, so 2 and 2.0 are one request.

    engine "svd" (Stable Video Diffusion, docs/svd.md): animates one still, the client's `image`
    (base64 PNG/JPEG) or, without one, the image still_request() draws (the shared fields and
    `pose`). Its length, fps and steps have the `svd` limits and defaults (14 frames at 7 fps, 25
    steps), and SVD's settings (motion_bucket_id, noise_aug_strength, min/max_guidance_scale,
    decode_chunk_size) get theirs when null. An svd request takes no `behaviour` (SVD has no prompt:
    motion_bucket_id sets how much it moves; the attribute keeps its default, left out of the
    canonical form); an animatediff request takes none of SVD_FIELDS (they stay null).
    """

    _limits: ClassVar[_OutputLimits] = ANIMATION

    # Same fields as an image's, with an animation's defaults (the position stays _Picture's).
    width: int = ANIMATION.width.default
    height: int = ANIMATION.height.default
    steps: int = ANIMATION.steps.default
    # SVD_FIELDS: null with animatediff; with svd, defaults filled in (an image stays null: drawn).
    image: Annotated[ClientImage | None, WithJsonSchema(_IMAGE_JSON_SCHEMA)] = Field(
        default=None, validate_default=True
    )
    pose: str | None = Field(default=None, validate_default=True)
    motion_bucket_id: int | None = Field(default=None, validate_default=True)
    noise_aug_strength: float | None = Field(default=None, validate_default=True)
    min_guidance_scale: float | None = Field(default=None, validate_default=True)
    max_guidance_scale: float | None = Field(default=None, validate_default=True)
    decode_chunk_size: int | None = Field(default=None, validate_default=True)

    @property
    def num_frames(self) -> int:
        """duration_seconds × fps, a whole number (validated)."""
        return round(self.duration_seconds * self.fps)

    @model_validator(mode="before")
    @classmethod
    def _engine_defaults(cls, data: Any) -> Any:
        """The engine first (canonical: any case, outer spaces; null = animatediff), then an svd
        clip's own defaults for what the client left out: fps, steps and duration_seconds."""
        if not isinstance(data, Mapping):
            return data
        engine = _canonical_engine(data.get("engine"))
        if engine is None:
            raise RequestError("engine", data.get("engine"), cls._allowed("engine"))
        data = {**data, "engine": engine}
        if engine == ENGINE_SVD:
            behaviour = data.pop("behaviour", None)
            if behaviour is not None:
                raise RequestError("behaviour", behaviour, cls._allowed("behaviour", engine))
            for field in ("fps", "steps", "duration_seconds"):
                data.setdefault(field, getattr(SVD, field).default)
        return data

    @classmethod
    def _engine_in(cls, data: Mapping[str, Any]) -> str | None:
        return _canonical_engine(data.get("engine"))

    @field_validator(*SVD_FIELDS, mode="before")
    @classmethod
    def _svd_field(cls, value: object, info: ValidationInfo) -> object:
        """An svd-only field: null with animatediff; with svd checked, and its default when null."""
        field, engine = info.field_name, info.data.get("engine")
        if engine != ENGINE_SVD:
            if value is None:
                return None
            raise RequestError(field, _short(value), cls._allowed(field, engine))
        if field == "image":
            return _client_image(value)
        if field == "pose":
            return _still_pose(value)
        return _svd_setting(field, value, info.data)

    @model_validator(mode="after")
    def _frames(self) -> AnimationRequest:
        _check_frames(self, SVD.max_frames if self.engine == ENGINE_SVD else ANIMATION.max_frames)
        chunk = self.decode_chunk_size
        if chunk is not None and chunk > self.num_frames:
            raise RequestError(
                "decode_chunk_size",
                chunk,
                f"{_svd_allowed('decode_chunk_size')} (this clip has {self.num_frames} frames)",
            )
        return self

    @classmethod
    def _allowed(cls, field: str, engine: str | None = None) -> str:
        if field == "engine":
            return f"{', '.join(ENGINES)} (any case), or null for {ENGINES[0]}"
        if engine == ENGINE_SVD and field in (*SVD_FIELDS, "fps", "steps", "duration_seconds", "behaviour"):
            return _svd_allowed(field)
        if field in SVD_FIELDS:
            return f"null with engine {ENGINE_ANIMATEDIFF}; with engine {ENGINE_SVD}: {_svd_allowed(field)}"
        return super()._allowed(field, engine)

    def _as_dict(self, *, canonical: bool) -> dict[str, Any]:
        """An animatediff request's fields exactly as before engines existed (no engine, no SVD
        fields), so its canonical JSON, cache key and seed are unchanged; an svd request's with the
        engine, the SVD fields and the image (its digest when `canonical`), without the behaviour."""
        if self.engine == ENGINE_ANIMATEDIFF:
            return self.model_dump(mode="json", exclude={"engine", *SVD_FIELDS})
        data = self.model_dump(mode="json", exclude={"behaviour", "image"})
        if self.image is not None:
            data["image"] = self.image.json_value(canonical=canonical)
        return data

    def still_request(self) -> ImageRequest | None:
        """The image an svd request animates when the client sent none: an ImageRequest of the
        shared fields (subject, look, prompt overrides), the clip's width and height and `pose`,
        the image's default steps, format png, and the request's explicit seed (or none: the image's
        own derived seed). It is the request that image came from, so a cached response serves it.
        None for an animatediff request or one with an `image`."""
        if self.engine != ENGINE_SVD or self.image is not None:
            return None
        shared = self.model_dump(
            include={
                "species",
                "scientific_name",
                "species_id",
                "family",
                "season",
                "lighting",
                "style",
                "habitat",
                "prompt",
                "negative_prompt",
                "width",
                "height",
                "pose",
                "seed",
            }
        )
        return ImageRequest(**shared, steps=LIMITS.steps.default, format="png")


def _canonical_engine(value: object) -> str | None:
    """The engine `value` names (any case, outer spaces), the default for null; None if none."""
    if value is None:
        return ENGINES[0]
    key = value.strip().lower() if isinstance(value, str) else None
    return key if key in ENGINES else None


def _svd_allowed(field: str) -> str:
    """What a field of an svd animation request accepts, in words."""
    if field in ("fps", "steps"):
        return getattr(SVD, field).describe()
    if field == "duration_seconds":
        return (
            f"{SVD.duration_seconds.describe()} seconds, with duration × fps a whole number of frames, "
            f"{SVD.min_frames}..{SVD.max_frames}"
        )
    if field == "behaviour":
        return (
            f"null with engine {ENGINE_SVD} (no prompt moves an SVD clip: motion_bucket_id sets how much "
            f"it moves); with engine {ENGINE_ANIMATEDIFF}: {', '.join(VOCABULARY.allowed('behaviour'))}"
        )
    if field == "image":
        return _base64_image_allowed("or null to draw the still from the request")
    if field == "pose":
        return (
            f"the drawn still's pose: {', '.join(VOCABULARY.allowed('pose'))}; or null for {_DEFAULTS.pose}"
        )
    limit = getattr(SVD, field)
    default = f"{limit.default:g}"
    if field == "min_guidance_scale":
        return f"{limit.describe()}, at most max_guidance_scale; or null for {default}"
    if field == "max_guidance_scale":
        return f"{limit.describe()}, at least min_guidance_scale; or null for {default}"
    if field == "decode_chunk_size":
        return f"{limit.describe()}, at most the clip's frames; or null for {default} (all frames if fewer)"
    return f"{limit.describe()}; or null for {default}"


def _client_image(value: object) -> ClientImage | None:
    """An svd request's `image`: base64 text checked for syntax and size; empty text means null."""
    if value is None or isinstance(value, ClientImage):
        return value
    if isinstance(value, str) and not value.strip():
        return None
    data = _base64_image("image", value, _svd_allowed("image"))
    return ClientImage(text=value, sha256=hashlib.sha256(data).hexdigest(), nbytes=len(data))


def _still_pose(value: object) -> str:
    """The drawn still's pose (case, separators and aliases as an image's), the image default for null."""
    return _DEFAULTS.pose if value is None else _pose("pose", value, _svd_allowed("pose"))


def _svd_setting(field: str, value: object, data: Mapping[str, Any]) -> int | float:
    """One of SVD_SETTINGS within its `svd` range (an integer for an IntRange; a float otherwise, an
    int accepted; never a bool, string or NaN), its default for null. decode_chunk_size defaults to
    at most the clip's frames; max_guidance_scale must not be below min_guidance_scale (validated
    before it), and the error names the one the client gave (max when both)."""
    limit: DefaultedRange | DefaultedNumberRange = getattr(SVD, field)
    whole = isinstance(limit, IntRange)
    if value is None:
        number: int | float = limit.default
        frames = _frame_count_of(data)
        if field == "decode_chunk_size" and frames is not None:
            number = min(number, frames)
    elif isinstance(value, bool) or not isinstance(value, int if whole else int | float):
        raise RequestError(field, value, _svd_allowed(field))
    elif limit.contains(value):  # False for NaN
        number = value
    else:
        raise RequestError(field, value, _svd_allowed(field))
    if field == "max_guidance_scale":
        low = data.get("min_guidance_scale")
        if low is not None and low > number:
            named, got, other = (
                (field, number, f"min_guidance_scale is {low:g}")
                if value is not None
                else ("min_guidance_scale", low, f"max_guidance_scale is {number:g}")
            )
            raise RequestError(named, got, f"{_svd_allowed(named)} (here {other})")
    return number if whole else float(number) + 0.0  # -0.0 becomes 0.0: one spelling, one cache key


def _frame_count_of(data: Mapping[str, Any]) -> int | None:
    """The frame count of validated fields (duration_seconds, fps), or None while either is invalid."""
    duration, fps = data.get("duration_seconds"), data.get("fps")
    return None if duration is None or fps is None else _frame_count(duration, fps)


def eink_option(option: str, value: object, panel: str | None = None, *, field: str | None = None) -> str:
    """The canonical name of an e-ink `option` (panel, palette, dither or fit), matched ignoring case
    and outer spaces; None picks the default (dither, fit: the first listed; a palette: `panel`'s
    first). Raises RequestError naming `field` (default: the option) and the names allowed.

    The one check of e-ink names: birdgen.eink.render_eink and the request's eink_* fields use it.
    """
    names, note = _eink_names(option, panel)
    if value is None and option != "panel":
        return names[0]
    key = value.strip().lower() if isinstance(value, str) else None
    if key not in names:
        raise RequestError(field or option, MISSING if value is None else value, ", ".join(names) + note)
    return key


def _eink_names(option: str, panel: str | None) -> tuple[list[str], str]:
    """The names `option` accepts (a palette: those of `panel`, all when None) and a note on them."""
    if option == "panel":
        return list(EINK_PRESETS.panels), ""
    if option == "palette":
        if panel is None:
            return list(EINK_PRESETS.palettes), " (those of the panel), or null for the panel's first"
        palettes = EINK_PRESETS.panels[panel].palettes
        return palettes, f" (the palettes of panel {panel}), or null for {palettes[0]}"
    names = list(DITHERS if option == "dither" else FITS)
    return names, f", or null for {names[0]}"


def _check_frames(request: AnimationRequest, max_frames: int) -> None:
    """A whole number of frames, at least the engine's minimum (svd: svd.min_frames) and at most
    `max_frames`, and a poster among them; else a RequestError."""
    duration, fps = request.duration_seconds, request.fps
    svd = request.engine == ENGINE_SVD
    frames = _frame_count(duration, fps)
    if frames is None:
        limits = SVD if svd else ANIMATION
        raise RequestError(
            "duration_seconds",
            duration,
            f"{limits.duration_seconds.describe()} seconds making a whole number of frames "
            f"(duration × fps): at {fps} fps, a multiple of 1/{fps} s",
        )
    if svd and frames < SVD.min_frames:
        raise RequestError(
            "duration_seconds",
            duration,
            f"at least {SVD.min_frames} frames with engine {ENGINE_SVD}: duration × fps ≥ {SVD.min_frames}",
        )
    if frames > max_frames:
        raise RequestError(
            "duration_seconds",
            duration,
            f"at most {max_frames} frames: duration × fps ≤ {max_frames} "
            f"(at {fps} fps, at most {max_frames / fps:g} s)",
        )
    if not 0 <= request.poster_frame < frames:
        raise RequestError(
            "poster_frame", request.poster_frame, f"0..{frames - 1} (this clip has {frames} frames)"
        )


def _request_error(
    exc: ValidationError, request_type: type[_Request], data: Mapping[str, Any]
) -> RequestError:
    """The first problem pydantic found, as a RequestError naming field, value and what is allowed
    (for the engine the request's `data` names: an svd clip's ranges are its own)."""
    err = exc.errors()[0]
    field = str(err["loc"][0]) if err["loc"] else "request"
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, RequestError):
        return cause
    engine = request_type._engine_in(data)
    if err["type"] == "missing":
        return RequestError(field, MISSING, request_type._allowed(field, engine))
    return RequestError(field, err.get("input"), request_type._allowed(field, engine))


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise RequestError(key, value, "each field at most once")
        result[key] = value
    return result


def _request_fields(data: Mapping[str, Any] | str | bytes, request_type: type[_Request]) -> Mapping[str, Any]:
    """The fields of a request given as a mapping or JSON text, checked to be an object of names."""
    if isinstance(data, str | bytes | bytearray):
        try:
            data = json.loads(data, object_pairs_hook=_reject_duplicates)
        except RequestError:
            raise
        except (ValueError, RecursionError) as exc:
            raise RequestError("request", data, f"a JSON object of request fields ({exc})") from None
    if not isinstance(data, Mapping):
        raise RequestError("request", data, f"a JSON object with {request_type._allowed('request')}")
    for key in data:
        if not isinstance(key, str):
            raise RequestError("request", key, f"string keys naming {request_type._allowed('request')}")
    return data


def parse_image_request(data: Mapping[str, Any] | str | bytes | ImageRequest) -> ImageRequest:
    """An ImageRequest from a mapping or JSON text; raises RequestError for the first problem.

    Unknown fields are reported before anything else (usually a typo), then fields in declaration
    order. Invalid JSON or a non-object is reported for the field "request".
    """
    if isinstance(data, ImageRequest):
        return data
    return ImageRequest(**_request_fields(data, ImageRequest))


def parse_animation_request(
    data: Mapping[str, Any] | str | bytes | AnimationRequest, *, max_frames: int | None = None
) -> AnimationRequest:
    """An AnimationRequest from a mapping or JSON text; raises RequestError for the first problem.

    Problems are reported as by parse_image_request. `max_frames` lowers the frame cap of
    limits.yaml (a server with less GPU memory); a longer request is refused for duration_seconds
    just as the bundled cap refuses it.
    """
    request = (
        data
        if isinstance(data, AnimationRequest)
        else AnimationRequest(**_request_fields(data, AnimationRequest))
    )
    if max_frames is not None:
        _check_frames(request, max_frames)
    return request
