"""The bundled species catalogue: which family group, and so which LoRA, draws a species.

A family group is a bird order (Passeriformes, Charadriiformes, ...): big enough for one LoRA's
worth of licensed photos, close enough in shape to share one. A request may name its `family`
itself; otherwise the species is looked up here by species id, scientific name or common name, and
a species the catalogue does not know is drawn by the base UNet. Everything lives in
`data/catalogue.yaml`, validated at load; no torch here, so the client, the gateway and the Triton
models resolve a species the same way. docs/families.md says which groups and why.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from birdgen.prompts import DATA_DIR, load_data_file

DEFAULT_CATALOGUE = DATA_DIR / "catalogue.yaml"
MIN_PRIORITY_GROUPS = 5

_GROUP = re.compile(r"^[A-Z][a-z]+formes$")
_FAMILY = re.compile(r"^[A-Z][a-z]+idae$")
_SPECIES_ID = re.compile(r"^[a-z][a-z0-9]{2,11}$")  # eBird species codes: amerob, eurrob1, y00678
_BINOMIAL = re.compile(r"^[A-Z][a-z]+ [a-z]+(-[a-z]+)?$")
_NOT_ALNUM = re.compile(r"[\W_]+")

GroupSource = Literal["request", "catalogue", "unknown"]


@dataclass(frozen=True)
class Species:
    species_id: str
    common_name: str
    scientific_name: str
    group: str  # the family group (order) whose LoRA draws it
    family: str  # the taxonomic family (Turdidae), for people reading the catalogue
    aliases: tuple[str, ...] = ()  # other common names in use (IOC, British)


@dataclass(frozen=True)
class FamilyGroup:
    name: str
    lora_priority: bool
    rationale: str


class GroupRequest(Protocol):
    """What `resolve_group` reads from a request (an ImageRequest fits)."""

    species: str
    scientific_name: str | None
    species_id: str | None
    family: str | None


def _id_key(value: str) -> str:
    return value.strip().casefold()


def _scientific_key(value: str) -> str:
    return " ".join(value.split()).casefold()


def _common_key(value: str) -> str:
    """Common names match ignoring case, spaces, hyphens and apostrophes, and grey = gray."""
    return _NOT_ALNUM.sub("", value.casefold().replace("grey", "gray"))


def _tidy(name: str) -> str:
    if not _common_key(name) or name != " ".join(name.split()):
        raise ValueError(f"{name!r} must be a non-empty name without extra spaces")
    return name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class _GroupEntry(_Strict):
    lora_priority: bool
    rationale: str = Field(min_length=1)

    @field_validator("rationale")
    @classmethod
    def _says_something(cls, rationale: str) -> str:
        if not rationale.strip():
            raise ValueError("rationale must say why this group (one line)")
        return rationale.strip()


class _SpeciesEntry(_Strict):
    common: str
    scientific: str
    also: list[str] = Field(default_factory=list)

    @field_validator("common")
    @classmethod
    def _tidy_name(cls, name: str) -> str:
        return _tidy(name)

    @field_validator("also")
    @classmethod
    def _tidy_names(cls, names: list[str]) -> list[str]:
        return [_tidy(name) for name in names]

    @field_validator("scientific")
    @classmethod
    def _binomial(cls, name: str) -> str:
        if not _BINOMIAL.match(name):
            raise ValueError(f"{name!r} is not a binomial like 'Turdus migratorius'")
        return name


class CatalogueFile(_Strict):
    """The validated catalogue.yaml: groups, then species by group -> family -> species id."""

    groups: dict[str, _GroupEntry] = Field(min_length=1)
    species: dict[str, dict[str, dict[str, _SpeciesEntry]]]

    @field_validator("groups")
    @classmethod
    def _group_names(cls, groups: dict[str, _GroupEntry]) -> dict[str, _GroupEntry]:
        seen: dict[str, str] = {}
        for name in groups:
            if not _GROUP.match(name):
                raise ValueError(f"group {name!r} is not an order name like 'Passeriformes'")
            if name.casefold() in seen:
                raise ValueError(f"group {name!r} repeats {seen[name.casefold()]!r} (groups ignore case)")
            seen[name.casefold()] = name
        priority = [name for name, group in groups.items() if group.lora_priority]
        if len(priority) < MIN_PRIORITY_GROUPS:
            raise ValueError(
                f"at least {MIN_PRIORITY_GROUPS} groups need lora_priority: true, got {len(priority)}: "
                f"{', '.join(priority) or 'none'}"
            )
        return groups

    @model_validator(mode="after")
    def _consistent(self) -> CatalogueFile:
        group_of_family: dict[str, str] = {}
        first_seen: dict[tuple[str, str], str] = {}  # (kind, key) -> where it was first seen
        for group, families in self.species.items():
            if group not in self.groups:
                raise ValueError(f"species.{group}: unknown group; allowed: {', '.join(self.groups)}")
            for family, entries in families.items():
                where = f"species.{group}.{family}"
                if not _FAMILY.match(family):
                    raise ValueError(f"{where}: not a family name like 'Turdidae'")
                if group_of_family.setdefault(family, group) != group:
                    raise ValueError(f"{where}: family already listed under {group_of_family[family]}")
                for species_id, entry in entries.items():
                    here = f"{where}.{species_id}"
                    if not _SPECIES_ID.match(species_id):
                        raise ValueError(f"{here}: species id must be an eBird-style code like 'amerob'")
                    names = [
                        ("species id", species_id, _id_key(species_id)),
                        ("scientific name", entry.scientific, _scientific_key(entry.scientific)),
                        *(("common name", n, _common_key(n)) for n in (entry.common, *entry.also)),
                    ]
                    own: set[tuple[str, str]] = set()
                    for kind, name, key in names:
                        if (kind, key) in own:
                            raise ValueError(f"{here}: {kind} {name!r} repeats one of its own names")
                        own.add((kind, key))
                        other = first_seen.setdefault((kind, key), here)
                        if other != here:
                            raise ValueError(f"{here}: {kind} {name!r} is already used by {other}")
        return self


class Catalogue:
    """Family groups and species, with the lookups a request needs. Build with `Catalogue.load`."""

    def __init__(self, data: CatalogueFile) -> None:
        self.groups: Mapping[str, FamilyGroup] = MappingProxyType(
            {name: FamilyGroup(name, g.lora_priority, g.rationale) for name, g in data.groups.items()}
        )
        self.species: tuple[Species, ...] = tuple(
            Species(species_id, entry.common, entry.scientific, group, family, tuple(entry.also))
            for group, families in data.species.items()
            for family, entries in families.items()
            for species_id, entry in entries.items()
        )
        self._group_keys = {name.casefold(): name for name in self.groups}
        self._by_id = {_id_key(s.species_id): s for s in self.species}
        self._by_scientific = {_scientific_key(s.scientific_name): s for s in self.species}
        self._by_common = {_common_key(name): s for s in self.species for name in (s.common_name, *s.aliases)}

    @classmethod
    def load(cls, path: Path | None = None) -> Catalogue:
        """The catalogue from `path`, or the bundled one (read once per process)."""
        return _load_default() if path is None else cls(load_data_file(path, CatalogueFile))

    def canonical_group(self, value: str) -> str | None:
        """The group `value` names, in canonical spelling ("passeriformes" -> "Passeriformes")."""
        return self._group_keys.get(value.strip().casefold())

    def lookup(
        self,
        *,
        species_id: str | None = None,
        scientific_name: str | None = None,
        common_name: str | None = None,
    ) -> Species | None:
        """The species by id, else by scientific name, else by common name (or an alias); or None.

        Ids and scientific names ignore case and extra spaces; common names also ignore hyphens and
        apostrophes and read "grey" as "gray" ("coopers hawk", "Grey Heron" both match).
        """
        for index, key, value in (
            (self._by_id, _id_key, species_id),
            (self._by_scientific, _scientific_key, scientific_name),
            (self._by_common, _common_key, common_name),
        ):
            found = index.get(key(value)) if value else None
            if found is not None:
                return found
        return None

    def resolve_group(self, request: GroupRequest) -> tuple[str | None, GroupSource]:
        """The group that draws `request` and where it came from.

        The request's own `family` wins ("request"); else the catalogue's group for its species
        ("catalogue"); else (None, "unknown"), which the base UNet draws.
        """
        if request.family:
            group = self.canonical_group(request.family)
            if group is None:
                raise ValueError(
                    f"invalid 'family': got {request.family!r}; allowed: {', '.join(self.groups)}"
                )
            return group, "request"
        species = self.lookup(
            species_id=request.species_id,
            scientific_name=request.scientific_name,
            common_name=request.species,
        )
        return (species.group, "catalogue") if species else (None, "unknown")

    def priority_groups(self) -> list[str]:
        """The groups that get a LoRA first, in file order."""
        return [name for name, group in self.groups.items() if group.lora_priority]


@functools.cache
def _load_default() -> Catalogue:
    return Catalogue(load_data_file(DEFAULT_CATALOGUE, CatalogueFile))
