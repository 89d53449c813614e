"""The animation request: its own limits and length rules, everything else shared with the image request."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from birdgen import schema
from birdgen.prompts import DataFileError, PromptLibrary
from birdgen.schema import (
    ANIMATION,
    DEFAULT_LIMITS,
    LIMITS,
    MISSING,
    SVD_FIELDS,
    AnimationRequest,
    ImageRequest,
    Limits,
    RequestError,
    parse_animation_request,
    parse_image_request,
)
from tests.test_prompts import CLIP_WINDOW, clip_tokens
from tests.test_schema import assert_every_field_counts

ROBIN = {"species": "American Robin", "scientific_name": "Turdus migratorius"}
FIELD_NAMES = list(AnimationRequest.model_fields)

# Computed before the animation request (and the e-ink options) existed: neither may move an image.
ROBIN_IMAGE_SEED = 2668404154226955910
ROBIN_IMAGE_JSON = (
    '{"family":null,"format":"png","habitat":null,"height":512,"lighting":"golden-hour",'
    '"negative_prompt":null,"pose":"perched","prompt":null,"scientific_name":null,"season":"breeding",'
    '"seed":null,"species":"American Robin","species_id":null,"steps":1,"style":"photo","width":512}'
)
IMAGE_FIELDS = [
    "species",
    "scientific_name",
    "species_id",
    "family",
    "pose",
    "season",
    "lighting",
    "style",
    "habitat",
    "width",
    "height",
    "steps",
    "seed",
    "format",
    "eink_panel",
    "eink_palette",
    "eink_dither",
    "eink_fit",
    "prompt",
    "negative_prompt",
    "control",
]


def error_for(data: object, **kwargs: int) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_animation_request(data, **kwargs)  # type: ignore[arg-type]
    return info.value


@pytest.fixture(scope="module")
def lib() -> PromptLibrary:
    return PromptLibrary.load()


def test_image_request_is_unchanged() -> None:
    request = ImageRequest(species="American Robin")
    assert request.resolved_seed() == ROBIN_IMAGE_SEED
    assert request.canonical_json() == ROBIN_IMAGE_JSON
    assert list(ImageRequest.model_fields) == IMAGE_FIELDS  # also the order errors are reported in
    error = error_for_image({"species": "x", "colour": "red"})
    assert error.allowed == f"the fields {', '.join(IMAGE_FIELDS)}"


def error_for_image(data: dict) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_image_request(data)
    return info.value


def test_animation_limits_match_the_contract() -> None:
    assert ANIMATION is LIMITS.animation
    for size in (ANIMATION.width, ANIMATION.height):
        assert (size.min, size.max, size.multiple_of, size.default) == (256, 1024, 64, 512)
    assert (ANIMATION.steps.min, ANIMATION.steps.max, ANIMATION.steps.default) == (1, 4, 4)
    duration = ANIMATION.duration_seconds
    assert (duration.min, duration.max, duration.default) == (2, 5, 2)
    assert (ANIMATION.fps.min, ANIMATION.fps.max, ANIMATION.fps.default) == (8, 24, 8)
    assert ANIMATION.max_frames == 120 == duration.max * ANIMATION.fps.max
    assert ANIMATION.formats == ["webp", "gif", "both"] and ANIMATION.default_format == "both"


def test_defaults(lib: PromptLibrary) -> None:
    request = AnimationRequest(species="American Robin")
    assert request.behaviour == lib.defaults.behaviour == "calling"
    assert (request.season, request.lighting, request.style, request.habitat) == (
        lib.defaults.season,
        lib.defaults.lighting,
        lib.defaults.style,
        lib.defaults.habitat,
    )
    assert (request.duration_seconds, request.fps, request.num_frames) == (2.0, 8, 16)
    assert (request.width, request.height, request.steps, request.seed, request.format) == (
        512,
        512,
        4,
        None,
        "both",
    )
    assert request.scientific_name is request.species_id is request.family is None
    assert request.prompt is request.negative_prompt is None and request.poster_frame == 0
    assert request.engine == "animatediff"
    assert all(getattr(request, name) is None for name in SVD_FIELDS)  # an svd request's alone
    # The engine before the fields whose ranges it decides, the SVD fields last (test_svd_request.py).
    assert [
        *IMAGE_FIELDS[:4],
        "engine",
        "behaviour",
        *IMAGE_FIELDS[5:13],
        "duration_seconds",
        "fps",
        "format",
        "poster_frame",
        "prompt",
        "negative_prompt",
        *SVD_FIELDS,
    ] == FIELD_NAMES


def test_every_behaviour_builds_a_prompt_with_its_phrase(lib: PromptLibrary) -> None:
    assert len(lib.behaviours) >= 12
    for key, phrase in lib.behaviours.items():
        request = AnimationRequest(**ROBIN, behaviour=key.upper().replace("-", " "), habitat="forest")
        assert request.behaviour == key
        prompt = lib.build(request)
        assert phrase in prompt.text, (key, prompt.text)
        assert not any(pose in prompt.text for pose in lib.poses.values()), (key, prompt.text)
        assert "American Robin (Turdus migratorius)" in prompt.text
        assert clip_tokens(prompt.text) < CLIP_WINDOW


def test_behaviour_aliases() -> None:
    for alias, key in [("eating", "feeding"), ("Take_Off", "taking-off"), ("FLIGHT", "flying")]:
        assert AnimationRequest(species="x", behaviour=alias).behaviour == key


@pytest.mark.parametrize(
    ("duration", "fps", "frames"),
    [(2, 8, 16), (2.0, 8, 16), (2.5, 8, 20), (2.1, 10, 21), (3, 24, 72), (4.125, 8, 33), (5, 24, 120)],
)
def test_num_frames(duration: float, fps: int, frames: int) -> None:
    request = AnimationRequest(species="x", duration_seconds=duration, fps=fps)
    assert request.num_frames == frames and isinstance(request.num_frames, int)
    assert isinstance(request.duration_seconds, float)


DURATION = "a number 2..5 seconds, with duration × fps a whole number of frames, at most 120"
BAD = [
    # (request fields, field named, text the allowed part must contain)
    ({"colour": "red"}, "colour", "behaviour, season, lighting"),
    ({"pose": "perched"}, "pose", "null with engine animatediff; with engine svd: the drawn still's pose"),
    ({"control": None}, "control", "duration_seconds, fps, format"),  # an image field
    ({"behaviour": "moonwalking"}, "behaviour", "flying, feeding, singing"),
    ({"behaviour": ""}, "behaviour", "flying, feeding, singing"),
    ({"behaviour": None}, "behaviour", "flying, feeding, singing"),
    ({"duration_seconds": 1.5}, "duration_seconds", DURATION),
    ({"duration_seconds": 5.5}, "duration_seconds", DURATION),
    ({"duration_seconds": 0}, "duration_seconds", DURATION),
    ({"duration_seconds": math.nan}, "duration_seconds", DURATION),
    ({"duration_seconds": math.inf}, "duration_seconds", DURATION),
    ({"duration_seconds": "2"}, "duration_seconds", DURATION),
    ({"duration_seconds": True}, "duration_seconds", DURATION),
    ({"duration_seconds": None}, "duration_seconds", DURATION),
    ({"fps": 7}, "fps", "an integer 8..24"),
    ({"fps": 25}, "fps", "an integer 8..24"),
    ({"fps": 12.0}, "fps", "an integer 8..24"),
    ({"fps": "12"}, "fps", "an integer 8..24"),
    ({"fps": True}, "fps", "an integer 8..24"),
    ({"width": 1088}, "width", "an integer 256..1024, multiple of 64"),
    ({"height": 500}, "height", "an integer 256..1024, multiple of 64"),
    ({"steps": 5}, "steps", "an integer 1..4"),
    ({"format": "png"}, "format", "webp, gif, both"),
    ({"format": "mp4"}, "format", "webp, gif, both"),
    ({"season": "monsoon"}, "season", "spring, summer, autumn"),
    ({"family": "Dinosauria"}, "family", "Passeriformes"),
    ({"seed": -1}, "seed", "an integer 0..9223372036854775807"),
    ({"prompt": "p" * 1001}, "prompt", "at most 1000 characters"),
    ({"poster_frame": 16}, "poster_frame", "0..15 (this clip has 16 frames)"),
    ({"poster_frame": 24, "fps": 12}, "poster_frame", "0..23"),
    ({"poster_frame": -1}, "poster_frame", "0..15"),
    ({"poster_frame": 1.0}, "poster_frame", "a frame number, 0 (the first) up to frames - 1"),
]


@pytest.mark.parametrize(("fields", "field", "allowed"), BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_each_problem_names_field_value_and_allowed(fields: dict, field: str, allowed: str) -> None:
    error = error_for({"species": "American Robin", **fields})
    assert isinstance(error, ValueError)
    assert error.field == field and allowed in error.allowed
    value = fields[field]
    assert error.value == value or (isinstance(value, float) and math.isnan(error.value))
    message = str(error)
    assert message.startswith(f"invalid {field!r}: got ") and f"; allowed: {error.allowed}" in message
    with pytest.raises(RequestError, match=re.escape(message)):
        AnimationRequest(**{"species": "American Robin", **fields})


@pytest.mark.parametrize(
    ("duration", "fps", "step"), [(2.1, 8, "1/8 s"), (2.05, 10, "1/10 s"), (2.01, 24, "1/24 s")]
)
def test_a_fractional_frame_count_names_duration(duration: float, fps: int, step: str) -> None:
    error = error_for({"species": "x", "duration_seconds": duration, "fps": fps})
    assert (error.field, error.value) == ("duration_seconds", duration)
    assert error.allowed == (
        f"a number 2..5 seconds making a whole number of frames (duration × fps): at {fps} fps, "
        f"a multiple of {step}"
    )


def test_too_many_frames_names_duration(monkeypatch: pytest.MonkeyPatch) -> None:
    request = {"species": "x", "duration_seconds": 5, "fps": 24}
    assert parse_animation_request(request).num_frames == 120  # the bundled cap allows 5 s at 24 fps
    # A server with less memory lowers the cap; too long a request names duration_seconds.
    error = error_for(request, max_frames=96)
    assert (error.field, error.value) == ("duration_seconds", 5.0)
    assert error.allowed == "at most 96 frames: duration × fps ≤ 96 (at 24 fps, at most 4 s)"
    assert parse_animation_request({**request, "fps": 16}, max_frames=96).num_frames == 80
    instance = AnimationRequest(**request)
    assert error_for(instance, max_frames=119).field == "duration_seconds"
    assert parse_animation_request(instance, max_frames=120) is instance
    # The cap in limits.yaml is enforced by the request itself.
    monkeypatch.setattr(schema, "ANIMATION", ANIMATION.model_copy(update={"max_frames": 40}))
    error = error_for({"species": "x", "duration_seconds": 2.5, "fps": 20})
    assert error.field == "duration_seconds" and error.allowed.startswith("at most 40 frames: duration × fps")
    assert AnimationRequest(species="x", duration_seconds=2.5, fps=16).num_frames == 40


def test_unknown_fields_first_then_fields_in_declaration_order() -> None:
    assert error_for({"species": "x", "behaviour": "bad", "control": None}).field == "control"
    # The engine before anything else (it decides the others' ranges), an SVD field in its place.
    assert error_for({"species": 3, "behaviour": "bad", "engine": "sora"}).field == "engine"
    assert error_for({"species": "x", "behaviour": "bad", "pose": "perched"}).field == "behaviour"
    assert error_for({"width": 3, "behaviour": "bad", "species": "x"}).field == "behaviour"
    assert error_for({"fps": 3, "duration_seconds": 9, "steps": 9, "species": "x"}).field == "steps"
    assert error_for({"fps": 3, "duration_seconds": 9, "species": "x"}).field == "duration_seconds"
    # The frame count is checked once every field is valid on its own.
    assert error_for({"duration_seconds": 2.1, "format": "png", "species": "x"}).field == "format"


def test_missing_species_and_bad_json() -> None:
    error = error_for({"behaviour": "flying"})
    assert (error.field, error.value) == ("species", MISSING)
    for text in ["{bad", "[1]", b"\xff"]:
        assert error_for(text).field == "request"
    error = error_for('{"species": "x", "species": "y"}')
    assert (error.field, error.value, error.allowed) == ("species", "y", "each field at most once")
    assert error_for(["species"]).field == "request"
    assert error_for({1: "x"}).field == "request"
    error = error_for(ImageRequest(species="x"))  # an image request is not an animation request
    assert error.field == "request" and "duration_seconds" in error.allowed


@pytest.mark.parametrize(
    "fields",
    [
        {"species": ""},
        {"species": "A" * 101},
        {"species_id": "amerob/../etc"},
        {"family": "Turdidae"},
        {"season": "monsoon"},
        {"lighting": "disco"},
        {"style": "anime"},
        {"habitat": "moon"},
        {"seed": 2**63},
        {"steps": 0},
        {"negative_prompt": 3},
    ],
)
def test_shared_fields_fail_the_same_way_in_both_requests(fields: dict) -> None:
    # One declaration and one validator per shared field (sizes differ: each kind has its own limits).
    image = error_for_image({"species": "American Robin", **fields})
    animation = error_for({"species": "American Robin", **fields})
    assert (image.field, image.value, image.allowed) == (animation.field, animation.value, animation.allowed)


def test_values_are_normalised_to_canonical_spelling() -> None:
    request = parse_animation_request(
        {
            "species": "  American \t Robin ",
            "family": "passeriformes",
            "behaviour": " Taking Off",
            "season": "fall",
            "style": "Watercolour",
            "habitat": "",
            "format": " GIF ",
            "prompt": "  ",
        }
    )
    assert (request.species, request.family, request.behaviour) == (
        "American Robin",
        "Passeriformes",
        "taking-off",
    )
    assert (request.season, request.style, request.habitat, request.format) == (
        "autumn",
        "watercolor",
        None,
        "gif",
    )
    assert request.prompt is None


def test_json_text_bytes_dict_and_instances_agree() -> None:
    request = AnimationRequest(**ROBIN, behaviour="flying", duration_seconds=2.5, seed=7)
    text = json.dumps({**ROBIN, "behaviour": "flying", "duration_seconds": 2.5, "seed": 7})
    assert parse_animation_request(text) == parse_animation_request(text.encode()) == request
    assert parse_animation_request(request) is request
    assert parse_animation_request(request.to_dict()) == request
    assert parse_animation_request(request.canonical_json()) == request


def test_request_is_frozen_and_hashable() -> None:
    request = AnimationRequest(**ROBIN)
    with pytest.raises(ValueError):
        request.fps = 12  # type: ignore[misc]
    assert hash(request) == hash(AnimationRequest(**ROBIN))


def test_canonical_json_is_sorted_compact_and_complete() -> None:
    text = AnimationRequest(species="Mésange charbonnière").canonical_json()
    data = json.loads(text)
    assert list(data) == sorted(set(FIELD_NAMES) - {"engine", *SVD_FIELDS})  # an svd request's alone
    assert ", " not in text and ": " not in text and "Mésange charbonnière" in text
    assert (data["duration_seconds"], data["fps"], data["format"], data["steps"]) == (2.0, 8, "both", 4)


def test_canonical_json_ignores_field_order_casing_and_spacing() -> None:
    plain = {
        **ROBIN,
        "behaviour": "flying",
        "lighting": "golden-hour",
        "duration_seconds": 3,
        "format": "webp",
    }
    shuffled = {
        "format": "WEBP",
        "duration_seconds": 3.0,
        "lighting": "Golden Hour",
        "behaviour": " Flight ",
        "scientific_name": "Turdus  migratorius",
        "species": " American Robin",
    }
    a, b = parse_animation_request(plain), parse_animation_request(json.dumps(shuffled))
    assert a == b and a.canonical_json() == b.canonical_json()
    assert a.resolved_seed() == b.resolved_seed()
    # Spelling out a default is the same request as leaving it out.
    assert (
        AnimationRequest(species="x").canonical_json()
        == AnimationRequest(species="x", duration_seconds=2, fps=8, steps=4, format="both").canonical_json()
    )


CHANGES = {
    "species": "Northern Cardinal",
    "scientific_name": "Cardinalis cardinalis",
    "species_id": "norcar",
    "family": "Piciformes",
    "behaviour": "flying",
    "season": "winter",
    "lighting": "overcast",
    "style": "watercolor",
    "habitat": "forest",
    "width": 1024,
    "height": 768,
    "steps": 1,
    "duration_seconds": 3,
    "fps": 12,
    "format": "gif",
    "poster_frame": 7,
    "prompt": "a robin",
    "negative_prompt": "cats",
    # A dict value: the fields it sets (an SVD field comes with the engine that takes it).
    "engine": {"engine": "svd"},
    "image": {"engine": "svd", "image": "aGVsbG8="},
    "pose": {"engine": "svd", "pose": "flying"},
    "motion_bucket_id": {"engine": "svd", "motion_bucket_id": 180},
    "noise_aug_strength": {"engine": "svd", "noise_aug_strength": 0.1},
    "min_guidance_scale": {"engine": "svd", "min_guidance_scale": 2},
    "max_guidance_scale": {"engine": "svd", "max_guidance_scale": 2.5},
    "decode_chunk_size": {"engine": "svd", "decode_chunk_size": 7},
}


def test_every_field_change_changes_canonical_json_and_seed() -> None:
    assert_every_field_counts(AnimationRequest, ROBIN, CHANGES)
    base = AnimationRequest(**ROBIN)
    for fmt in ANIMATION.formats:
        assert AnimationRequest(**ROBIN, format=fmt).resolved_seed() == base.resolved_seed()
    assert AnimationRequest(**ROBIN, seed=3).resolved_seed() == 3
    assert 0 <= base.resolved_seed() <= LIMITS.seed.max
    assert base.resolved_seed() != ImageRequest(**ROBIN).resolved_seed()


BROKEN_LIMITS = [
    (
        "duration_seconds: {min: 2, max: 5, default: 2}",
        "duration_seconds: {min: 2, max: 5, default: 6}",
        "animation.duration_seconds",
    ),
    (
        "duration_seconds: {min: 2, max: 5, default: 2}",
        "duration_seconds: {min: 2, max: 5, default: 2.01}",
        "whole number of frames",
    ),
    ("fps: {min: 8, max: 24, default: 8}", "fps: {min: 25, max: 24, default: 8}", "animation.fps"),
    ("fps: {min: 8, max: 24, default: 8}", "fps: {min: 8, max: 24, default: 8.5}", "animation.fps.default"),
    ("max_frames: 120", "max_frames: 0", "animation.max_frames"),
    ("max_frames: 120", "max_frames: 15", "at most max_frames 15"),
    ("default_format: both", "default_format: mp4", "default_format 'mp4'"),
    ("default_format: both", "default_format: both\n  fromats: [webp]", "animation.fromats"),
    ("animation:\n", "animations:\n", "animation"),
]


@pytest.mark.parametrize(("old", "new", "named"), BROKEN_LIMITS)
def test_broken_animation_limits_name_the_bad_entry(tmp_path: Path, old: str, new: str, named: str) -> None:
    text = DEFAULT_LIMITS.read_text()
    assert text.count(old) == 1
    path = tmp_path / "limits.yaml"
    path.write_text(text.replace(old, new))
    with pytest.raises(DataFileError, match=re.escape(named)):
        Limits.load(path)
