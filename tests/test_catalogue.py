"""The species catalogue: lookups by every key and spelling, family resolution, bad data failing loudly."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from birdgen.catalogue import DEFAULT_CATALOGUE, Catalogue, Species, UnknownFamilyError
from birdgen.prompts import DataFileError, PromptLibrary
from birdgen.schema import CATALOGUE, ImageRequest, RequestError

DOCS = Path(__file__).parent.parent / "docs" / "families.md"


@pytest.fixture(scope="module")
def cat() -> Catalogue:
    return Catalogue.load()


@dataclass(frozen=True)
class Req:
    """A duck-typed request: `family_for` must not need an ImageRequest."""

    species: str = "Dodo"
    scientific_name: str | None = None
    species_id: str | None = None
    family: str | None = None


def test_bundled_catalogue_covers_the_priority_families_and_hundreds_of_species(cat: Catalogue) -> None:
    assert Catalogue.load() is cat is CATALOGUE
    assert len(cat.species) >= 300
    priority = cat.priority_families()
    assert len(priority) >= 5 and priority[:2] == ["Passeriformes", "Charadriiformes"]
    assert all(cat.families[name].lora_priority and cat.families[name].rationale for name in priority)
    families_with_species = {s.family for s in cat.species}
    assert families_with_species == set(cat.families)  # every family a request may name has species
    for name in priority:
        assert sum(s.family == name for s in cat.species) >= 20, name  # enough to train and test a LoRA
    assert sum(s.family == "Passeriformes" for s in cat.species) > len(cat.species) / 3


# Orders the catalogue must get right (easy to confuse): taxonomic family -> family (order).
ORDERS = {
    "Laridae": "Charadriiformes",  # gulls, terns, skimmers
    "Scolopacidae": "Charadriiformes",  # sandpipers
    "Alcidae": "Charadriiformes",  # auks
    "Ardeidae": "Pelecaniformes",  # herons
    "Phalacrocoracidae": "Suliformes",  # cormorants
    "Apodidae": "Apodiformes",  # swifts
    "Trochilidae": "Apodiformes",  # hummingbirds
    "Alcedinidae": "Coraciiformes",  # kingfishers
    "Falconidae": "Falconiformes",  # falcons are not hawks
    "Accipitridae": "Accipitriformes",
    "Tytonidae": "Strigiformes",
    "Strigidae": "Strigiformes",
    "Picidae": "Piciformes",
    "Anatidae": "Anseriformes",
    "Columbidae": "Columbiformes",
    "Gaviidae": "Gaviiformes",
    "Podicipedidae": "Podicipediformes",
    "Turdidae": "Passeriformes",
    "Corvidae": "Passeriformes",
}


def test_species_sit_in_the_right_order(cat: Catalogue) -> None:
    for species in cat.species:
        if species.taxonomic_family in ORDERS:
            assert species.family == ORDERS[species.taxonomic_family], species
    assert {s.taxonomic_family for s in cat.species} >= set(ORDERS)


def test_every_species_makes_a_valid_request_that_resolves_to_its_family(cat: Catalogue) -> None:
    for species in cat.species:
        for name in (species.common_name, *species.aliases):
            request = ImageRequest(
                species=name, scientific_name=species.scientific_name, species_id=species.species_id
            )
            assert cat.family_for(request) == (species.family, "catalogue")
            assert cat.lookup(common_name=name) is species


def test_vocabulary_example_species_agree_with_the_catalogue(cat: Catalogue) -> None:
    for example in PromptLibrary.load().example_species:
        species = cat.lookup(scientific_name=example.scientific)
        assert species is not None, example
        assert cat.lookup(common_name=example.common) is species, example
        assert species.family == example.family, example


LOOKUPS = [
    # (keyword arguments, expected species id)
    ({"species_id": "amerob"}, "amerob"),
    ({"species_id": " EURROB1 "}, "eurrob1"),
    ({"scientific_name": "Turdus migratorius"}, "amerob"),
    ({"scientific_name": "  turdus   MIGRATORIUS "}, "amerob"),
    ({"common_name": "American Robin"}, "amerob"),
    ({"common_name": "Cooper's Hawk"}, "coohaw"),
    ({"common_name": "coopers hawk"}, "coohaw"),
    ({"common_name": "COOPER’S-HAWK"}, "coohaw"),
    ({"common_name": "black capped chickadee"}, "bkcchi"),
    ({"common_name": "Blackcapped Chickadee"}, "bkcchi"),
    ({"common_name": "Eurasian Collared Dove"}, "eucdov"),
    ({"common_name": "Grey Heron"}, "graher1"),  # grey = gray
    ({"common_name": "Rock Dove"}, "rocpig"),  # an alias (IOC name)
    ({"common_name": "goosander"}, "commer"),
    # id first, then scientific name, then common name; a miss falls through to the next key
    ({"species_id": "amerob", "scientific_name": "Anas platyrhynchos", "common_name": "Blue Jay"}, "amerob"),
    (
        {"species_id": "nosuch1", "scientific_name": "Anas platyrhynchos", "common_name": "Blue Jay"},
        "mallar3",
    ),
    ({"species_id": "nosuch1", "scientific_name": "Raphus cucullatus", "common_name": "Blue Jay"}, "blujay"),
]


@pytest.mark.parametrize(("keys", "species_id"), LOOKUPS)
def test_lookup_by_each_key_and_spelling(cat: Catalogue, keys: dict[str, str], species_id: str) -> None:
    found = cat.lookup(**keys)
    assert isinstance(found, Species) and found.species_id == species_id


@pytest.mark.parametrize(
    "keys",
    [
        {},
        {"species_id": "", "scientific_name": "", "common_name": ""},
        {"species_id": "dodo1", "scientific_name": "Raphus cucullatus", "common_name": "Dodo"},
        {"common_name": "Robin"},  # ambiguous (American or European): no guess
        {"common_name": "Turdus migratorius"},  # each key is matched only against its own field
    ],
)
def test_unknown_species_are_none(cat: Catalogue, keys: dict[str, str]) -> None:
    assert cat.lookup(**keys) is None


def test_family_ignores_case_and_knows_only_families(cat: Catalogue) -> None:
    assert cat.family(" passeriformes ") == "Passeriformes"
    assert cat.family("CHARADRIIFORMES") == "Charadriiformes"
    for value in ("", "Turdidae", "Passerines", "Dinosauria"):
        with pytest.raises(UnknownFamilyError) as info:
            cat.family(value)
        assert (info.value.field, info.value.value, info.value.allowed) == (
            "family",
            value,
            ", ".join(cat.families),
        )


def test_family_taxonomic_also_reads_a_taxonomic_family(cat: Catalogue) -> None:
    assert cat.family("turdidae", taxonomic=True) == "Passeriformes"
    assert cat.family("Laridae", taxonomic=True) == "Charadriiformes"
    assert cat.family("piciformes", taxonomic=True) == "Piciformes"
    with pytest.raises(UnknownFamilyError):
        cat.family("Dinosauridae", taxonomic=True)


def test_family_for_request_family_wins_then_catalogue_then_unknown(cat: Catalogue) -> None:
    robin = {"species": "American Robin", "scientific_name": "Turdus migratorius", "species_id": "amerob"}
    assert cat.family_for(ImageRequest(**robin)) == ("Passeriformes", "catalogue")
    assert cat.family_for(ImageRequest(**robin, family="strigiformes")) == ("Strigiformes", "request")
    assert cat.family_for(ImageRequest(species="Dodo")) == (None, "unknown")
    assert cat.family_for(ImageRequest(species="Dodo", family="Columbiformes")) == (
        "Columbiformes",
        "request",
    )
    # the id outranks a mismatching name; an unknown id falls back to the names
    assert cat.family_for(Req(species="Mallard", species_id="amerob")) == ("Passeriformes", "catalogue")
    assert cat.family_for(Req(species="Mallard", species_id="nosuch1")) == ("Anseriformes", "catalogue")
    assert cat.family_for(Req(family=" piciformes")) == ("Piciformes", "request")
    with pytest.raises(UnknownFamilyError, match="invalid 'family': got 'Turdidae'; allowed: Passeriformes"):
        cat.family_for(Req(family="Turdidae"))


def test_schema_accepts_exactly_the_catalogue_families(cat: Catalogue) -> None:
    for name in cat.families:
        assert ImageRequest(species="x", family=name.lower()).family == name
    with pytest.raises(UnknownFamilyError) as info:
        ImageRequest(species="x", family="Turdidae")
    assert info.value.field == "family" and info.value.value == "Turdidae"
    assert str(info.value) == str(UnknownFamilyError("Turdidae", cat.families))  # the one message
    with pytest.raises(RequestError) as info:
        ImageRequest(species="x", family=7)
    assert info.value.allowed == f"{', '.join(cat.families)}, or null"


def test_docs_table_lists_every_family_with_its_priority_and_count(cat: Catalogue) -> None:
    rows = re.findall(r"^\| (\w+formes) \| (yes)? ?\| (\d+) \|", DOCS.read_text(encoding="utf-8"), re.M)
    assert [name for name, _, _ in rows] == list(cat.families)
    for name, priority, count in rows:
        assert (priority == "yes") == cat.families[name].lora_priority, name
        assert int(count) == sum(s.family == name for s in cat.species), name


ROBIN_LINE = "      amerob: {common: American Robin, scientific: Turdus migratorius}\n"
JAY_LINE = "      blujay: {common: Blue Jay, scientific: Cyanocitta cristata}\n"
BROKEN = [
    # (text in the bundled file, replacement, text the error must contain)
    (ROBIN_LINE, ROBIN_LINE * 2, "duplicate key 'amerob'"),
    (JAY_LINE, "      amerob: {common: Blue Jay, scientific: Cyanocitta cristata}\n", "species id 'amerob'"),
    (JAY_LINE, "      blujay: {common: Blue Jay, scientific: Turdus migratorius}\n", "Turdus migratorius"),
    (
        JAY_LINE,
        "      blujay: {common: American-robin, scientific: Cyanocitta cristata}\n",
        "Corvidae.blujay",
    ),
    (
        JAY_LINE,
        "      blujay: {common: Blue Jay, scientific: Cyanocitta cristata, also: [Blue-jay]}\n",
        "blujay: common name 'Blue-jay' repeats one of its own names",
    ),
    (ROBIN_LINE, "      amerob: {common: American Robin, scientific: Turdus}\n", "amerob.scientific"),
    (ROBIN_LINE, "      amerob: {common: '', scientific: Turdus migratorius}\n", "amerob.common"),
    (ROBIN_LINE, "      amerob: {common: American Robin}\n", "amerob.scientific"),
    (ROBIN_LINE, "      AmeRob: {common: American Robin, scientific: Turdus migratorius}\n", "AmeRob"),
    ("  Passeriformes:\n    Tyrannidae:\n", "  Passerifromes:\n    Tyrannidae:\n", "species.Passerifromes"),
    ("  Passeriformes:\n    Tyrannidae:\n", "  Passeriformes:\n    Tyrannids:\n", "Tyrannids"),
    ("    Corvidae:\n", "    Anatidae:\n", "family already listed under Passeriformes"),
    (
        "  Strigiformes:\n    lora_priority: true\n",
        "  Strigiformes:\n    lora_priority: false\n",
        "lora_priority",
    ),
    ("  Galliformes:\n    lora_priority", "  Landfowl:\n    lora_priority", "Landfowl"),
    (
        "  Galliformes:\n    lora_priority",
        "  Passeriformes:\n    lora_priority",
        "duplicate key 'Passeriformes'",
    ),
    ("    lora_priority: false\n", "    lora_priority: 'no'\n", "lora_priority"),
    ("species:\n", "species: [\n", "catalogue.yaml"),
    (
        "rationale: >-\n      Cuckoos and roadrunners. Few species\n",
        "rationale: ' '\n",
        "Cuculiformes.rationale",
    ),
]


@pytest.mark.parametrize(("old", "new", "named"), BROKEN)
def test_broken_catalogue_names_the_bad_entry(tmp_path: Path, old: str, new: str, named: str) -> None:
    text = DEFAULT_CATALOGUE.read_text(encoding="utf-8")
    assert old in text
    path = tmp_path / "catalogue.yaml"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    with pytest.raises(DataFileError, match=re.escape(named)) as info:
        Catalogue.load(path)
    assert str(path) in str(info.value)
    path.write_text(text, encoding="utf-8")
    reloaded = Catalogue.load(path)
    assert (reloaded.families, reloaded.species) == (CATALOGUE.families, CATALOGUE.species)
