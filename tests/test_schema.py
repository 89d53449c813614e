"""The request schema: defaults, normalisation, one clear error per bad request, canonical form and seed."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from pathlib import Path

import pytest

from birdgen.prompts import DataFileError, PromptLibrary
from birdgen.schema import (
    CATALOGUE,
    DEFAULT_LIMITS,
    EINK_FIELDS,
    LIMITS,
    MISSING,
    SEEDLESS_FIELDS,
    ImageRequest,
    Limits,
    RequestError,
    parse_animation_request,
    parse_image_request,
)

ROBIN = {"species": "American Robin", "scientific_name": "Turdus migratorius"}
FIELD_NAMES = list(ImageRequest.model_fields)


def error_for(data: object) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_image_request(data)  # type: ignore[arg-type]
    return info.value


def test_limits_file_matches_the_contract() -> None:
    assert Limits.load() is LIMITS
    assert (LIMITS.width.min, LIMITS.width.max, LIMITS.width.multiple_of, LIMITS.width.default) == (
        256,
        2048,
        64,
        512,
    )
    assert LIMITS.height == LIMITS.width
    assert (LIMITS.steps.min, LIMITS.steps.max, LIMITS.steps.default) == (1, 4, 1)
    assert (LIMITS.seed.min, LIMITS.seed.max) == (0, 2**63 - 1)
    assert (LIMITS.max_length.name, LIMITS.max_length.species_id, LIMITS.max_length.prompt) == (100, 64, 1000)
    assert LIMITS.formats == ["png", "webp", "jpeg", "eink"] and LIMITS.default_format == "png"
    assert "families" not in Limits.model_fields  # families live in the catalogue alone


def test_defaults_come_from_the_data_files() -> None:
    request = ImageRequest(species="American Robin")
    defaults = PromptLibrary.load().defaults
    assert (request.pose, request.season, request.lighting, request.style, request.habitat) == (
        defaults.pose,
        defaults.season,
        defaults.lighting,
        defaults.style,
        defaults.habitat,
    )
    assert (request.width, request.height, request.steps, request.seed, request.format) == (
        512,
        512,
        1,
        None,
        "png",
    )
    assert request.scientific_name is request.species_id is request.family is None
    assert request.prompt is request.negative_prompt is None


def test_values_are_normalised_to_canonical_spelling() -> None:
    request = parse_image_request(
        {
            "species": "  American \t Robin ",
            "scientific_name": " Turdus migratorius ",
            "species_id": " amerob ",
            "family": "passeriformes",
            "pose": " Perched",
            "season": "Non Breeding",
            "lighting": "GOLDEN_HOUR",
            "style": "Field Guide",
            "habitat": "Shoreline",
            "format": "JPG",
            "prompt": "  ",
            "negative_prompt": "",
        }
    )
    assert request.species == "American Robin" and request.scientific_name == "Turdus migratorius"
    assert (request.species_id, request.family, request.format) == ("amerob", "Passeriformes", "jpeg")
    assert (request.pose, request.season, request.lighting) == ("perched", "non-breeding", "golden-hour")
    assert (request.style, request.habitat) == ("field-guide", "shoreline")
    assert request.prompt is request.negative_prompt is None
    aliased = ImageRequest(species="x", season="fall", style="Watercolour", habitat="", scientific_name=" ")
    assert (aliased.season, aliased.style, aliased.habitat, aliased.scientific_name) == (
        "autumn",
        "watercolor",
        None,
        None,
    )


def test_every_vocabulary_value_is_accepted() -> None:
    library = PromptLibrary.load()
    for field in ("pose", "season", "lighting", "style", "habitat"):
        for value in library.allowed(field):
            assert getattr(ImageRequest(species="x", **{field: value.upper()}), field) == value
    for family in CATALOGUE.families:
        assert ImageRequest(species="x", family=family.upper()).family == family
        assert ImageRequest(species="x", family=f" {family.lower()} ").family == family


BAD = [
    # (request fields, field named, text the allowed part must contain)
    ({"colour": "red"}, "colour", "species, scientific_name, species_id"),
    ({"species": "   "}, "species", "non-empty string of at most 100 characters"),
    ({"species": 5}, "species", "non-empty string"),
    ({"species": "A" * 101}, "species", "at most 100 characters"),
    ({"species": "Robin\x00"}, "species", "at most 100 characters"),
    ({"scientific_name": "T" * 101}, "scientific_name", "at most 100 characters"),
    ({"species_id": "x" * 65}, "species_id", "at most 64 characters"),
    ({"species_id": "amerob/../etc"}, "species_id", "letters, digits"),
    ({"family": "Dinosauria"}, "family", "Passeriformes, Charadriiformes"),
    ({"family": "Turdidae"}, "family", "Accipitriformes"),  # a taxonomic family is not a family
    ({"pose": "upside-down"}, "pose", "perched, flying"),
    ({"season": "monsoon"}, "season", "spring, summer, autumn, winter, breeding, non-breeding"),
    ({"lighting": "disco"}, "lighting", "golden-hour"),
    ({"style": "anime"}, "style", "photo, field-guide"),
    ({"habitat": "moon"}, "habitat", "forest"),
    ({"pose": ["perched"]}, "pose", "perched, flying"),
    ({"width": True}, "width", "an integer 256..2048, multiple of 64"),
    ({"width": 512.5}, "width", "an integer 256..2048, multiple of 64"),
    ({"width": 512.0}, "width", "an integer 256..2048, multiple of 64"),
    ({"width": "512"}, "width", "an integer 256..2048, multiple of 64"),
    ({"width": 500}, "width", "an integer 256..2048, multiple of 64"),
    ({"height": 192}, "height", "an integer 256..2048, multiple of 64"),
    ({"height": 2112}, "height", "an integer 256..2048, multiple of 64"),
    ({"steps": 0}, "steps", "an integer 1..4"),
    ({"steps": 5}, "steps", "an integer 1..4"),
    ({"steps": False}, "steps", "an integer 1..4"),
    ({"seed": -1}, "seed", "an integer 0..9223372036854775807"),
    ({"seed": 2**63}, "seed", "an integer 0..9223372036854775807"),
    ({"seed": 1.5}, "seed", "an integer 0..9223372036854775807"),
    ({"format": "gif"}, "format", "png, webp, jpeg, eink"),
    ({"prompt": "p" * 1001}, "prompt", "at most 1000 characters"),
    ({"negative_prompt": "n" * 1001}, "negative_prompt", "at most 1000 characters"),
    ({"negative_prompt": 3}, "negative_prompt", "at most 1000 characters"),
]


@pytest.mark.parametrize(("fields", "field", "allowed"), BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_each_problem_names_field_value_and_allowed(fields: dict, field: str, allowed: str) -> None:
    error = error_for({"species": "American Robin", **fields})
    assert isinstance(error, ValueError)
    assert error.field == field and allowed in error.allowed
    assert error.value == fields[field]
    message = str(error)
    assert message.startswith(f"invalid {field!r}: got ") and f"; allowed: {error.allowed}" in message
    # Constructing the model directly gives the same error, never a pydantic ValidationError.
    with pytest.raises(RequestError, match=re.escape(message)):
        ImageRequest(**{"species": "American Robin", **fields})


def test_missing_species() -> None:
    error = error_for({"pose": "perched"})
    assert (error.field, error.value) == ("species", MISSING)
    assert str(error) == "missing 'species'; allowed: a non-empty string of at most 100 characters"


def test_long_values_are_truncated_in_the_message() -> None:
    error = error_for({"species": "x", "prompt": "bird " * 400})
    assert error.value == "bird " * 400
    got = str(error).split("got ", 1)[1].split("; allowed")[0]
    assert got.startswith("'bird bird") and got.endswith("...") and len(got) <= 60


def test_only_the_first_problem_is_reported() -> None:
    # Unknown fields first, then fields in declaration order.
    assert error_for({"species": "x", "pose": "bad", "colour": "red"}).field == "colour"
    assert error_for({"width": 3, "pose": "bad", "species": "x"}).field == "pose"
    assert error_for({"width": 3, "steps": 9, "species": ""}).field == "species"


@pytest.mark.parametrize(
    "text",
    ["{bad json", "", "[1, 2]", '"American Robin"', "null", b"\xff\xfe", '{"species": "x"} trailing'],
)
def test_invalid_json_is_a_request_error(text: str | bytes) -> None:
    error = error_for(text)
    assert error.field == "request" and "JSON object" in error.allowed
    assert str(error).startswith("invalid 'request': got ")


def test_non_mapping_and_non_string_keys_are_rejected() -> None:
    assert error_for(["species"]).field == "request"
    assert error_for({1: "x"}).field == "request"


def test_duplicate_json_field_is_rejected() -> None:
    error = error_for('{"species": "x", "species": "y"}')
    assert (error.field, error.value, error.allowed) == ("species", "y", "each field at most once")


def test_lone_surrogates_are_rejected_before_hashing() -> None:
    error = error_for(r'{"species": "Robin \ud800"}')
    assert error.field == "species" and "Unicode" in error.allowed


def test_prompts_are_one_printable_line_without_control_characters() -> None:
    # Found by tests/test_fuzz.py: an override kept NULs, escapes and line breaks verbatim.
    spaced = {"prompt": " a robin\n\ton a\r\n fence ", "negative_prompt": "a\u2028b"}
    request = parse_image_request({**ROBIN, **spaced})
    assert (request.prompt, request.negative_prompt) == ("a robin on a fence", "a b")
    assert request == parse_image_request({**ROBIN, "prompt": "a robin on a fence", "negative_prompt": "a b"})
    assert parse_image_request({**ROBIN, "prompt": "p " + " " * 2000 + "q"}).prompt == "p q"  # counted after
    for text in ("robin\x00", "\x1b[31mred", "robin\x7f", "robin\x9b"):
        for field in ("prompt", "negative_prompt"):
            error = error_for({**ROBIN, field: text})
            assert error.field == field and error.value == text and "control characters" in error.allowed
    assert error_for({**ROBIN, "species": "Robin\x9b"}).field == "species"  # C1 controls, as in names


def test_json_text_bytes_dict_and_instances_agree() -> None:
    request = ImageRequest(**ROBIN, pose="flying", seed=7)
    text = json.dumps({**ROBIN, "pose": "flying", "seed": 7})
    assert parse_image_request(text) == parse_image_request(text.encode()) == request
    assert parse_image_request(request) is request
    assert parse_image_request(request.to_dict()) == request
    assert parse_image_request(request.canonical_json()) == request


def test_request_is_frozen_and_hashable() -> None:
    request = ImageRequest(**ROBIN)
    with pytest.raises(ValueError):
        request.pose = "flying"  # type: ignore[misc]
    assert hash(request) == hash(ImageRequest(**ROBIN))


def test_canonical_json_is_sorted_compact_complete_and_unescaped() -> None:
    request = ImageRequest(species="Mésange charbonnière", scientific_name="Parus major")
    text = request.canonical_json()
    data = json.loads(text)
    # The e-ink options only with format eink, control only with ControlNet guidance.
    assert list(data) == sorted(set(FIELD_NAMES) - {*EINK_FIELDS, "control"})
    assert ", " not in text and ": " not in text
    assert "Mésange charbonnière" in text
    assert data["seed"] is None and data["width"] == 512
    eink = json.loads(ImageRequest(**ROBIN, **EINK_PANEL).canonical_json())
    assert list(eink) == sorted(set(FIELD_NAMES) - {"control"})


def test_canonical_json_ignores_field_order_casing_and_spacing() -> None:
    plain = {
        **ROBIN,
        "family": "Passeriformes",
        "pose": "perched",
        "lighting": "golden-hour",
        "format": "jpeg",
    }
    shuffled = {
        "format": "JPG",
        "lighting": "Golden Hour",
        "pose": " PERCHED ",
        "family": "passeriformes",
        "scientific_name": "Turdus  migratorius",
        "species": " American Robin",
    }
    a, b = parse_image_request(plain), parse_image_request(json.dumps(shuffled))
    assert a.canonical_json() == b.canonical_json()
    assert a.resolved_seed() == b.resolved_seed()
    # Spelling out a default is the same request as leaving it out.
    assert (
        ImageRequest(species="x").canonical_json()
        == ImageRequest(species="x", width=512, steps=1).canonical_json()
    )


EINK_PANEL = {"format": "eink", "eink_panel": "296x128"}
CHANGES = {
    "species": "Northern Cardinal",
    "scientific_name": "Cardinalis cardinalis",
    "species_id": "norcar",
    "family": "Piciformes",
    "pose": "flying",
    "season": "winter",
    "lighting": "overcast",
    "style": "watercolor",
    "habitat": "forest",
    "width": 1024,
    "height": 768,
    "steps": 4,
    "format": "webp",
    "eink_panel": EINK_PANEL,
    "eink_palette": {**EINK_PANEL, "eink_palette": "grey4"},
    "eink_dither": {**EINK_PANEL, "eink_dither": "ordered"},
    "eink_fit": {**EINK_PANEL, "eink_fit": "cover"},
    "prompt": "a robin",
    "negative_prompt": "cats",
    "control": {"control": {"depth": {"template": "perched"}}},  # a dict value: the fields it sets
}


def with_change(fields: dict, field: str, value: object) -> dict:
    """`fields` with `field` changed to `value`; a dict value changes several fields together (an
    e-ink option comes with the format that takes it)."""
    return {**fields, **(value if isinstance(value, dict) else {field: value})}


def assert_every_field_counts(kind: type, fields: dict, changes: dict) -> None:
    """Each change alters the canonical JSON (cache keys); each but an output choice (format, poster
    frame, e-ink options) or control alters the derived seed, so only the scene picks the noise."""
    assert set(changes) == set(kind.model_fields) - {"seed"}
    base = kind(**fields)
    texts, seeds = {base.canonical_json()}, {base.resolved_seed()}
    for field, value in changes.items():
        changed = kind(**with_change(fields, field, value))
        texts.add(changed.canonical_json())
        if field in SEEDLESS_FIELDS:
            assert changed.resolved_seed() == base.resolved_seed(), field
        else:
            seeds.add(changed.resolved_seed())
    assert len(texts) == len(changes) + 1
    assert len(seeds) == 1 + sum(field not in SEEDLESS_FIELDS for field in changes)


def test_every_field_change_changes_canonical_json_and_seed() -> None:
    assert_every_field_counts(ImageRequest, ROBIN, CHANGES)
    base = ImageRequest(**ROBIN)
    assert ImageRequest(**ROBIN, format="png").resolved_seed() == base.resolved_seed()
    assert ImageRequest(**ROBIN, seed=1).canonical_json() != base.canonical_json()


def test_resolved_seed() -> None:
    request = ImageRequest(**ROBIN)
    picture = {k: v for k, v in json.loads(request.canonical_json()).items() if k not in ("seed", "format")}
    digest = hashlib.sha256(json.dumps(picture, sort_keys=True, separators=(",", ":")).encode()).digest()
    assert request.resolved_seed() == int.from_bytes(digest[:8], "big") & (2**63 - 1)
    assert request.resolved_seed() == ImageRequest(**ROBIN).resolved_seed()
    assert 0 <= request.resolved_seed() <= LIMITS.seed.max
    assert ImageRequest(**ROBIN, seed=0).resolved_seed() == 0
    assert ImageRequest(**ROBIN, seed=2**63 - 1).resolved_seed() == 2**63 - 1


def test_request_error_survives_pickling() -> None:
    error = error_for({"species": "x", "pose": "upside-down"})
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.field, copy.value, copy.allowed, str(copy)) == (
        error.field,
        error.value,
        error.allowed,
        str(error),
    )
    assert str(pickle.loads(pickle.dumps(error_for({})))) == str(error_for({}))


BROKEN_LIMITS = [
    ("max: 2048, multiple_of: 64, default: 512}", "max: 2048, multiple_of: 64, default: 500}", "width"),
    ("steps: {min: 1, max: 4, default: 1}", "steps: {min: 5, max: 4, default: 1}", "steps"),
    ("steps: {min: 1, max: 4, default: 1}", "steps: {min: 1, max: 4}", "steps.default"),
    ("default_format: png", "default_format: gif", "default_format"),
    ("format_aliases: {jpg: jpeg}", "format_aliases: {jpg: jpeg2000}", "format_aliases.jpg"),
    ("format_aliases: {jpg: jpeg}", "format_aliases: {jpg: jpeg}\nfamilies: [Passeriformes]", "families"),
    ("  prompt: 1000", "  prompt: '1000'", "max_length.prompt"),
    ("formats: [png, webp, jpeg, eink]", "formats: [png, webp, jpeg, eink", "limits.yaml"),
]


@pytest.mark.parametrize(("old", "new", "named"), BROKEN_LIMITS)
def test_broken_limits_file_names_the_bad_entry(tmp_path: Path, old: str, new: str, named: str) -> None:
    text = DEFAULT_LIMITS.read_text()
    assert old in text
    path = tmp_path / "limits.yaml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(DataFileError, match=re.escape(named)):
        Limits.load(path)
    path.write_text(text)
    assert Limits.load(path) == LIMITS


# -- format=eink ---------------------------------------------------------------------------------------
def test_eink_options_are_canonical_with_their_defaults_filled_in() -> None:
    request = ImageRequest(**ROBIN, format=" EINK ", eink_panel="400X300 ")
    assert (
        request.format,
        request.eink_panel,
        request.eink_palette,
        request.eink_dither,
        request.eink_fit,
    ) == (
        "eink",
        "400x300",
        "bw",  # the panel's first palette
        "floyd-steinberg",
        "subject",
    )
    spelt_out = {"eink_palette": "BW", "eink_dither": "Floyd-Steinberg", "eink_fit": "subject"}
    assert ImageRequest(**ROBIN, **EINK_PANEL, **spelt_out).eink_panel == "296x128"
    assert (
        ImageRequest(**ROBIN, format="eink", eink_panel="400x300", **spelt_out).canonical_json()
        == request.canonical_json()
    )


EINK_BAD = [
    ({"format": "eink"}, "eink_panel", MISSING, ["296x128", "400x300", "800x480", "800x480-7colour"]),
    ({"format": "eink", "eink_panel": "640x384"}, "eink_panel", "640x384", ["296x128", "800x480-7colour"]),
    ({**EINK_PANEL, "eink_palette": "7colour"}, "eink_palette", "7colour", ["bw, grey4", "panel 296x128"]),
    (
        {**EINK_PANEL, "eink_dither": "atkinson"},
        "eink_dither",
        "atkinson",
        ["floyd-steinberg, ordered, none"],
    ),
    ({**EINK_PANEL, "eink_fit": "stretch"}, "eink_fit", "stretch", ["subject, cover, contain"]),
    ({**EINK_PANEL, "eink_fit": 3}, "eink_fit", 3, ["subject, cover, contain"]),
    # An e-ink option with another format would be ignored: refused instead.
    ({"eink_panel": "400x300"}, "eink_panel", "400x300", ["with format eink", "with any other format: null"]),
    ({"format": "webp", "eink_dither": "ordered"}, "eink_dither", "ordered", ["with any other format: null"]),
]


@pytest.mark.parametrize(("fields", "field", "value", "allowed"), EINK_BAD)
def test_bad_eink_options_name_the_field_and_what_is_allowed(
    fields: dict, field: str, value: object, allowed: list[str]
) -> None:
    error = error_for({**ROBIN, **fields})
    assert (error.field, error.value) == (field, value)
    for text in allowed:
        assert text in error.allowed


def test_eink_options_keep_the_seed_and_the_source_is_the_png_request() -> None:
    png = ImageRequest(**ROBIN)
    requests = [
        ImageRequest(**ROBIN, **EINK_PANEL, eink_palette="grey4", eink_dither="ordered"),
        ImageRequest(**ROBIN, format="eink", eink_panel="800x480-7colour", eink_fit="contain"),
    ]
    for request in requests:
        assert request.resolved_seed() == png.resolved_seed()
        assert request.eink_source() == png
        assert request.eink_source().canonical_json() == png.canonical_json()


def test_animation_requests_have_no_eink_options() -> None:
    with pytest.raises(RequestError, match="invalid 'eink_panel'"):
        parse_animation_request({**ROBIN, "eink_panel": "400x300"})
