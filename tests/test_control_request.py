"""An image request's ControlNet guidance (`control`, docs/controlnet.md (c)): fields, defaults, errors
naming the nested field, the canonical form and seed rules, the limits behind them, and the step
rule (controlnet_keep) the pipeline applies. No torch, no server."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import re
from pathlib import Path

import pytest

from birdgen.contracts import CONTROLNET_KINDS
from birdgen.control import ControlSettings, any_active, controlnet_keep
from birdgen.prompts import DataFileError, PromptLibrary
from birdgen.schema import (
    DEFAULT_LIMITS,
    LIMITS,
    ImageRequest,
    Limits,
    RequestError,
    parse_animation_request,
    parse_image_request,
)

ROBIN = {"species": "American Robin", "scientific_name": "Turdus migratorius"}
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(40))  # syntax is all the schema checks: not decoded here
PNG_B64 = base64.b64encode(PNG).decode()
POSES = PromptLibrary.load().allowed("pose")


def error_for(control: object) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_image_request({**ROBIN, "control": control})
    return info.value


# -- limits ---------------------------------------------------------------------------------------------
def test_control_limits_match_the_design() -> None:
    control = LIMITS.control
    assert tuple(control.kinds) == CONTROLNET_KINDS == ("openpose", "depth")
    assert {k: v.scale_default for k, v in control.kinds.items()} == {"openpose": 0.8, "depth": 0.6}
    assert (control.scale.min, control.scale.max) == (0, 2)
    assert (control.start.min, control.start.max, control.start.default) == (0, 1, 0)
    assert (control.end.min, control.end.max, control.end.default) == (0, 1, 1)


def test_the_serving_bound_holds_the_largest_controlled_request() -> None:
    assert LIMITS.serving.max_request_bytes == 24 * 2**20
    chars = len(base64.b64encode(bytes(LIMITS.input_image.max_bytes)))
    assert LIMITS.input_image.max_base64_chars == chars == 11_184_812
    assert LIMITS.max_controlled_request_bytes == LIMITS.max_request_json_bytes + 2 * (chars + 256)
    assert LIMITS.max_controlled_request_bytes == 22_401_400 <= LIMITS.serving.max_request_bytes
    assert LIMITS.max_body_bytes == 100 * LIMITS.max_request_json_bytes  # batches: unchanged
    # The largest valid controlled request fits: two images at the byte limit, every text at its longest.
    image = base64.b64encode(bytes(LIMITS.input_image.max_bytes - 2)).decode()
    n = LIMITS.max_length
    request = {
        "species": "😀" * n.name,
        "scientific_name": "😀" * n.name,
        "species_id": "x" * n.species_id,
        "prompt": "😀" * n.prompt,
        "negative_prompt": "😀" * n.prompt,
        "control": {
            kind: {"image": image, "scale": 0.30000000000000004, "start": 0.1, "end": 0.9000000000000001}
            for kind in CONTROLNET_KINDS
        },
    }
    body = json.dumps(request).encode()
    assert len(body) <= LIMITS.max_controlled_request_bytes
    assert parse_image_request(body).control is not None


def test_a_batch_of_the_largest_templated_requests_keeps_the_batch_bound() -> None:
    """Templates carry no picture: the JSON bound's room for numbers and words holds both kinds'
    settings, so a full batch of the largest valid requests still fits max_body_bytes."""
    bird, n = "\U0001f426", LIMITS.max_length
    settings = {
        "template": "preening",
        "scale": 0.30000000000000004,
        "start": 1e-300,
        "end": 0.9000000000000001,
    }
    largest = ImageRequest(
        species=bird * n.name,
        scientific_name=bird * n.name,
        species_id="a" * n.species_id,
        prompt=bird * n.prompt,
        negative_prompt=bird * n.prompt,
        format="eink",
        eink_panel="800x480-7colour",
        control=dict.fromkeys(CONTROLNET_KINDS, settings),
    )
    body = json.dumps({"items": [largest.to_dict()] * LIMITS.batch.max_items}, indent=1)
    assert len(body) <= LIMITS.max_body_bytes


BROKEN_CONTROL_LIMITS = [
    (
        "kinds: {openpose: {scale_default: 0.8}, depth: {scale_default: 0.6}}",
        "kinds: {depth: {scale_default: 0.6}}",
        "openpose, depth in that order",
    ),
    (
        "kinds: {openpose: {scale_default: 0.8}, depth: {scale_default: 0.6}}",
        "kinds: {depth: {scale_default: 0.6}, openpose: {scale_default: 0.8}}",
        "in that order",
    ),
    (
        "kinds: {openpose: {scale_default: 0.8}, depth: {scale_default: 0.6}}",
        "kinds: {openpose: {scale_default: 2.5}, depth: {scale_default: 0.6}}",
        "kinds.openpose.scale_default",
    ),
    ("start: {min: 0, max: 1, default: 0}", "start: {min: 0, max: 1, default: 1}", "start.default"),
    ("end: {min: 0, max: 1, default: 1}", "end: {min: 0, max: 1.5, default: 1}", "within 0..1"),
    ("max_request_bytes: 25165824", "max_request_bytes: 16777216", "max_request_bytes 16777216 is below"),
    ("max_bytes: 8388608 ", "max_bytes: 10000000 ", "controlled image request"),
]


@pytest.mark.parametrize(("old", "new", "named"), BROKEN_CONTROL_LIMITS)
def test_broken_control_limits_name_the_entry(tmp_path: Path, old: str, new: str, named: str) -> None:
    text = DEFAULT_LIMITS.read_text()
    assert old in text
    path = tmp_path / "limits.yaml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(DataFileError, match=re.escape(named)):
        Limits.load(path)


# -- fields and defaults --------------------------------------------------------------------------------
def test_defaults_are_filled_in_per_kind() -> None:
    request = ImageRequest(**ROBIN, control={"openpose": {"template": "flying"}, "depth": {"image": PNG_B64}})
    assert request.control is not None
    pose, depth = request.control.openpose, request.control.depth
    assert pose is not None and depth is not None
    assert (pose.template, pose.image, pose.scale, pose.start, pose.end) == ("flying", None, 0.8, 0.0, 1.0)
    assert (depth.template, depth.image, depth.scale, depth.start, depth.end) == (
        None,
        PNG_B64,
        0.6,
        0.0,
        1.0,
    )
    assert (depth.image_sha256, depth.image_bytes) == (hashlib.sha256(PNG).hexdigest(), len(PNG))
    assert ImageRequest(**ROBIN).control is None


def test_values_are_normalised() -> None:
    request = ImageRequest(
        **ROBIN, control={" Depth ": {"template": " Perched ", "scale": 1, "start": 0, "end": 1, "image": ""}}
    )
    assert request.control is not None and request.control.depth is not None
    depth = request.control.depth
    assert (depth.template, depth.scale, depth.start, depth.end) == ("perched", 1.0, 0.0, 1.0)
    assert all(type(v) is float for v in (depth.scale, depth.start, depth.end))
    spelt_out = {"depth": {"template": "perched", "scale": 1.0, "start": 0.0, "end": 1.0}}
    assert request == ImageRequest(**ROBIN, control=spelt_out)
    assert request.canonical_json() == ImageRequest(**ROBIN, control=spelt_out).canonical_json()
    # Nulls mean defaults; a null kind and an empty control mean none; -0.0 is 0.0.
    nulls = {"depth": {"template": "perched", "scale": None, "start": None, "end": None}, "openpose": None}
    assert (
        ImageRequest(**ROBIN, control=nulls).control
        == ImageRequest(**ROBIN, control={"depth": {"template": "perched"}}).control
    )
    assert ImageRequest(**ROBIN, control={}).control is None
    assert ImageRequest(**ROBIN, control={"openpose": None}) == ImageRequest(**ROBIN)
    zero = ImageRequest(**ROBIN, control={"depth": {"template": "perched", "scale": -0.0}})
    assert '"scale":0.0' in zero.canonical_json()


def test_every_pose_is_a_template() -> None:
    for pose in POSES:
        request = ImageRequest(**ROBIN, control={"openpose": {"template": pose.upper().replace("-", " ")}})
        assert request.control is not None and request.control.openpose is not None
        assert request.control.openpose.template == pose


def test_control_settings_resolve_in_kind_order() -> None:
    request = ImageRequest(
        **ROBIN,
        steps=4,
        control={"depth": {"image": PNG_B64, "start": 0.5}, "openpose": {"template": "singing", "end": 0.5}},
    )
    pose, depth = request.control_settings()
    assert (pose.kind, pose.source, pose.template, pose.image, pose.scale, pose.start, pose.end) == (
        "openpose",
        "template",
        "singing",
        None,
        0.8,
        0.0,
        0.5,
    )
    assert (depth.kind, depth.source, depth.image, depth.scale, depth.start, depth.end) == (
        "depth",
        "image",
        PNG_B64,
        0.6,
        0.5,
        1.0,
    )
    assert depth.image_field == "control.depth.image"
    assert pose.step_scales(4) == [0.8, 0.8, 0.0, 0.0] and depth.keep(4) == [0.0, 0.0, 1.0, 1.0]
    assert PNG_B64 not in repr(depth) and PNG_B64 not in repr(request)  # reprs never carry the picture
    assert depth.metadata(4) == {
        "source": "image",
        "image_sha256": hashlib.sha256(PNG).hexdigest(),
        "image_bytes": len(PNG),
        "scale": 0.6,
        "start": 0.5,
        "end": 1.0,
        "steps_applied": [0, 0, 1, 1],
    }
    assert pose.metadata(4)["template"] == "singing" and "image_sha256" not in pose.metadata(4)
    assert ImageRequest(**ROBIN).control_settings() == ()


def test_active_nets() -> None:
    def net(scale: float, start: float = 0.0, end: float = 1.0) -> ControlSettings:
        return ControlSettings(kind="depth", scale=scale, start=start, end=end, template="perched")

    assert net(0.6).active(1) and not net(0.0).active(4)
    assert not net(0.6, start=0.5).active(1)  # at 1 step only the window 0..1 keeps the step
    assert net(0.6, start=0.5).active(2)
    assert not any_active([net(0.0), net(0.5, end=0.5)], 1) and any_active([net(0.0), net(0.5)], 1)
    with pytest.raises(ValueError, match="exactly one of template and image"):
        ControlSettings(kind="depth", scale=0.6, start=0.0, end=1.0)
    with pytest.raises(ValueError, match="start < end"):
        ControlSettings(kind="depth", scale=0.6, start=0.5, end=0.5, template="perched")


# -- errors ---------------------------------------------------------------------------------------------
BAD = [
    # (control, field named, value reported, text the allowed part must contain)
    ("openpose", "control", "openpose", "an object mapping ControlNet kinds (openpose, depth)"),
    ([{"template": "perched"}], "control", [{"template": "perched"}], "openpose, depth"),
    ({"canny": {"template": "perched"}}, "control.canny", {"template": "perched"}, "kinds openpose, depth"),
    (
        {"depth": {"template": "perched"}, "DEPTH": {"template": "flying"}},
        "control.DEPTH",
        {"template": "flying"},
        "each at most once",
    ),
    ({"depth": "perched"}, "control.depth", "perched", "exactly one of image"),
    (
        {"depth": {}},
        "control.depth",
        {},
        "exactly one of image (a base64 PNG or JPEG) or template (a pose: perched",
    ),
    ({"depth": {"scale": 0.5}}, "control.depth", {"scale": 0.5}, "exactly one of image"),
    (
        {"depth": {"template": "perched", "image": PNG_B64}},
        "control.depth",
        {"template": "perched", "image": PNG_B64},
        "exactly one",
    ),
    (
        {"depth": {"template": "perched", "strength": 1}},
        "control.depth.strength",
        1,
        "the fields image, template, scale, start, end",
    ),
    (
        {"openpose": {"template": "upside-down"}},
        "control.openpose.template",
        "upside-down",
        "a pose: perched, flying",
    ),
    ({"openpose": {"template": 3}}, "control.openpose.template", 3, "a pose: perched, flying"),
    (
        {"openpose": {"image": 3}},
        "control.openpose.image",
        3,
        "base64 (standard alphabet, no line breaks) of a PNG or JPEG image of at most 8388608 bytes",
    ),
    (
        {"openpose": {"image": "not base64!"}},
        "control.openpose.image",
        "11 characters that are not base64",
        "base64",
    ),
    (
        {"openpose": {"image": "QUJD\nREVG"}},
        "control.openpose.image",
        "9 characters that are not base64",
        "no line breaks",
    ),
    (
        {"openpose": {"image": "QUJDRA"}},
        "control.openpose.image",
        "6 characters that are not base64",
        "base64",
    ),  # no padding
    ({"openpose": {"image": "ÄÖÜ="}}, "control.openpose.image", "4 characters that are not base64", "base64"),
    (
        {"openpose": {"image": "-_-_"}},
        "control.openpose.image",
        "4 characters that are not base64",
        "standard alphabet",
    ),
    (
        {"openpose": {"image": "A" * 11_184_816}},
        "control.openpose.image",
        "11184816 characters of base64",
        "11184812 characters",
    ),
    (
        {"openpose": {"image": "A" * 11_184_812}},
        "control.openpose.image",
        "base64 of 8388609 bytes",
        "at most 8388608 bytes",
    ),
    (
        {"depth": {"template": "perched", "scale": 2.5}},
        "control.depth.scale",
        2.5,
        "a number 0..2, or null for 0.6",
    ),
    (
        {"openpose": {"template": "perched", "scale": -0.1}},
        "control.openpose.scale",
        -0.1,
        "a number 0..2, or null for 0.8",
    ),
    ({"depth": {"template": "perched", "scale": "1"}}, "control.depth.scale", "1", "a number 0..2"),
    ({"depth": {"template": "perched", "scale": True}}, "control.depth.scale", True, "a number 0..2"),
    (
        {"depth": {"template": "perched", "scale": float("nan")}},
        "control.depth.scale",
        "nan",
        "a number 0..2",
    ),
    (
        {"depth": {"template": "perched", "start": -0.5}},
        "control.depth.start",
        -0.5,
        "a number 0..1 below end",
    ),
    ({"depth": {"template": "perched", "end": 1.5}}, "control.depth.end", 1.5, "a number 0..1 above start"),
    (
        {"depth": {"template": "perched", "start": 0.5, "end": 0.5}},
        "control.depth.end",
        0.5,
        "above start, or null for 1 (here start is 0.5)",
    ),
    (
        {"depth": {"template": "perched", "start": 0.7, "end": 0.2}},
        "control.depth.end",
        0.2,
        "(here start is 0.7)",
    ),
    (
        {"depth": {"template": "perched", "start": 1}},
        "control.depth.start",
        1.0,
        "below end, or null for 0 (here end is 1)",
    ),
]


@pytest.mark.parametrize(
    ("control", "field", "value", "allowed"), BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)]
)
def test_each_problem_names_the_nested_field_and_what_is_allowed(
    control: object, field: str, value: object, allowed: str
) -> None:
    error = error_for(control)
    assert error.field == field and allowed in error.allowed, (error.field, error.allowed)
    if value == "nan":
        assert error.value != error.value
    elif isinstance(value, dict) and "image" in value:
        assert error.value == {**value, "image": f"{len(PNG_B64)} characters"} or error.value == value
    else:
        assert error.value == value
    assert str(error).startswith(f"invalid {field!r}: got ") and len(str(error)) < 1000  # never the image
    with pytest.raises(RequestError, match=re.escape(str(error))):  # the same from the model itself
        ImageRequest(**ROBIN, control=control)


def test_other_fields_are_reported_before_control() -> None:
    assert error_for({"depth": {"template": "x"}}).field == "control.depth.template"
    with pytest.raises(RequestError) as info:
        parse_image_request({**ROBIN, "width": 3, "control": {"depth": {"template": "x"}}})
    assert info.value.field == "width"
    # Within a kind: the source first, then scale, start, end.
    assert error_for({"depth": {"template": "x", "scale": 9}}).field == "control.depth.template"
    assert (
        error_for({"depth": {"template": "perched", "scale": 9, "start": 2}}).field == "control.depth.scale"
    )


def test_a_long_unknown_key_is_cut_in_the_field_name() -> None:
    assert error_for({"k" * 100: None}).field == "control." + "k" * 37 + "..."
    assert (
        error_for({"depth": {"template": "perched", "k" * 100: 1}}).field
        == "control.depth." + "k" * 37 + "..."
    )


def test_json_text_errors_name_the_nested_field() -> None:
    text = json.dumps({**ROBIN, "control": {"openpose": {"template": "perched", "end": 2}}})
    with pytest.raises(RequestError, match=re.escape("invalid 'control.openpose.end': got 2")):
        parse_image_request(text)


def test_animation_requests_have_no_control() -> None:
    with pytest.raises(RequestError) as info:
        parse_animation_request({**ROBIN, "control": {"depth": {"template": "perched"}}})
    assert info.value.field == "control" and "the fields species" in info.value.allowed


# -- canonical form, seed, cache key --------------------------------------------------------------------
# Recorded from birdgen before `control` existed: a request without it keeps these exactly.
BEFORE_CONTROL = [
    (
        {"species": "American Robin"},
        '{"family":null,"format":"png","habitat":null,"height":512,"lighting":"golden-hour",'
        '"negative_prompt":null,"pose":"perched","prompt":null,"scientific_name":null,"season":"breeding",'
        '"seed":null,"species":"American Robin","species_id":null,"steps":1,"style":"photo","width":512}',
        2668404154226955910,
    ),
    (
        {
            "species": "Mésange charbonnière",
            "scientific_name": "Parus major",
            "pose": "flying",
            "width": 1024,
            "height": 768,
            "steps": 4,
            "format": "webp",
            "habitat": "forest",
            "prompt": "a bird",
        },
        '{"family":null,"format":"webp","habitat":"forest","height":768,"lighting":"golden-hour",'
        '"negative_prompt":null,"pose":"flying","prompt":"a bird","scientific_name":"Parus major",'
        '"season":"breeding","seed":null,"species":"Mésange charbonnière","species_id":null,"steps":4,'
        '"style":"photo","width":1024}',
        6292960531061886713,
    ),
    (
        {"species": "Great Tit", "format": "eink", "eink_panel": "296x128", "seed": 7},
        '{"eink_dither":"floyd-steinberg","eink_fit":"subject","eink_palette":"bw","eink_panel":"296x128",'
        '"family":null,"format":"eink","habitat":null,"height":512,"lighting":"golden-hour",'
        '"negative_prompt":null,"pose":"perched","prompt":null,"scientific_name":null,"season":"breeding",'
        '"seed":7,"species":"Great Tit","species_id":null,"steps":1,"style":"photo","width":512}',
        7,
    ),
]


@pytest.mark.parametrize(("fields", "canonical", "seed"), BEFORE_CONTROL)
def test_requests_without_control_keep_their_canonical_json_and_seed(
    fields: dict, canonical: str, seed: int
) -> None:
    for control in ({}, None, {"depth": None}):
        request = ImageRequest(**fields) if control == {} else ImageRequest(**fields, control=control)
        assert request.canonical_json() == request.to_json() == canonical
        assert "control" not in request.to_dict()
        assert request.resolved_seed() == seed


def test_to_dict_carries_the_images_and_canonical_json_their_digest() -> None:
    request = ImageRequest(
        **ROBIN, control={"depth": {"image": PNG_B64, "end": 0.5}, "openpose": {"template": "wading"}}
    )
    assert request.to_dict()["control"] == {
        "openpose": {"template": "wading", "scale": 0.8, "start": 0.0, "end": 1.0},
        "depth": {"image": PNG_B64, "scale": 0.6, "start": 0.0, "end": 0.5},
    }
    assert parse_image_request(request.to_dict()) == request
    assert parse_image_request(request.to_json()) == request
    canonical = request.canonical_json()
    assert PNG_B64 not in canonical
    assert json.loads(canonical)["control"] == {
        "depth": {
            "image_sha256": hashlib.sha256(PNG).hexdigest(),
            "image_bytes": len(PNG),
            "scale": 0.6,
            "start": 0.0,
            "end": 0.5,
        },
        "openpose": {"template": "wading", "scale": 0.8, "start": 0.0, "end": 1.0},
    }
    assert canonical == json.dumps(
        json.loads(canonical), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    # A template-only request's canonical JSON is a request again (gateway batches store it).
    templated = ImageRequest(**ROBIN, control={"depth": {"template": "nesting", "scale": 1.5}})
    assert parse_image_request(templated.canonical_json()) == templated
    assert templated.canonical_json() == templated.to_json()
    # Kind order in the request does not matter; reprs and hashes work.
    swapped = ImageRequest(
        **ROBIN, control={"openpose": {"template": "wading"}, "depth": {"image": PNG_B64, "end": 0.5}}
    )
    assert swapped == request and swapped.canonical_json() == canonical and hash(swapped) == hash(request)


def test_the_same_image_bytes_are_one_cache_key_another_image_another() -> None:
    one = ImageRequest(**ROBIN, control={"depth": {"image": PNG_B64}})
    other = ImageRequest(**ROBIN, control={"depth": {"image": base64.b64encode(PNG + b"x").decode()}})
    assert (
        one.canonical_json() == ImageRequest(**ROBIN, control={"depth": {"image": PNG_B64}}).canonical_json()
    )
    assert one.canonical_json() != other.canonical_json()


def test_control_changes_the_cache_key_but_never_the_seed() -> None:
    plain = ImageRequest(**ROBIN)
    variants = [
        {"depth": {"template": "perched"}},
        {"depth": {"template": "flying"}},
        {"depth": {"template": "perched", "scale": 0.0}},
        {"depth": {"template": "perched", "start": 0.25}},
        {"depth": {"template": "perched", "end": 0.75}},
        {"openpose": {"template": "perched"}},
        {"openpose": {"image": PNG_B64}},
        {"openpose": {"image": PNG_B64}, "depth": {"template": "portrait", "scale": 2}},
    ]
    texts = {plain.canonical_json()}
    for control in variants:
        request = ImageRequest(**ROBIN, control=control)
        texts.add(request.canonical_json())
        assert request.resolved_seed() == plain.resolved_seed(), control
    assert len(texts) == len(variants) + 1
    # An explicit seed still wins, and the e-ink source keeps the control.
    assert ImageRequest(**ROBIN, seed=5, control=variants[0]).resolved_seed() == 5
    eink = ImageRequest(**ROBIN, format="eink", eink_panel="296x128", control=variants[0])
    assert eink.eink_source() == ImageRequest(**ROBIN, control=variants[0])


# -- the step rule --------------------------------------------------------------------------------------
GRID = [0.0, 0.1, 0.25, 1 / 3, 0.4, 0.5, 0.6, 2 / 3, 0.75, 0.9, 1.0]


def diffusers_keep(n: int, s: float, e: float) -> list[float]:
    """The expression of diffusers' StableDiffusionXLControlNetPipeline.__call__ (7.1), copied."""
    timesteps = range(n)
    return [
        1.0 - float(i / len(timesteps) < s or (i + 1) / len(timesteps) > e) for i in range(len(timesteps))
    ]


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_controlnet_keep_is_diffusers_expression(steps: int) -> None:
    for start in GRID:
        for end in GRID:
            if start < end:
                keep = controlnet_keep(steps, start, end)
                assert keep == diffusers_keep(steps, start, end), (steps, start, end)
                assert all(type(k) is float for k in keep)
    assert controlnet_keep(1, 0.0, 1.0) == [1.0] and controlnet_keep(1, 0.0, 0.5) == [0.0]
    assert controlnet_keep(2, 0.5, 1.0) == [0.0, 1.0] and controlnet_keep(4, 0.0, 0.5) == [1.0, 1.0, 0.0, 0.0]


def test_the_copied_expression_is_upstream() -> None:
    """diffusers' source (read, not imported: this module stays torch-free) still holds the expression."""
    spec = importlib.util.find_spec("diffusers")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("diffusers is not installed")
    path = (
        Path(next(iter(spec.submodule_search_locations)))
        / "pipelines/controlnet/pipeline_controlnet_sd_xl.py"
    )
    assert "1.0 - float(i / len(timesteps) < s or (i + 1) / len(timesteps) > e)" in path.read_text()
