"""An animation request's engine and Stable Video Diffusion fields (docs/svd.md, "Request fields"):
the `svd` limits, defaults by engine, refusals naming the field, the canonical form and seed rules
(AnimateDiff requests unchanged), and the still an svd request draws. No torch, no server."""

from __future__ import annotations

import base64
import hashlib
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
    ENGINES,
    LIMITS,
    SVD,
    SVD_FIELDS,
    SVD_SETTINGS,
    AnimationRequest,
    ClientImage,
    ImageRequest,
    Limits,
    RequestError,
    parse_animation_request,
)
from client.cache import cache_key

ROBIN = {"species": "American Robin", "scientific_name": "Turdus migratorius"}
SVD_ROBIN = {**ROBIN, "engine": "svd"}
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(40))  # syntax and size are all the schema checks
PNG_B64 = base64.b64encode(PNG).decode()
DEFAULTS = PromptLibrary.load().defaults


def error_for(fields: dict, **kwargs: int) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_animation_request(fields, **kwargs)
    return info.value


# -- limits ---------------------------------------------------------------------------------------------
def test_svd_limits_match_the_design() -> None:
    assert SVD is LIMITS.svd and tuple(SVD.engines) == ENGINES == ("animatediff", "svd")
    assert (SVD.min_frames, SVD.max_frames) == (2, 25)
    assert (SVD.fps.min, SVD.fps.max, SVD.fps.default) == (5, 30, 7)
    assert (SVD.duration_seconds.max, SVD.duration_seconds.default) == (5, 2)
    assert SVD.duration_seconds.default * SVD.fps.default == 14  # img2vid's length
    assert (SVD.steps.min, SVD.steps.max, SVD.steps.default) == (1, 50, 25)
    assert (SVD.motion_bucket_id.min, SVD.motion_bucket_id.max, SVD.motion_bucket_id.default) == (1, 255, 127)
    noise = SVD.noise_aug_strength
    assert (noise.min, noise.max, noise.default) == (0, 1, 0.02)
    for limit, default in ((SVD.min_guidance_scale, 1.0), (SVD.max_guidance_scale, 3.0)):
        assert (limit.min, limit.max, limit.default) == (0, 10, default)
    chunk = SVD.decode_chunk_size
    assert (chunk.min, chunk.max, chunk.default) == (1, SVD.max_frames, 8)
    # One client image of input_image.max_bytes fits the server's bound (two control images do too).
    assert LIMITS.max_svd_request_bytes == (
        LIMITS.max_request_json_bytes + LIMITS.input_image.max_base64_chars + 256
    )
    assert (
        LIMITS.max_svd_request_bytes < LIMITS.max_controlled_request_bytes <= LIMITS.serving.max_request_bytes
    )


BROKEN_LIMITS = [
    ("engines: [animatediff, svd]", "engines: [svd, animatediff]", "engines must be animatediff, svd"),
    ("engines: [animatediff, svd]", "engines: [animatediff, svd, sora]", "got animatediff, svd, sora"),
    ("  min_frames: 2", "  min_frames: 26", "min_frames 26 is above max_frames 25"),
    (
        "fps: {min: 5, max: 30, default: 7}",
        "fps: {min: 0, max: 30, default: 7}",
        "fps.min must be at least 1",
    ),
    (
        "duration_seconds: {min: 0, max: 5, default: 2}",
        "duration_seconds: {min: 0, max: 5, default: 4}",
        "whole number of frames, 2..25",
    ),
    ("steps: {min: 1, max: 50, default: 25}", "steps: {min: 1, max: 50, default: 60}", "svd.steps"),
    (
        "decode_chunk_size: {min: 1, max: 25, default: 8}",
        "decode_chunk_size: {min: 1, max: 30, default: 8}",
        "above max_frames",
    ),
    (
        "min_guidance_scale: {min: 0, max: 10, default: 1.0}",
        "min_guidance_scale: {min: 0, max: 10, default: 4}",
        "above max_guidance_scale.default",
    ),
    (
        "motion_bucket_id: {min: 1, max: 255, default: 127}",
        "motion_bucket_id: {min: 1, max: 255, default: 12.5}",
        "svd.motion_bucket_id.default",
    ),
    ("svd:\n", "svds:\n", "svd"),
]


@pytest.mark.parametrize(("old", "new", "named"), BROKEN_LIMITS)
def test_broken_svd_limits_name_the_bad_entry(tmp_path: Path, old: str, new: str, named: str) -> None:
    text = DEFAULT_LIMITS.read_text()
    assert text.count(old) == 1, old
    path = tmp_path / "limits.yaml"
    path.write_text(text.replace(old, new))
    with pytest.raises(DataFileError, match=re.escape(named)):
        Limits.load(path)


# -- fields and defaults by engine ---------------------------------------------------------------------
def test_defaults_by_engine() -> None:
    plain = AnimationRequest(**ROBIN)
    assert plain.engine == "animatediff" and all(getattr(plain, f) is None for f in SVD_FIELDS)
    assert (plain.fps, plain.steps, plain.num_frames) == (8, 4, 16)
    assert plain.still_request() is None

    svd = AnimationRequest(**SVD_ROBIN)
    assert (svd.fps, svd.steps, svd.duration_seconds, svd.num_frames) == (7, 25, 2.0, 14)
    assert (svd.width, svd.height, svd.format, svd.poster_frame) == (512, 512, "both", 0)
    assert svd.image is None and svd.pose == DEFAULTS.pose == "perched"
    assert (svd.motion_bucket_id, svd.noise_aug_strength) == (127, 0.02)
    assert (svd.min_guidance_scale, svd.max_guidance_scale, svd.decode_chunk_size) == (1.0, 3.0, 8)
    assert isinstance(svd.noise_aug_strength, float) and isinstance(svd.min_guidance_scale, float)
    # Spelling the defaults out is the same request; a null SVD setting is its default.
    spelt = AnimationRequest(
        **ROBIN,
        engine=" SVD ",
        fps=7,
        steps=25,
        duration_seconds=2,
        pose="Perched",
        image="",
        behaviour=None,
        motion_bucket_id=127,
        noise_aug_strength=0.02,
        min_guidance_scale=1,
        max_guidance_scale=3,
        decode_chunk_size=None,
    )
    assert spelt == svd and spelt.canonical_json() == svd.canonical_json()


@pytest.mark.parametrize("spelling", ["svd", "SVD", " Svd\t", "animatediff", "AnimateDiff ", None])
def test_engine_is_matched_ignoring_case_and_outer_spaces(spelling: str | None) -> None:
    expected = "animatediff" if spelling is None else spelling.strip().lower()
    assert AnimationRequest(**ROBIN, engine=spelling).engine == expected


def test_an_svd_clip_has_its_own_ranges_and_frame_bounds() -> None:
    request = AnimationRequest(**SVD_ROBIN, fps=5, duration_seconds=5, steps=50)  # 25 frames
    assert (request.num_frames, request.steps) == (25, 50)
    assert AnimationRequest(**SVD_ROBIN, fps=30, duration_seconds=0.1).num_frames == 3
    assert AnimationRequest(**SVD_ROBIN, fps=20, duration_seconds=0.1).num_frames == 2
    short = AnimationRequest(**SVD_ROBIN, fps=6, duration_seconds=0.5, steps=2)  # what CPU tests ask
    assert (short.num_frames, short.decode_chunk_size) == (3, 3)  # a short clip decodes whole
    assert (
        AnimationRequest(**SVD_ROBIN, fps=6, duration_seconds=0.5, decode_chunk_size=2).decode_chunk_size == 2
    )
    # A server with less memory lowers the cap for svd clips as for AnimateDiff ones.
    error = error_for({**SVD_ROBIN, "fps": 10, "duration_seconds": 2}, max_frames=16)
    assert (error.field, error.value) == ("duration_seconds", 2.0) and error.allowed.startswith(
        "at most 16 frames"
    )
    assert parse_animation_request({**SVD_ROBIN, "fps": 8}, max_frames=16).num_frames == 16


def test_values_are_normalised() -> None:
    request = AnimationRequest(
        **SVD_ROBIN,
        pose=" FLYING ",
        noise_aug_strength=-0.0,
        min_guidance_scale=0,
        max_guidance_scale=10,
        motion_bucket_id=255,
    )
    assert request.pose == "flying" and request.motion_bucket_id == 255
    assert math.copysign(1, request.noise_aug_strength) == 1.0  # -0.0 is 0.0: one cache key
    assert (request.min_guidance_scale, request.max_guidance_scale) == (0.0, 10.0)
    assert '"noise_aug_strength":0.0' in request.canonical_json()


# -- refusals ------------------------------------------------------------------------------------------
BAD = [
    # (request fields, field named, text the allowed part must contain)
    ({"engine": "sora"}, "engine", "animatediff, svd (any case), or null for animatediff"),
    ({"engine": ""}, "engine", "animatediff, svd"),
    ({"engine": 1}, "engine", "animatediff, svd"),
    ({"engine": "svd", "behaviour": "flying"}, "behaviour", "null with engine svd"),
    ({"engine": "svd", "fps": 4}, "fps", "an integer 5..30"),
    ({"engine": "svd", "fps": 31}, "fps", "an integer 5..30"),
    ({"engine": "svd", "fps": "7"}, "fps", "an integer 5..30"),  # a type error, in the svd range's words
    ({"engine": "svd", "fps": None}, "fps", "an integer 5..30"),
    ({"engine": "svd", "steps": 51}, "steps", "an integer 1..50"),
    ({"engine": "svd", "steps": 0}, "steps", "an integer 1..50"),
    (
        {"engine": "svd", "duration_seconds": 6},
        "duration_seconds",
        "a number 0..5 seconds, with duration × fps a whole number of frames, 2..25",
    ),
    ({"engine": "svd", "duration_seconds": 4}, "duration_seconds", "at most 25 frames"),
    (
        {"engine": "svd", "duration_seconds": 0.1, "fps": 10},
        "duration_seconds",
        "at least 2 frames with engine svd",
    ),
    ({"engine": "svd", "duration_seconds": 0}, "duration_seconds", "at least 2 frames"),
    ({"engine": "svd", "duration_seconds": 0.3}, "duration_seconds", "at 7 fps, a multiple of 1/7 s"),
    ({"engine": "svd", "width": 1088}, "width", "an integer 256..1024, multiple of 64"),  # the animation's
    ({"engine": "svd", "format": "png"}, "format", "webp, gif, both"),
    (
        {"engine": "svd", "image": 3},
        "image",
        "base64 (standard alphabet, no line breaks) of a PNG or JPEG image",
    ),
    ({"engine": "svd", "image": "not base64!"}, "image", "or null to draw the still from the request"),
    ({"engine": "svd", "image": "aGVsbG8=\n"}, "image", "of at most 8388608 bytes"),
    ({"engine": "svd", "image": {"image_sha256": "ab", "image_bytes": 2}}, "image", "base64"),
    ({"engine": "svd", "pose": "moonwalking"}, "pose", "the drawn still's pose: perched, flying"),
    ({"engine": "svd", "pose": 1}, "pose", "or null for perched"),
    ({"engine": "svd", "motion_bucket_id": 0}, "motion_bucket_id", "an integer 1..255; or null for 127"),
    ({"engine": "svd", "motion_bucket_id": 256}, "motion_bucket_id", "an integer 1..255"),
    ({"engine": "svd", "motion_bucket_id": 127.0}, "motion_bucket_id", "an integer 1..255"),
    ({"engine": "svd", "motion_bucket_id": True}, "motion_bucket_id", "an integer 1..255"),
    ({"engine": "svd", "noise_aug_strength": 1.5}, "noise_aug_strength", "a number 0..1; or null for 0.02"),
    ({"engine": "svd", "noise_aug_strength": -0.1}, "noise_aug_strength", "a number 0..1"),
    ({"engine": "svd", "noise_aug_strength": math.nan}, "noise_aug_strength", "a number 0..1"),
    ({"engine": "svd", "noise_aug_strength": "0.1"}, "noise_aug_strength", "a number 0..1"),
    (
        {"engine": "svd", "min_guidance_scale": 11},
        "min_guidance_scale",
        "a number 0..10, at most max_guidance_scale",
    ),
    ({"engine": "svd", "max_guidance_scale": math.inf}, "max_guidance_scale", "a number 0..10, at least min"),
    ({"engine": "svd", "max_guidance_scale": False}, "max_guidance_scale", "a number 0..10"),
    (
        {"engine": "svd", "decode_chunk_size": 0},
        "decode_chunk_size",
        "an integer 1..25, at most the clip's frames",
    ),
    ({"engine": "svd", "decode_chunk_size": 26}, "decode_chunk_size", "an integer 1..25"),
    ({"engine": "svd", "decode_chunk_size": 15}, "decode_chunk_size", "(this clip has 14 frames)"),
    ({"engine": "svd", "decode_chunk_size": 8.0}, "decode_chunk_size", "an integer 1..25"),
]


@pytest.mark.parametrize(("fields", "field", "allowed"), BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_each_problem_names_field_value_and_allowed(fields: dict, field: str, allowed: str) -> None:
    error = error_for({**ROBIN, **fields})
    assert error.field == field and allowed in error.allowed, (error.field, error.allowed)
    message = str(error)
    assert message.startswith(f"invalid {field!r}: got ") and f"; allowed: {error.allowed}" in message
    with pytest.raises(RequestError, match=re.escape(message)):
        AnimationRequest(**{**ROBIN, **fields})


SVD_VALUES = {
    "image": PNG_B64,
    "pose": "flying",
    "motion_bucket_id": 127,
    "noise_aug_strength": 0.02,
    "min_guidance_scale": 1.0,
    "max_guidance_scale": 3.0,
    "decode_chunk_size": 8,
}


@pytest.mark.parametrize("field", SVD_FIELDS)
@pytest.mark.parametrize("engine", [None, "animatediff", " ANIMATEDIFF"])
def test_svd_fields_on_an_animatediff_request_are_refused_naming_the_field(
    field: str, engine: str | None
) -> None:
    fields = {**ROBIN, "engine": engine} if engine else dict(ROBIN)
    error = error_for({**fields, field: SVD_VALUES[field]})
    assert error.field == field
    assert error.allowed.startswith("null with engine animatediff; with engine svd: ")
    assert PNG_B64 not in str(error) or len(PNG_B64) <= 200  # a long image shows as its length
    # Null is the field left out: the plain AnimateDiff request.
    assert AnimationRequest(**fields, **{field: None}) == AnimationRequest(**ROBIN)


def test_a_long_image_on_an_animatediff_request_shows_as_its_length() -> None:
    text = base64.b64encode(bytes(300)).decode()
    error = error_for({**ROBIN, "image": text})
    assert (error.field, error.value) == ("image", f"{len(text)} characters") and text not in str(error)


def test_min_guidance_above_max_names_the_field_the_client_gave() -> None:
    both = error_for({**SVD_ROBIN, "min_guidance_scale": 4, "max_guidance_scale": 3.5})
    assert (both.field, both.value) == ("max_guidance_scale", 3.5)
    assert both.allowed.endswith("(here min_guidance_scale is 4)")
    low = error_for({**SVD_ROBIN, "min_guidance_scale": 4})  # above the default max 3
    assert (low.field, low.value) == ("min_guidance_scale", 4.0)
    assert low.allowed.endswith("(here max_guidance_scale is 3)")
    high = error_for({**SVD_ROBIN, "max_guidance_scale": 0.5})  # below the default min 1
    assert (high.field, high.value) == ("max_guidance_scale", 0.5)
    assert high.allowed.endswith("(here min_guidance_scale is 1)")
    equal = AnimationRequest(**SVD_ROBIN, min_guidance_scale=2, max_guidance_scale=2)
    assert equal.min_guidance_scale == equal.max_guidance_scale == 2.0
    assert AnimationRequest(**SVD_ROBIN, max_guidance_scale=1).max_guidance_scale == 1.0  # no CFG: allowed


def test_errors_come_engine_first_then_in_declaration_order() -> None:
    assert error_for({"species": 3, "engine": "sora"}).field == "engine"
    assert error_for({"engine": "svd", "width": 3, "motion_bucket_id": 0, "species": "x"}).field == "width"
    assert error_for({"engine": "svd", "pose": "bad", "decode_chunk_size": 0, "species": "x"}).field == "pose"
    # The frame count is checked once every field is valid on its own, the chunk against it after.
    fields = {"engine": "svd", "species": "x", "duration_seconds": 0.1, "decode_chunk_size": 8}
    assert error_for(fields).field == "duration_seconds"


# -- the image --------------------------------------------------------------------------------------------
def test_an_image_is_kept_with_its_digest_and_size() -> None:
    request = AnimationRequest(**SVD_ROBIN, image=PNG_B64)
    assert request.image == ClientImage(text=PNG_B64, sha256=hashlib.sha256(PNG).hexdigest(), nbytes=len(PNG))
    assert PNG_B64 not in repr(request)
    assert request.still_request() is None  # the client's picture is animated, none drawn
    assert AnimationRequest(**SVD_ROBIN, image="  ").image is None  # empty text means null


def test_the_largest_image_fits_and_one_byte_more_is_refused() -> None:
    images = LIMITS.input_image
    largest = base64.b64encode(bytes(images.max_bytes)).decode()
    assert len(largest) == images.max_base64_chars
    request = AnimationRequest(**SVD_ROBIN, image=largest)
    assert request.image is not None and request.image.nbytes == images.max_bytes
    # The largest valid svd request: the image, every text at its longest, every setting spelt out.
    n = LIMITS.max_length
    texts = {"species": "😀" * n.name, "scientific_name": "😀" * n.name, "species_id": "x" * n.species_id}
    texts |= {"prompt": "😀" * n.prompt, "negative_prompt": "😀" * n.prompt}
    numbers = {"noise_aug_strength": 0.30000000000000004, "min_guidance_scale": 1.0000000000000002}
    body = json.dumps(
        {**request.to_dict(), **texts, **numbers, "max_guidance_scale": 9.999999999999998}
    ).encode()
    assert len(body) <= LIMITS.max_svd_request_bytes
    assert parse_animation_request(body).image == request.image
    # Without the image it is within the JSON bound every request keeps (the gateway's animation route).
    drawn = json.loads(body) | {"image": None, "pose": "preening"}
    assert len(json.dumps(drawn).encode()) <= LIMITS.max_request_json_bytes
    over = base64.b64encode(bytes(images.max_bytes + 1)).decode()  # as long, one byte more
    error = error_for({**SVD_ROBIN, "image": over})
    assert (error.field, error.value) == ("image", f"base64 of {images.max_bytes + 1} bytes")
    longer = base64.b64encode(bytes(images.max_bytes + 3)).decode()
    error = error_for({**SVD_ROBIN, "image": longer})
    assert (error.field, error.value) == ("image", f"{len(longer)} characters of base64")


def test_the_gateway_body_schema_shows_the_image_as_base64_text() -> None:
    schema_ = AnimationRequest.model_json_schema()
    assert schema_["properties"]["image"]["anyOf"] == [
        {"type": "string", "contentEncoding": "base64"},
        {"type": "null"},
    ]
    assert "ClientImage" not in json.dumps(schema_)


# -- canonical form, cache key, seed ---------------------------------------------------------------------
# Recorded from birdgen before engines existed (HEAD 295a3c8): an AnimateDiff request keeps these.
BEFORE_ENGINES = [
    (
        {"species": "American Robin"},
        '{"behaviour":"calling","duration_seconds":2.0,"family":null,"format":"both","fps":8,"habitat":null,'
        '"height":512,"lighting":"golden-hour","negative_prompt":null,"poster_frame":0,"prompt":null,'
        '"scientific_name":null,"season":"breeding","seed":null,"species":"American Robin","species_id":null,'
        '"steps":4,"style":"photo","width":512}',
        6793846490467056523,
        "birdgen:cache:v1:c56d4190f289f876ec129a3d7e99980f31eb5e96b145569bd8be88d4e1b13271",
    ),
    (
        {
            "species": "American Robin",
            "scientific_name": "Turdus migratorius",
            "behaviour": "flying",
            "duration_seconds": 2.5,
            "fps": 12,
            "steps": 2,
            "width": 256,
            "height": 384,
            "format": "gif",
            "poster_frame": 3,
            "prompt": "a robin",
            "negative_prompt": "cats",
            "habitat": "forest",
            "family": "Passeriformes",
        },
        '{"behaviour":"flying","duration_seconds":2.5,"family":"Passeriformes","format":"gif","fps":12,'
        '"habitat":"forest","height":384,"lighting":"golden-hour","negative_prompt":"cats","poster_frame":3,'
        '"prompt":"a robin","scientific_name":"Turdus migratorius","season":"breeding","seed":null,'
        '"species":"American Robin","species_id":null,"steps":2,"style":"photo","width":256}',
        1287699480312506625,
        "birdgen:cache:v1:14b2c21c6e17147ed5b85ed556cee1f734c88b119cecb635efddf03a9cc042c9",
    ),
    (
        {"species": "Mésange charbonnière", "seed": 7},
        '{"behaviour":"calling","duration_seconds":2.0,"family":null,"format":"both","fps":8,"habitat":null,'
        '"height":512,"lighting":"golden-hour","negative_prompt":null,"poster_frame":0,"prompt":null,'
        '"scientific_name":null,"season":"breeding","seed":7,"species":"Mésange charbonnière",'
        '"species_id":null,"steps":4,"style":"photo","width":512}',
        7,
        "birdgen:cache:v1:173c7a0ad94d34397684cda655a5c4fa7b7d472d34eeedf71e6803a316ac7b9a",
    ),
]


@pytest.mark.parametrize(("fields", "canonical", "seed", "key"), BEFORE_ENGINES)
def test_animatediff_requests_keep_their_canonical_json_cache_key_and_seed(
    fields: dict, canonical: str, seed: int, key: str
) -> None:
    for extra in ({}, {"engine": "animatediff"}, {"engine": " AnimateDiff", **dict.fromkeys(SVD_FIELDS)}):
        request = AnimationRequest(**fields, **extra)
        assert request.canonical_json() == request.to_json() == canonical
        assert "engine" not in request.to_dict() and not set(SVD_FIELDS) & set(request.to_dict())
        assert request.resolved_seed() == seed
        assert cache_key(request, "1") == key


def test_an_svd_request_carries_its_engine_settings_and_image_digest() -> None:
    request = AnimationRequest(**SVD_ROBIN, image=PNG_B64, steps=2)
    canonical = json.loads(request.canonical_json())
    expected = sorted({*AnimationRequest.model_fields} - {"behaviour"})  # SVD has no behaviour
    assert list(canonical) == expected
    assert canonical["engine"] == "svd"
    assert canonical["image"] == {"image_sha256": hashlib.sha256(PNG).hexdigest(), "image_bytes": len(PNG)}
    assert PNG_B64 not in request.canonical_json()
    sent = json.loads(request.to_json())
    assert sent["image"] == PNG_B64 and {k: v for k, v in sent.items() if k != "image"} == {
        k: v for k, v in canonical.items() if k != "image"
    }
    assert parse_animation_request(request.to_json()) == request
    assert parse_animation_request(request.to_dict()) == request
    # Without an image, the canonical JSON is a request again and the text sent.
    drawn = AnimationRequest(**SVD_ROBIN, steps=2)
    assert "image" not in json.loads(drawn.canonical_json())
    assert (
        drawn.to_json() == drawn.canonical_json() and parse_animation_request(drawn.canonical_json()) == drawn
    )


def test_every_svd_field_and_the_image_move_the_seed_but_output_choices_do_not() -> None:
    base = AnimationRequest(**SVD_ROBIN, image=PNG_B64)
    seeds = {AnimationRequest(**ROBIN).resolved_seed(), base.resolved_seed()}  # the engine moves it
    changes: dict[str, object] = {
        "image": base64.b64encode(PNG + b"\x00").decode(),  # other bytes: another picture
        "pose": "flying",
        "motion_bucket_id": 128,
        "noise_aug_strength": 0.03,
        "min_guidance_scale": 1.5,
        "max_guidance_scale": 2.5,
        "decode_chunk_size": 7,
        "steps": 24,
        "fps": 6,
    }
    assert set(SVD_FIELDS) <= set(changes)
    for field, value in changes.items():
        changed = AnimationRequest(**{**SVD_ROBIN, "image": PNG_B64, field: value})
        assert changed.canonical_json() != base.canonical_json(), field
        seeds.add(changed.resolved_seed())
    assert len(seeds) == 2 + len(changes)
    for choice in ({"format": "gif"}, {"poster_frame": 5}):
        assert AnimationRequest(**SVD_ROBIN, image=PNG_B64, **choice).resolved_seed() == base.resolved_seed()
    assert AnimationRequest(**SVD_ROBIN, seed=3).resolved_seed() == 3
    # The seed is the SHA-256 of the canonical picture fields, as for every request.
    picture = {
        k: v
        for k, v in json.loads(base.canonical_json()).items()
        if k not in ("seed", "format", "poster_frame")
    }
    digest = hashlib.sha256(json.dumps(picture, sort_keys=True, separators=(",", ":")).encode()).digest()
    assert base.resolved_seed() == int.from_bytes(digest[:8], "big") & (2**63 - 1)


def test_svd_cache_keys_see_the_image_digest_not_the_text() -> None:
    request = AnimationRequest(**SVD_ROBIN, image=PNG_B64)
    other = AnimationRequest(**SVD_ROBIN, image=base64.b64encode(PNG[:-1]).decode())
    assert cache_key(request, "1") != cache_key(other, "1") != cache_key(AnimationRequest(**SVD_ROBIN), "1")
    assert cache_key(request, "1") == cache_key(AnimationRequest(**SVD_ROBIN, image=PNG_B64), "1")


# -- the still -------------------------------------------------------------------------------------------
def test_the_still_is_the_image_request_of_the_shared_fields() -> None:
    request = AnimationRequest(
        **SVD_ROBIN,
        family="passeriformes",
        species_id="amerob",
        season="fall",
        lighting="overcast",
        style="watercolor",
        habitat="forest",
        prompt="a robin on a branch",
        negative_prompt="cats",
        width=768,
        height=384,
        pose="Flying",
        steps=30,
        format="gif",
    )
    still = request.still_request()
    assert still == ImageRequest(
        **ROBIN,
        family="Passeriformes",
        species_id="amerob",
        season="autumn",
        lighting="overcast",
        style="watercolor",
        habitat="forest",
        prompt="a robin on a branch",
        negative_prompt="cats",
        width=768,
        height=384,
        pose="flying",
    )
    assert (still.steps, still.format, still.seed, still.control) == (LIMITS.steps.default, "png", None, None)
    # No seed: the image's own derived seed, so the still is the cached image of that request.
    assert still.resolved_seed() == ImageRequest(**still.to_dict()).resolved_seed() != request.resolved_seed()
    seeded = AnimationRequest(**SVD_ROBIN, seed=42).still_request()
    assert seeded is not None and seeded.seed == 42 and seeded.pose == "perched"


def test_every_animation_size_is_a_valid_still_size() -> None:
    for size in (ANIMATION.width.min, ANIMATION.width.max):
        still = AnimationRequest(**SVD_ROBIN, width=size, height=size).still_request()
        assert still is not None and (still.width, still.height) == (size, size)
    assert LIMITS.width.min <= ANIMATION.width.min and ANIMATION.width.max <= LIMITS.width.max


def test_limits_are_read_when_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(schema, "SVD", SVD.model_copy(update={"max_frames": 10}))
    error = error_for({**SVD_ROBIN})  # 14 frames by default
    assert error.field == "duration_seconds" and error.allowed.startswith("at most 10 frames")
    assert set(SVD_SETTINGS) < set(SVD_FIELDS)
