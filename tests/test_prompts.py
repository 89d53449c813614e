"""The prompt library: every entry works, prompts fit CLIP's window, bad data fails loudly."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from birdgen.prompts import DEFAULT_VOCABULARY, FIELDS, DataFileError, Prompt, PromptLibrary
from birdgen.schema import CATALOGUE, ImageRequest

CLIP_WINDOW = 77  # tokens, including the start and end tokens
# Words, digits and punctuation runs: a lower bound on CLIP's BPE token count.
_TOKENS = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


def clip_tokens(text: str) -> int:
    return len(_TOKENS.findall(text.lower())) + 2


@dataclass(frozen=True)
class Req:
    """A duck-typed request: `build` must not need an ImageRequest (a behaviour makes it an animation's)."""

    species: str = "American Robin"
    scientific_name: str | None = "Turdus migratorius"
    pose: str = "perched"
    season: str = "breeding"
    lighting: str = "golden-hour"
    style: str = "photo"
    habitat: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    behaviour: str | None = None


BEHAVIOURS = {"flying", "feeding", "singing", "preening", "hopping", "swimming", "bathing", "landing"}
BEHAVIOURS |= {"taking-off", "walking", "calling", "displaying"}


@pytest.fixture(scope="module")
def lib() -> PromptLibrary:
    return PromptLibrary.load()


def test_default_library_is_cached_and_has_the_promised_entries(lib: PromptLibrary) -> None:
    assert PromptLibrary.load() is lib
    assert len(lib.allowed("pose")) >= 8
    assert len(lib.allowed("lighting")) >= 6
    assert set(lib.allowed("season")) == {"spring", "summer", "autumn", "winter", "breeding", "non-breeding"}
    assert {"photo", "field-guide", "watercolor", "pencil-sketch"} <= set(lib.allowed("style"))
    assert {"forest", "wetland", "shoreline", "grassland", "garden", "urban"} <= set(lib.allowed("habitat"))
    assert set(lib.allowed("behaviour")) >= BEHAVIOURS
    assert lib.defaults.behaviour in lib.allowed("behaviour")
    assert len(lib.example_species) >= 20
    with pytest.raises(ValueError, match=r"'colour'.*pose, season, lighting, style, habitat, behaviour"):
        lib.allowed("colour")


def test_default_photo_prompt_for_american_robin(lib: PromptLibrary) -> None:
    prompt = lib.build(ImageRequest(species="American Robin", scientific_name="Turdus migratorius"))
    assert prompt.text == (
        "high quality, highly detailed, anatomically accurate, wildlife photograph of an American Robin "
        "(Turdus migratorius), perched on a branch, in fresh breeding plumage, warm golden hour light, "
        "600mm telephoto lens, bokeh, sharp focus"
    )
    assert len(prompt.text.split()) < 60
    assert clip_tokens(prompt.text) < CLIP_WINDOW
    assert prompt.negative.startswith("blurry, deformed, extra limbs")
    assert "watermark" in prompt.negative and "illustration" in prompt.negative


@pytest.mark.parametrize("field", ["pose", "season", "lighting", "habitat", "behaviour"])
def test_every_entry_builds_a_prompt_with_its_phrase(lib: PromptLibrary, field: str) -> None:
    section = getattr(lib, FIELDS[field])
    for key, phrase in section.items():
        text = lib.build(replace(Req(), **{field: key})).text
        assert phrase in text, (field, key, text)


def test_a_behaviour_takes_the_place_of_the_pose(lib: PromptLibrary) -> None:
    still = lib.build(Req(pose="perched")).text
    moving = lib.build(Req(pose="perched", behaviour="Taking Off")).text
    assert moving == still.replace(lib.poses["perched"], lib.behaviours["taking-off"])
    assert lib.poses["perched"] not in moving
    assert lib.build(Req(behaviour="eating")) == lib.build(Req(behaviour="feeding"))  # an alias
    with pytest.raises(ValueError, match="invalid 'behaviour': got 'moonwalking'; allowed: flying"):
        lib.build(Req(behaviour="moonwalking"))


def test_no_behaviour_is_longer_than_the_longest_pose(lib: PromptLibrary) -> None:
    # So an animation prompt fits CLIP's window whenever the worst image prompt does.
    longest_pose = max(clip_tokens(phrase) for phrase in lib.poses.values())
    for key, phrase in lib.behaviours.items():
        assert clip_tokens(phrase) <= longest_pose, (key, phrase)


def test_every_style_uses_its_template_and_negative_terms(lib: PromptLibrary) -> None:
    texts = set()
    for key, style in lib.styles.items():
        prompt = lib.build(replace(Req(), style=key, habitat="forest"))
        fixed = [p.strip() for p in re.sub(r"\{\w+\}", "", style.template).split(",") if p.strip()]
        assert fixed and all(part in prompt.text for part in fixed), (key, prompt.text)
        assert "American Robin (Turdus migratorius)" in prompt.text
        assert all(term in prompt.negative for term in [*lib.negative, *style.negative])
        texts.add(prompt.text)
    assert len(texts) == len(lib.styles)


def test_longest_combination_fits_clip_window_in_every_style(lib: PromptLibrary) -> None:
    def longest(section: dict[str, str]) -> str:
        return max(section, key=lambda k: clip_tokens(section[k]))

    worst = Req(
        species="Ruby-throated Hummingbird",
        scientific_name="Archilochus colubris",
        pose=longest(lib.poses),
        season=longest(lib.seasons),
        lighting=longest(lib.lightings),
        habitat=longest(lib.habitats),
    )
    worst_animation = replace(worst, behaviour=longest(lib.behaviours))
    for style in lib.styles:
        for request in (worst, worst_animation):
            prompt = lib.build(replace(request, style=style))
            assert clip_tokens(prompt.text) < CLIP_WINDOW, (style, clip_tokens(prompt.text), prompt.text)
            assert clip_tokens(prompt.negative) < CLIP_WINDOW, (style, prompt.negative)


def test_missing_habitat_and_scientific_name_leave_no_gaps(lib: PromptLibrary) -> None:
    text = lib.build(Req(scientific_name=None, habitat=None)).text
    assert "American Robin," in text and "()" not in text
    assert ", ," not in text and not text.endswith(",") and "  " not in text
    assert not any(phrase in text for phrase in lib.habitats.values())


@pytest.mark.parametrize(
    ("species", "expected"),
    [
        ("American Robin", "an American Robin"),
        ("Blue Jay", "a Blue Jay"),
        ("European Robin", "a European Robin"),
    ],
)
def test_article_agrees_with_species(lib: PromptLibrary, species: str, expected: str) -> None:
    assert expected in lib.build(Req(species=species)).text


def test_overrides_replace_the_templates(lib: PromptLibrary) -> None:
    templated = lib.build(Req())
    assert lib.build(Req(prompt="a robin on a fence post")) == Prompt(
        "a robin on a fence post", templated.negative
    )
    assert lib.build(Req(negative_prompt="cats")) == Prompt(templated.text, "cats")
    assert lib.build(Req(prompt="p", negative_prompt="n")) == Prompt("p", "n")


def test_build_is_deterministic_and_accepts_variant_spellings(lib: PromptLibrary) -> None:
    assert lib.build(Req()) == lib.build(Req())
    assert lib.build(Req(pose="Perched", lighting="Golden Hour", style="photograph")) == lib.build(Req())
    with pytest.raises(ValueError, match="invalid 'pose': got 'upside-down'; allowed: perched"):
        lib.build(Req(pose="upside-down"))


def test_example_species_are_valid_requests(lib: PromptLibrary) -> None:
    for species in lib.example_species:
        request = ImageRequest(
            species=species.common, scientific_name=species.scientific, family=species.family
        )
        assert request.family in CATALOGUE.families
        assert f"{species.common} ({species.scientific})" in lib.build(request).text


def test_corpus_covers_the_library(lib: PromptLibrary) -> None:
    corpus = lib.corpus()
    assert corpus == PromptLibrary.load().corpus()
    for phrase in [*lib.poses.values(), *lib.behaviours.values(), *lib.lightings.values(), *lib.negative]:
        assert phrase in corpus
    assert "telephoto lens" in corpus
    assert "Turdus migratorius" in corpus and "Northern Cardinal" in corpus
    assert "{" not in corpus


def test_loads_an_explicit_copy(tmp_path: Path) -> None:
    path = tmp_path / "vocabulary.yaml"
    path.write_text(DEFAULT_VOCABULARY.read_text())
    assert PromptLibrary.load(path) == PromptLibrary.load()


BROKEN = [
    ("  perched: perched on a branch\n", "  perched: ''\n", "poses"),
    ("  perched: perched on a branch\n", "  Perched: perched on a branch\n", "poses"),
    (
        "  perched: perched on a branch\n",
        "  perched: perched on a branch\n  perched: again\n",
        "duplicate key",
    ),
    ("  pose: perched\n", "  pose: upside-down\n", "defaults.pose"),
    ("  winter: in winter snow\n", "", "missing seasons: winter"),
    (
        "{quality}, wildlife photograph of {subject}",
        "{quality}, wildlife photograph of {bird}",
        "styles.photo",
    ),
    ("{quality}, wildlife photograph of {subject}", "{quality}, wildlife photograph", "{subject}"),
    ("    fall: autumn\n", "    fall: monsoon\n", "aliases.season.fall"),
    ("  midday: bright midday sun\n", "  midday: [bright]\n", "lightings.midday"),
    ("defaults:\n", "defaults: [\n", "vocabulary.yaml"),
    ("quality:\n", "colour: red\nquality:\n", "colour"),
    ("  flying: flapping its wings in flight\n", "  flying: ''\n", "behaviours"),
    ("  behaviour: calling\n", "  behaviour: moonwalking\n", "defaults.behaviour"),
    ("  behaviour: calling\n", "", "defaults.behaviour"),
    ("    eating: feeding\n", "    eating: munching\n", "aliases.behaviour.eating"),
    ("    eating: feeding\n", "    feeding: flying\n", "aliases.behaviour.feeding"),
]


@pytest.mark.parametrize(("old", "new", "named"), BROKEN)
def test_broken_vocabulary_names_the_bad_entry(tmp_path: Path, old: str, new: str, named: str) -> None:
    text = DEFAULT_VOCABULARY.read_text()
    assert old in text
    path = tmp_path / "vocabulary.yaml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(DataFileError, match=re.escape(named)):
        PromptLibrary.load(path)


def test_too_few_poses_is_rejected(tmp_path: Path) -> None:
    text = DEFAULT_VOCABULARY.read_text()
    kept = [
        line
        for line in text.splitlines()
        if not re.match(r"  (flying|landing|foraging|singing|preening):", line)
    ]
    path = tmp_path / "vocabulary.yaml"
    path.write_text("\n".join(kept))
    with pytest.raises(DataFileError, match="poses"):
        PromptLibrary.load(path)
