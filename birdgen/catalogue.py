"""The bundled species catalogue: which family, and so which LoRA, draws a species.

Words (one per concept, used everywhere in birdgen): a **family** is what a request's `family` field,
a `--lora FAMILY=...`, a training `--family` and a `unet_<family>` model name mean: a bird order
(Passeriformes, Charadriiformes, ...), big enough for one LoRA's worth of licensed photos, close
enough in shape to share one. The taxonomic family of a species (Turdidae) is its
`taxonomic_family`, kept for the people reading the catalogue and for photo rows that give one.

`Catalogue.family` is the one resolver of a family name: every caller gets the canonical spelling or
the same `UnknownFamilyError`. A request without a family is looked up here by species id, scientific
name or common name (`family_for`); a species the catalogue does not know is drawn by the base UNet.
Everything lives in `data/catalogue.yaml`, validated at load; no torch here, so the client, the
gateway and the Triton models resolve a species the same way. docs/families.md says which families
and why.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from birdgen.prompts import DATA_DIR, load_data_file
from birdgen.request_error import RequestError

DEFAULT_CATALOGUE = DATA_DIR / "catalogue.yaml"
MIN_PRIORITY_FAMILIES = 5

_ORDER = re.compile(r"^[A-Z][a-z]+formes$")
_TAXONOMIC_FAMILY = re.compile(r"^[A-Z][a-z]+idae$")
_SPECIES_ID = re.compile(r"^[a-z][a-z0-9]{2,11}$")  # eBird species codes: amerob, eurrob1, y00678
_BINOMIAL = re.compile(r"^[A-Z][a-z]+ [a-z]+(-[a-z]+)?$")
_NOT_ALNUM = re.compile(r"[\W_]+")

FamilySource = Literal["request", "catalogue", "unknown"]


@dataclass(frozen=True)
class Species:
    species_id: str
    common_name: str
    scientific_name: str
    family: str  # the family (an order) whose LoRA draws it
    taxonomic_family: str  # Turdidae: for people reading the catalogue, and photo rows that give it
    aliases: tuple[str, ...] = ()  # other common names in use (IOC, British)


@dataclass(frozen=True)
class Family:
    name: str
    lora_priority: bool
    rationale: str


class FamilyRequest(Protocol):
    """What `family_for` reads from a request (an ImageRequest fits)."""

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


class _FamilyEntry(_Strict):
    lora_priority: bool
    rationale: str = Field(min_length=1)

    @field_validator("rationale")
    @classmethod
    def _says_something(cls, rationale: str) -> str:
        if not rationale.strip():
            raise ValueError("rationale must say why this family (one line)")
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
    """The validated catalogue.yaml: families, then species by family -> taxonomic family -> species id."""

    families: dict[str, _FamilyEntry] = Field(min_length=1)
    species: dict[str, dict[str, dict[str, _SpeciesEntry]]]

    @field_validator("families")
    @classmethod
    def _family_names(cls, families: dict[str, _FamilyEntry]) -> dict[str, _FamilyEntry]:
        seen: dict[str, str] = {}
        for name in families:
            if not _ORDER.match(name):
                raise ValueError(f"family {name!r} is not an order name like 'Passeriformes'")
            if name.casefold() in seen:
                raise ValueError(f"family {name!r} repeats {seen[name.casefold()]!r} (families ignore case)")
            seen[name.casefold()] = name
        priority = [name for name, family in families.items() if family.lora_priority]
        if len(priority) < MIN_PRIORITY_FAMILIES:
            raise ValueError(
                f"at least {MIN_PRIORITY_FAMILIES} families need lora_priority: true, got {len(priority)}: "
                f"{', '.join(priority) or 'none'}"
            )
        return families

    @model_validator(mode="after")
    def _consistent(self) -> CatalogueFile:
        family_of_taxon: dict[str, str] = {}
        first_seen: dict[tuple[str, str], str] = {}  # (kind, key) -> where it was first seen
        for family, taxa in self.species.items():
            if family not in self.families:
                raise ValueError(f"species.{family}: unknown family; allowed: {', '.join(self.families)}")
            for taxon, entries in taxa.items():
                where = f"species.{family}.{taxon}"
                if not _TAXONOMIC_FAMILY.match(taxon):
                    raise ValueError(f"{where}: not a taxonomic family name like 'Turdidae'")
                if family_of_taxon.setdefault(taxon, family) != family:
                    raise ValueError(
                        f"{where}: taxonomic family already listed under {family_of_taxon[taxon]}"
                    )
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


class UnknownFamilyError(RequestError):
    """A name that is no family: the one error for a request's `family`, `--lora`, and training."""

    def __init__(self, value: object, families: Iterable[str]) -> None:
        super().__init__("family", value, ", ".join(families))


class Catalogue:
    """Families and species, with the lookups a request needs. Build with `Catalogue.load`."""

    def __init__(self, data: CatalogueFile) -> None:
        self.families: Mapping[str, Family] = MappingProxyType(
            {name: Family(name, f.lora_priority, f.rationale) for name, f in data.families.items()}
        )
        self.species: tuple[Species, ...] = tuple(
            Species(species_id, entry.common, entry.scientific, family, taxon, tuple(entry.also))
            for family, taxa in data.species.items()
            for taxon, entries in taxa.items()
            for species_id, entry in entries.items()
        )
        self._family_keys = {name.casefold(): name for name in self.families}
        self._family_of_taxon = {s.taxonomic_family.casefold(): s.family for s in self.species}
        self._by_id = {_id_key(s.species_id): s for s in self.species}
        self._by_scientific = {_scientific_key(s.scientific_name): s for s in self.species}
        self._by_common = {_common_key(name): s for s in self.species for name in (s.common_name, *s.aliases)}

    @classmethod
    def load(cls, path: Path | None = None) -> Catalogue:
        """The catalogue from `path`, or the bundled one (read once per process)."""
        return _load_default() if path is None else cls(load_data_file(path, CatalogueFile))

    def family(self, name: str, *, taxonomic: bool = False) -> str:
        """The family `name` names, in canonical spelling ("passeriformes" -> "Passeriformes").

        `taxonomic=True` also accepts a taxonomic family the catalogue lists ("Turdidae" ->
        "Passeriformes"): photo rows give either. Raises UnknownFamilyError for anything else.
        """
        key = name.strip().casefold()
        found = self._family_keys.get(key) or (self._family_of_taxon.get(key) if taxonomic else None)
        if found is None:
            raise UnknownFamilyError(name, self.families)
        return found

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

    def family_for(self, request: FamilyRequest) -> tuple[str | None, FamilySource]:
        """The family that draws `request` and where it came from.

        The request's own `family` wins ("request"); else the catalogue's family for its species
        ("catalogue"); else (None, "unknown"), which the base UNet draws.
        """
        if request.family:
            return self.family(request.family), "request"
        species = self.lookup(
            species_id=request.species_id,
            scientific_name=request.scientific_name,
            common_name=request.species,
        )
        return (species.family, "catalogue") if species else (None, "unknown")

    def priority_families(self) -> list[str]:
        """The families that get a LoRA first, in file order."""
        return [name for name, family in self.families.items() if family.lora_priority]


@functools.cache
def _load_default() -> Catalogue:
    return Catalogue(load_data_file(DEFAULT_CATALOGUE, CatalogueFile))
