"""The data-driven prompt template library: request fields in, (prompt, negative prompt) out.

Every word lives in `data/vocabulary.yaml`; this module only validates that file and fills its
templates, so adding a pose or a style is a data change with no code change. No torch here: the
client, the gateway and the Triton tokenizer model all build prompts the same way.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DATA_DIR = Path(__file__).parent / "data"
DEFAULT_VOCABULARY = DATA_DIR / "vocabulary.yaml"

# Request field -> library section; also the fields `allowed` answers for.
FIELDS = {
    "pose": "poses",
    "season": "seasons",
    "lighting": "lightings",
    "style": "styles",
    "habitat": "habitats",
    "behaviour": "behaviours",
}
PLACEHOLDERS = frozenset({"quality", "subject", "pose", "season", "habitat", "lighting"})
REQUIRED_SEASONS = ("spring", "summer", "autumn", "winter", "breeding", "non-breeding")
_KEY = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_SEPARATORS = re.compile(r"[\s_-]+")

M = TypeVar("M", bound=BaseModel)


class DataFileError(ValueError):
    """A bundled data file is unreadable or invalid; the message names the file and the bad entry."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (plain YAML silently keeps the last one)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, Hashable):
            continue  # construct_mapping reports unhashable keys itself
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def load_data_file(path: Path, model: type[M]) -> M:
    """Read a YAML data file into `model`, raising DataFileError that names the file and entry.

    Shared by every bundled data file (vocabulary, limits, ...) so all of them fail the same way.
    """
    try:
        with open(path, encoding="utf-8") as stream:
            raw = yaml.load(stream, Loader=_UniqueKeyLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DataFileError(f"{path}: {exc}") from exc
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '<top level>'}: {e.get('ctx', {}).get('error') or e['msg']}"
            for e in exc.errors()
        )
        raise DataFileError(f"{path}: {problems}") from exc


def normalise_key(value: str) -> str:
    """Vocabulary values compare ignoring case and separators: "Golden Hour" -> "golden-hour"."""
    return _SEPARATORS.sub("-", value.strip().casefold()).strip("-")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Style(_Strict):
    """One rendering style: its positive template and the negative terms it adds."""

    template: str = Field(min_length=1)
    negative: list[str] = Field(default_factory=list)

    @field_validator("template")
    @classmethod
    def _known_placeholders(cls, template: str) -> str:
        names = set()
        for _, name, spec, conversion in string.Formatter().parse(template):
            if name is None:
                continue
            if name not in PLACEHOLDERS or spec or conversion:
                raise ValueError(
                    f"unknown placeholder {{{name}}}; allowed: {', '.join(sorted(PLACEHOLDERS))}"
                )
            names.add(name)
        if "subject" not in names:
            raise ValueError("template must contain {subject}")
        return template

    @field_validator("negative")
    @classmethod
    def _non_empty_terms(cls, terms: list[str]) -> list[str]:
        if any(not t.strip() for t in terms):
            raise ValueError("negative terms must be non-empty")
        return terms


class Defaults(_Strict):
    pose: str
    season: str
    lighting: str
    style: str
    habitat: str | None = None
    behaviour: str


class ExampleSpecies(_Strict):
    common: str = Field(min_length=1)
    scientific: str = Field(min_length=1)
    family: str = Field(min_length=1)


@dataclass(frozen=True)
class Prompt:
    text: str
    negative: str


class _DescribedRequest(Protocol):
    """The fields `build` reads from every request."""

    species: str
    scientific_name: str | None
    season: str
    lighting: str
    style: str
    habitat: str | None
    prompt: str | None
    negative_prompt: str | None


class PromptRequest(_DescribedRequest, Protocol):
    """What `build` reads from an image request (an ImageRequest fits; so does any object with these)."""

    pose: str


class AnimationPromptRequest(_DescribedRequest, Protocol):
    """What `build` reads from an animation request: a behaviour (motion) where an image has a pose."""

    behaviour: str


class PromptLibrary(_Strict):
    """The validated vocabulary.yaml, with lookups and the prompt builder."""

    quality: list[str] = Field(min_length=1)
    negative: list[str] = Field(min_length=1)
    styles: dict[str, Style] = Field(min_length=1)
    poses: dict[str, str] = Field(min_length=8)
    seasons: dict[str, str]
    lightings: dict[str, str] = Field(min_length=6)
    habitats: dict[str, str] = Field(default_factory=dict)
    behaviours: dict[str, str] = Field(min_length=1)
    aliases: dict[str, dict[str, str]] = Field(default_factory=dict)
    defaults: Defaults
    example_species: list[ExampleSpecies] = Field(min_length=20)

    @field_validator("quality", "negative")
    @classmethod
    def _non_empty_words(cls, words: list[str]) -> list[str]:
        if any(not w.strip() for w in words):
            raise ValueError("entries must be non-empty")
        return words

    @field_validator("styles", "poses", "seasons", "lightings", "habitats", "behaviours")
    @classmethod
    def _keys_and_phrases(cls, entries: dict[str, Any]) -> dict[str, Any]:
        for key, phrase in entries.items():
            if not _KEY.match(key):
                raise ValueError(f"key {key!r} must be lower-case words joined by '-' (e.g. 'golden-hour')")
            if isinstance(phrase, str) and not phrase.strip():
                raise ValueError(f"{key!r} has an empty phrase")
        return entries

    @field_validator("seasons")
    @classmethod
    def _all_seasons(cls, seasons: dict[str, str]) -> dict[str, str]:
        missing = [s for s in REQUIRED_SEASONS if s not in seasons]
        if missing:
            raise ValueError(f"missing seasons: {', '.join(missing)}")
        return seasons

    @model_validator(mode="after")
    def _references_exist(self) -> PromptLibrary:
        for field in FIELDS:
            value = getattr(self.defaults, field)
            if (value is not None or field != "habitat") and value not in self._section(field):
                raise ValueError(
                    f"defaults.{field}: {value!r} is not one of {', '.join(self._section(field))}"
                )
        for field, table in self.aliases.items():
            if field not in FIELDS:
                raise ValueError(f"aliases.{field}: not a request field; allowed: {', '.join(FIELDS)}")
            for alias, target in table.items():
                if alias != normalise_key(alias) or alias in self._section(field):
                    raise ValueError(
                        f"aliases.{field}.{alias}: must be a normalised key that is not an entry"
                    )
                if target not in self._section(field):
                    raise ValueError(f"aliases.{field}.{alias}: {target!r} is not one of the {FIELDS[field]}")
        return self

    @classmethod
    def load(cls, path: Path | None = None) -> PromptLibrary:
        """The library from `path`, or the bundled one (read once per process)."""
        return _load_default() if path is None else load_data_file(path, cls)

    def _section(self, field: str) -> Mapping[str, Any]:
        if field not in FIELDS:
            raise ValueError(f"unknown vocabulary field {field!r}; allowed: {', '.join(FIELDS)}")
        return getattr(self, FIELDS[field])

    def allowed(self, field: str) -> list[str]:
        """The canonical values of `field` (one of pose, season, lighting, style, habitat, behaviour)."""
        return list(self._section(field))

    def canonical(self, field: str, value: str) -> str | None:
        """The canonical key `value` names (ignoring case, separators; aliases resolved), or None."""
        key = normalise_key(value)
        if key in self._section(field):
            return key
        return self.aliases.get(field, {}).get(key)

    def _lookup(self, field: str, value: str) -> str:
        key = self.canonical(field, value)
        if key is None:
            raise ValueError(f"invalid {field!r}: got {value!r}; allowed: {', '.join(self.allowed(field))}")
        return key

    def build(self, request: PromptRequest | AnimationPromptRequest) -> Prompt:
        """The positive and negative prompt for `request`; its expert overrides win when given.

        An animation request's behaviour takes the pose's place in the template: the clip shows the
        bird doing something, so its phrase describes motion ("flapping its wings in flight").
        """
        style = self.styles[self._lookup("style", request.style)]
        negative = request.negative_prompt or ", ".join(dict.fromkeys([*self.negative, *style.negative]))
        if request.prompt:
            return Prompt(text=request.prompt, negative=negative)
        subject = (
            request.species
            if not request.scientific_name
            else f"{request.species} ({request.scientific_name})"
        )
        values = {
            "quality": ", ".join(self.quality),
            "subject": f"{_article(request.species)} {subject}",
            "pose": self._action(request),
            "season": self.seasons[self._lookup("season", request.season)],
            "lighting": self.lightings[self._lookup("lighting", request.lighting)],
            "habitat": self.habitats[self._lookup("habitat", request.habitat)] if request.habitat else "",
        }
        parts = []
        for part in style.template.split(","):
            names = [name for _, name, _, _ in string.Formatter().parse(part) if name]
            if all(values[name] for name in names):
                parts.append(part.strip().format_map(values))
        return Prompt(text=", ".join(p for p in parts if p), negative=negative)

    def _action(self, request: PromptRequest | AnimationPromptRequest) -> str:
        """The behaviour's phrase when the request has one (an animation), else the pose's."""
        behaviour = getattr(request, "behaviour", None)
        if behaviour:
            return self.behaviours[self._lookup("behaviour", behaviour)]
        return self.poses[self._lookup("pose", request.pose)]  # type: ignore[union-attr]

    def corpus(self) -> str:
        """All library text plus the example species names: what the tiny model's BPE learns from."""
        lines = [*self.quality, *self.negative]
        for style in self.styles.values():
            lines.extend(part for part in re.sub(r"\{\w+\}", "", style.template).split(",") if part.strip())
            lines.extend(style.negative)
        for section in (self.poses, self.behaviours, self.seasons, self.lightings, self.habitats):
            lines.extend(section.values())
        lines.extend(f"{s.common} ({s.scientific})" for s in self.example_species)
        return "\n".join(" ".join(line.split()) for line in lines)


@functools.cache
def _load_default() -> PromptLibrary:
    return load_data_file(DEFAULT_VOCABULARY, PromptLibrary)


def _article(name: str) -> str:
    """'a' or 'an' by sound, close enough for bird names ("an Eastern Bluebird", "a European Robin")."""
    word = name.strip().casefold()
    if word.startswith(("eu", "uni", "one", "ura", "ure", "uro")):
        return "a"
    return "an" if word[:1] in set("aeiou") else "a"
