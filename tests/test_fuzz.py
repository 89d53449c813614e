"""Fuzzing (hypothesis): malformed and extreme input gets a result or the documented error, nothing else.

Targets: the schema (request mappings and raw text), the prompt builder, the input-image decoder, the
e-ink renderer, the real Triton server (tiny model) and the real gateway. "The documented error" is
RequestError in-process, gRPC INVALID_ARGUMENT naming the field from the server, a 4xx with a JSON
`detail` from the gateway. Runs are deterministic (`derandomize`, no example database) and bounded;
BIRDGEN_FUZZ_SCALE=N multiplies every example count and draws new examples on each run (docs/testing.md).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import secrets
import struct
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from tritonclient.utils import InferenceServerException

from birdgen.client import BirdClient
from birdgen.contracts import CONTROLNET_KINDS, EINK_BUFFER, ENTRY_INPUT, IMAGE, IMAGE_MODEL, METADATA
from birdgen.eink import render_eink, row_bytes, unpack_buffer
from birdgen.eink_panels import DITHERS, FITS, PRESETS
from birdgen.gateway.bodies import animation_request, image_request
from birdgen.input_image import decode_input_image, decode_input_image_base64
from birdgen.prompts import FIELDS
from birdgen.request_error import RequestError
from birdgen.schema import (
    ANIMATION,
    CATALOGUE,
    EINK,
    ENGINE_SVD,
    ENGINES,
    LIMITS,
    SVD,
    VOCABULARY,
    AnimationRequest,
    ImageRequest,
    parse_animation_request,
    parse_image_request,
)
from tests.conftest import ROBIN

SCALE = int(os.environ.get("BIRDGEN_FUZZ_SCALE", "1"))
settings.register_profile(
    "birdgen-fuzz",
    derandomize=SCALE == 1,  # CI: the same examples every run; a long run: new ones each time
    database=None,  # nothing carried between runs or machines
    deadline=None,  # a loaded 2-core machine is slow now and then; speed is not what is tested
    print_blob=True,  # a failure prints @reproduce_failure, so a long run's find can be replayed
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def fuzz(examples: int) -> settings:
    """The fuzz profile with `examples` examples (times BIRDGEN_FUZZ_SCALE)."""
    return settings(settings.get_profile("birdgen-fuzz"), max_examples=examples * SCALE)


Request = ImageRequest | AnimationRequest
Parse = Callable[[Any], Request]
PARSERS: dict[str, Parse] = {"image": parse_image_request, "animation": parse_animation_request}
FIELD_NAMES = sorted(set(ImageRequest.model_fields) | set(AnimationRequest.model_fields))
# C0 and C1 control characters and DEL: none may reach a prompt, a name or an error message.
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")

# -- values: anything JSON (or a Python caller) can hold, extremes included ---------------------------

ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=30)  # controls and lone surrogates too
EXTREME_INTS = st.sampled_from([0, -1, 63, 64, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63), 10**300])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), EXTREME_INTS, st.floats(), ANY_TEXT)
JSON_LIKE = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ANY_TEXT, inner, max_size=3),
    max_leaves=8,
)
# Printable text of any script (no controls, no lone surrogates), the way a user may type a name.
PRINTABLE = st.characters(codec="utf-8", exclude_categories=("Cc", "Cs"))
# A lambda, not filter(str.split): hypothesis 6.170 lets " " and "\xa0" through that one.
NAMES = st.text(PRINTABLE, min_size=1, max_size=LIMITS.max_length.name).filter(lambda s: bool(s.split()))


def spellings(values: list[str]) -> st.SearchStrategy[str]:
    """A canonical value as a client may write it: any case, outer spaces, spaces for dashes."""
    return st.sampled_from(values).flatmap(
        lambda v: st.sampled_from([v, v.upper(), v.title(), f"  {v}\t", v.replace("-", " ")])
    )


def vocabulary(field: str) -> list[str]:
    return VOCABULARY.allowed(field) + list(VOCABULARY.aliases.get(field, {}))


# At the length bound, one past it, and long only before its whitespace runs become single spaces.
LONG_PROMPTS = ["p" * LIMITS.max_length.prompt, "p" * (LIMITS.max_length.prompt + 1), "p" + " \n" * 900 + "q"]
SIZES = list(range(LIMITS.width.min, LIMITS.width.max + 1, 64))
# Each field's plausible values: mostly valid, with the values just past each bound.
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "species": NAMES | st.sampled_from([s.common for s in VOCABULARY.example_species]),
    "scientific_name": st.none() | NAMES,
    "species_id": st.none() | st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.:-]{0,70}\Z"),
    "family": st.none() | spellings(list(CATALOGUE.families)),
    **{field: spellings(vocabulary(field)) for field in FIELDS},
    "habitat": st.none() | spellings(vocabulary("habitat")),
    "width": st.sampled_from([*SIZES, 0, 192, 300, 4096]),
    "height": st.sampled_from([*SIZES, -64, 2112]),
    "steps": st.sampled_from([1, 2, 3, 4, 0, 5]),
    "seed": st.none() | st.integers(0, LIMITS.seed.max) | st.sampled_from([-1, 2**63]),
    "duration_seconds": st.sampled_from([2, 2.0, 2.5, 3.125, 4, 5, 5.5, 1.5]) | st.floats(1, 6),
    "fps": st.integers(ANIMATION.fps.min - 1, ANIMATION.fps.max + 1),
    "format": spellings([*LIMITS.formats, *ANIMATION.formats, "jpg", "bmp"]),
    "poster_frame": st.integers(-1, ANIMATION.max_frames + 1),
    "eink_panel": st.none() | spellings(list(PRESETS.panels)),
    "eink_palette": st.none() | spellings(list(PRESETS.palettes)),
    "eink_dither": st.none() | spellings(list(DITHERS)),
    "eink_fit": st.none() | spellings(list(FITS)),
    "prompt": st.none() | ANY_TEXT | st.sampled_from(LONG_PROMPTS),
    "negative_prompt": st.none() | ANY_TEXT,
    # Templates, the defaults' edges and just past them, and images that are no base64 or no picture.
    "control": st.none()
    | st.dictionaries(
        spellings([*CONTROLNET_KINDS, "canny"]),
        st.fixed_dictionaries(
            {},
            optional={
                "template": spellings(vocabulary("pose")),
                "image": st.sampled_from(["", "not base64!", "aGVsbG8=", "iVBORw0KGgo="]),
                "scale": st.sampled_from([0, 0.0, 0.8, 2, 2.5, -0.1]) | st.floats(0, 2),
                "start": st.sampled_from([0, 0.5, 1, -1]),
                "end": st.sampled_from([0.5, 1, 0, 1.5]),
            },
        ),
        max_size=3,
    ),
    # An animation's engine and SVD fields (docs/svd.md): valid values, each bound and just past it,
    # images that are no base64, valid base64 of no picture (the schema does not decode), empty text.
    "engine": st.none() | spellings([*ENGINES, "sora"]),
    "image": st.none() | st.sampled_from(["", "not base64!", "aGVsbG8=", "iVBORw0KGgo=", "aGVsbG8"]),
    "motion_bucket_id": st.none() | st.sampled_from([0, 1, 127, 255, 256, 127.0]),
    "noise_aug_strength": st.none() | st.sampled_from([0, -0.0, 0.02, 1, 1.01, -0.1]) | st.floats(0, 1),
    "min_guidance_scale": st.none() | st.sampled_from([0, 1.0, 3, 10, 10.5, -1]) | st.floats(0, 10),
    "max_guidance_scale": st.none() | st.sampled_from([0, 1, 3.0, 10, 11]) | st.floats(0, 10),
    "decode_chunk_size": st.none() | st.integers(0, SVD.max_frames + 1),
}
assert set(PLAUSIBLE) == set(FIELD_NAMES), set(FIELD_NAMES) ^ set(PLAUSIBLE)

# Plausible requests (many valid), and wild ones: any field may hold any value, unknown keys beside.
PLAUSIBLE_DICTS = st.fixed_dictionaries(
    {"species": PLAUSIBLE["species"]}, optional={k: v for k, v in PLAUSIBLE.items() if k != "species"}
)
WILD_DICTS = st.builds(
    lambda known, unknown: {**unknown, **known},
    st.fixed_dictionaries({}, optional={k: v | JSON_LIKE for k, v in PLAUSIBLE.items()}),
    st.dictionaries(ANY_TEXT, JSON_LIKE, max_size=2) | st.just({}),
)
# Plausible svd animation requests: the engine, and any of the fields such a request takes.
SVD_DICTS = st.fixed_dictionaries(
    {"species": PLAUSIBLE["species"], "engine": spellings([ENGINE_SVD])},
    optional={k: v for k, v in PLAUSIBLE.items() if k not in ("species", "engine", "behaviour")},
)
REQUEST_DICTS = PLAUSIBLE_DICTS | SVD_DICTS | WILD_DICTS


def cut(text: str) -> st.SearchStrategy[str]:
    return st.integers(0, len(text)).map(lambda i: text[:i])


# Text that is not a request: not JSON, not UTF-8, cut short, nested past the parser's recursion
# limit, numbers past int()'s digit limit, duplicate keys, NaN literals, JSON that is not an object.
EXTREME_TEXTS = [
    "[" * 100_000,
    '{"species": ' + "1" * 5000 + "}",
    '{"species": "x", "width": NaN}',
    '{"species": "x", "seed": Infinity}',
    '{"species": "x", "species": "y"}',
    '{"species": "\\ud800"}',
    '{"\\udfff": 1}',
    "\ufeff" + json.dumps(ROBIN),
    json.dumps(ROBIN) + "\x00",
]
RAW = st.one_of(
    st.binary(max_size=200),
    ANY_TEXT,
    JSON_LIKE.map(json.dumps),
    REQUEST_DICTS.map(json.dumps).flatmap(cut),
    st.sampled_from(EXTREME_TEXTS),
    st.sampled_from([json.dumps(ROBIN).encode("utf-16"), b"\xff\xfe\xfd", b'{"species": "\xc3\x28"}']),
)


def as_bytes(payload: str | bytes) -> bytes:
    """A payload as sent on the wire; a lone surrogate becomes bytes that are not UTF-8."""
    return payload if isinstance(payload, bytes) else payload.encode("utf-8", "surrogatepass")


# -- the schema ---------------------------------------------------------------------------------------


def check_refusal(error: RequestError, data: object) -> None:
    """A refusal names a field (of the request, the unknown key given, or "request") and what is
    allowed, in the message form clients recognise, and the message travels as UTF-8."""
    message = str(error)
    message.encode("utf-8")
    assert not CONTROL.search(message), message  # the got-value is a repr: escapes, never raw bytes
    assert message.startswith((f"invalid {error.field!r}: got ", f"missing {error.field!r}; allowed: "))
    assert error.allowed and f"allowed: {error.allowed}" in message
    keys = set(data) if isinstance(data, Mapping) else set(json_keys(data))
    assert error.field in {*FIELD_NAMES, "request", *keys} or error.field.startswith("control."), error.field


def json_keys(data: object) -> list[str]:
    """The top-level keys of JSON text (unknown ones are named by their refusal), else none."""
    try:
        body = json.loads(data)  # type: ignore[arg-type]
    except (TypeError, ValueError, RecursionError):
        return []
    return list(body) if isinstance(body, dict) else []


def parsed_or_refused(kind: str, data: object) -> Request | None:
    """The request `data` makes, round-tripped through its canonical form; None for a refusal."""
    parse = PARSERS[kind]
    try:
        request = parse(data)
    except RequestError as error:
        check_refusal(error, data)
        event(f"{kind}: refused for {error.field if error.field in FIELD_NAMES else 'other'}")
        return None
    event(f"{kind}: valid" + (" svd" if getattr(request, "engine", None) == ENGINE_SVD else ""))
    # The text sent (a client image itself; the canonical form holds its digest) is the request again.
    text = request.canonical_json()
    again = parse(request.to_json())
    assert again == request and again.canonical_json() == text
    assert parse(request.to_dict()) == request and parse(request) is request
    assert again.resolved_seed() == request.resolved_seed()
    assert LIMITS.seed.contains(request.resolved_seed())
    if isinstance(request, AnimationRequest) and request.engine == ENGINE_SVD and request.image is None:
        still = request.still_request()  # an svd clip without an image draws a valid still
        assert isinstance(still, ImageRequest) and still.seed == request.seed
    return request


@fuzz(200)
@given(fields=REQUEST_DICTS)
@example(fields={"species": "x", "width": float("nan")})
@example(fields={"species": "\ud800"})
@example(fields={"\ud800": 1})
@example(fields={"species": "x", "duration_seconds": float("inf")})
@example(fields={"species": "x", "engine": "SVD", "image": "aGVsbG8=", "fps": 6, "duration_seconds": 0.5})
def test_request_mappings_give_a_request_that_round_trips_or_a_request_error(fields: dict) -> None:
    for kind in PARSERS:
        parsed_or_refused(kind, fields)


@fuzz(200)
@given(payload=RAW)
def test_raw_text_and_bytes_give_a_request_or_a_request_error(payload: str | bytes) -> None:
    for kind in PARSERS:
        parsed_or_refused(kind, payload)
        if isinstance(payload, str):
            parsed_or_refused(kind, as_bytes(payload))


# -- the prompt builder -------------------------------------------------------------------------------


@st.composite
def valid_fields(draw: st.DrawFn, kind: str, served: bool = False) -> dict[str, Any]:
    """Fields every one of which is valid (extremes within the limits). `served`: an image at the
    smallest size and one step, what the real server can afford per example."""
    fields: dict[str, Any] = {"species": draw(PLAUSIBLE["species"])}
    optional = ["scientific_name", "species_id", "family", "season", "lighting", "style", "habitat"]
    optional += ["pose"] if kind == "image" else ["behaviour"]
    for name in optional:
        if draw(st.booleans()):
            fields[name] = draw(PLAUSIBLE[name])
    limits = LIMITS if kind == "image" else ANIMATION
    if served:
        fields |= {"width": 256, "height": 256, "steps": 1}
    else:
        for name in ("width", "height", "steps"):
            limit = getattr(limits, name)
            fields[name] = draw(st.integers(limit.min // limit.multiple_of, limit.max // limit.multiple_of))
            fields[name] *= limit.multiple_of
    fields["seed"] = draw(st.none() | st.integers(0, LIMITS.seed.max) | st.sampled_from([0, LIMITS.seed.max]))
    # Any whitespace: a run of it becomes one space.
    overrides = st.text(PRINTABLE | st.sampled_from(" \t\n\r\x85\u2028"), max_size=60)
    long = st.sampled_from(["bird " * 200, "x" * LIMITS.max_length.prompt, " a\n\tb\r\n "])
    for name in ("prompt", "negative_prompt"):
        fields[name] = draw(st.none() | overrides | long)
    if kind == "image":
        fields["format"] = draw(spellings(LIMITS.formats))
        if fields["format"].strip().lower() == EINK:
            panel = draw(st.sampled_from(list(PRESETS.panels)))
            fields |= {
                "eink_panel": panel,
                "eink_palette": draw(st.none() | st.sampled_from(PRESETS.panels[panel].palettes)),
                "eink_dither": draw(st.none() | st.sampled_from(DITHERS)),
                "eink_fit": draw(st.none() | st.sampled_from(FITS)),
            }
    else:
        fps = draw(st.sampled_from([8, 10, 12, 16, 20, 24]))
        fields |= {"fps": fps, "format": draw(spellings(ANIMATION.formats))}
        fields["duration_seconds"] = draw(st.sampled_from([2, 2.5, 3, 4.5, 5]))
        frames = round(fields["duration_seconds"] * fps)
        fields["poster_frame"] = draw(st.integers(0, frames - 1))
    return fields


@fuzz(200)
@given(data=st.data(), kind=st.sampled_from(list(PARSERS)))
def test_every_valid_request_builds_a_bounded_printable_stable_prompt(data: st.DataObject, kind: str) -> None:
    request = parsed_or_refused(kind, data.draw(valid_fields(kind)))
    assert request is not None, "valid_fields drew an invalid request"
    prompt = VOCABULARY.build(request)
    assert isinstance(prompt.text, str) and isinstance(prompt.negative, str)
    assert prompt.text.strip() and prompt.negative.strip()
    assert len(prompt.text) <= LIMITS.max_length.prompt and len(prompt.negative) <= LIMITS.max_length.prompt
    assert not CONTROL.search(prompt.text) and not CONTROL.search(prompt.negative), prompt
    assert prompt.text == prompt.text.strip() and "  " not in prompt.text
    assert VOCABULARY.build(request) == prompt
    assert VOCABULARY.build(PARSERS[kind](request.canonical_json())) == prompt
    if request.prompt is None:
        assert request.species in prompt.text
    else:
        assert prompt.text == request.prompt


# -- the input-image decoder --------------------------------------------------------------------------

PICTURE_MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "CMYK"]
FORMATS = st.sampled_from(["PNG", "JPEG"])
ORIENTATION = 0x0112  # the EXIF tag


def picture(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return rgb.convert(mode)


def encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


@st.composite
def picture_bytes(draw: st.DrawFn) -> tuple[str, bytes]:
    """("valid", a real PNG/JPEG), ("mutated", one with bytes flipped, cut, inserted or its declared
    size changed), or ("random", bytes)."""
    kind = draw(st.sampled_from(["valid", "mutated", "random"]))
    if kind == "random":
        return kind, draw(st.binary(max_size=300))
    mode = draw(st.sampled_from(PICTURE_MODES))
    fmt = "JPEG" if mode == "CMYK" else draw(FORMATS) if mode in ("L", "RGB") else "PNG"
    size = draw(st.tuples(st.integers(1, 40), st.integers(1, 40)))
    image = picture(mode, *size, draw(st.integers(0, 2**32 - 1)))
    exif = Image.Exif()
    if fmt == "JPEG":  # an EXIF orientation, 0 and 9 included (not defined): exif_transpose reads it
        exif[ORIENTATION] = draw(st.integers(0, 9))
    data = bytearray(encoded(image, fmt, exif=exif))
    if kind == "valid":
        return kind, bytes(data)
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "cut", "insert", "size"]))
        if action == "flip":
            data[where] ^= 1 << draw(st.integers(0, 7))
        elif action == "cut":
            del data[where:]
        elif action == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=16))
        elif fmt == "PNG" and len(data) >= 33:  # a new declared size, the CRC fixed to match
            side = st.integers(0, 2**31 - 1)
            chunk = b"IHDR" + struct.pack(">II", draw(side), draw(side)) + data[20:29]
            data[12:33] = chunk + struct.pack(">I", zlib.crc32(chunk))
        if not data:
            break
    return kind, bytes(data)


@fuzz(200)
@given(case=picture_bytes(), size=st.sampled_from([(1, 1), (7, 5), (64, 64)]))
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")  # Pillow skips the bad tags
def test_input_images_decode_to_rgb_of_the_request_size_or_a_request_error(
    case: tuple[str, bytes], size: tuple[int, int]
) -> None:
    kind, data = case
    try:
        image = decode_input_image(data, "control_image", *size)
    except RequestError as error:
        assert kind != "valid", error
        check_refusal(error, {"control_image": data})
        assert error.field == "control_image" and "PNG or JPEG" in error.allowed
        event(f"{kind}: refused")
        return
    event(f"{kind}: decoded")
    assert image.mode == "RGB" and image.size == size


@fuzz(100)
@given(text=ANY_TEXT | picture_bytes().map(lambda case: base64.b64encode(case[1]).decode()).flatmap(cut))
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
def test_base64_input_images_decode_or_are_refused(text: str) -> None:
    try:
        image = decode_input_image_base64(text, "control_image", 8, 8)
    except RequestError as error:
        check_refusal(error, {"control_image": text})
        return
    assert image.mode == "RGB" and image.size == (8, 8)


# -- e-ink rendering ----------------------------------------------------------------------------------

PANEL_CHOICES = [
    (panel, palette, dither, fit)
    for panel, spec in PRESETS.panels.items()
    for palette in spec.palettes
    for dither in DITHERS
    for fit in FITS
]


@fuzz(60)
@given(
    choice=st.sampled_from(PANEL_CHOICES),
    mode=st.sampled_from(["1", "L", "P", "RGB", "RGBA", "I;16"]),
    size=st.tuples(st.integers(1, 48), st.integers(1, 48)),
    seed=st.integers(0, 2**32 - 1),
    flat=st.booleans(),
)
def test_eink_renders_any_small_picture_to_a_buffer_of_the_documented_length(
    choice: tuple[str, str, str, str], mode: str, size: tuple[int, int], seed: int, flat: bool
) -> None:
    panel, palette, dither, fit = choice
    image = Image.new(mode, size) if flat else picture(mode, *size, seed)  # flat: no edges at all
    result = render_eink(image, panel, palette=palette, dither=dither, fit=fit, metadata={"species": "x"})
    spec, inks = PRESETS.panels[panel], PRESETS.palettes[palette]
    assert (result.width, result.height) == (spec.width, spec.height)
    assert result.bits_per_pixel == inks.bits_per_pixel
    assert len(result.buffer) == row_bytes(spec.width, inks.bits_per_pixel) * spec.height
    values = unpack_buffer(result.buffer, spec.width, spec.height, inks.bits_per_pixel)
    assert int(values.max()) < len(inks.colours)


# -- the real server ----------------------------------------------------------------------------------

SERVER_PAYLOADS = st.one_of(
    valid_fields("image", served=True).map(json.dumps),
    WILD_DICTS.map(json.dumps),
    RAW,
)


# Whitespace, insignificant in JSON, that makes this test's payloads its own (see the test below).
PAD = b" " * 8


def infer(url: str, payload: bytes) -> grpcclient.InferResult:
    """The payload as the image entry's request tensor, bypassing the client's own checks."""
    tensor = grpcclient.InferInput(ENTRY_INPUT, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([payload], dtype=np.object_))
    with grpcclient.InferenceServerClient(url) as client:
        return client.infer(IMAGE_MODEL, [tensor], client_timeout=120)


@pytest.mark.triton
def test_the_server_answers_every_payload_with_a_result_or_invalid_argument(server) -> None:  # type: ignore[no-untyped-def]
    """What the schema refuses in-process, the server refuses with the same message (INVALID_ARGUMENT);
    what it accepts, the server answers with every output. Then it is still live and serving.

    One exception, Triton's and not birdgen's: its response cache keeps a refused request's answer
    as an empty success (no outputs) and gives that to every repeat of the same bytes (docs/testing.md,
    "Fuzzing"). A payload this test sent and saw refused may come back so the second time; and every
    payload ends in PAD, so no other test's payload is sent (Hypothesis draws literals from the test
    sources, such as test_serving's b"{not json") and none sent before is met.
    """
    refused: set[bytes] = set()

    @fuzz(40)
    @given(payload=SERVER_PAYLOADS)
    @example(payload=b"\xff\xfe\xfd\x80")
    @example(payload=json.dumps({**ROBIN, "species": "x" * 100_000}))
    @example(payload=json.dumps({**ROBIN, "prompt": "p" * 100_000}))
    @example(payload="[" * 100_000)
    def answer(payload: str | bytes) -> None:
        data = as_bytes(payload) + PAD
        try:
            request = parse_image_request(data)
        except RequestError as error:
            event("refused")
            try:
                empty = infer(server.grpc_url, data)
            except InferenceServerException as caught:
                assert "INVALID_ARGUMENT" in str(caught.status()), caught
                assert str(error) in caught.message()
                refused.add(data)
                return
            assert data in refused, "refused in-process, answered by the server"
            assert all(empty.as_numpy(name) is None for name in (IMAGE, EINK_BUFFER, METADATA))
            return
        event(f"served as {request.format}")
        result = infer(server.grpc_url, data)
        image, buffer = result.as_numpy(IMAGE)[0], result.as_numpy(EINK_BUFFER)[0]
        metadata = json.loads(result.as_numpy(METADATA)[0])
        assert image[:8] == b"\x89PNG\r\n\x1a\n" if request.format in ("png", EINK) else len(image) > 100
        assert bool(buffer) == (request.format == EINK)
        picture = request.eink_source() if request.format == EINK else request  # what was drawn
        assert metadata["seed"] == request.resolved_seed() and metadata["request"] == picture.to_dict()

    answer()
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(IMAGE_MODEL)
    with BirdClient(server.grpc_url) as client:
        assert client.generate_image(**{**ROBIN, "seed": 31}).metadata["seed"] == 31


# -- the real gateway ---------------------------------------------------------------------------------

GATEWAY_PATHS = {"/api/v1/generate/image": image_request, "/api/v1/generate/gif": animation_request}
BATCH = "/api/v1/batch/images"


def gateway_accepts(path: str, content: bytes) -> bool:
    """Whether the gateway would take this body (and so generate): the fuzz sends only refusals."""
    try:
        body = json.loads(content)
        if path == BATCH:
            items = body.get("items") if isinstance(body, dict) else None
            if not isinstance(items, list) or not 1 <= len(items) <= LIMITS.batch.max_items:
                return False
            return all(image_request(item).format != EINK for item in items)
        GATEWAY_PATHS[path](body)
        return True
    except (ValueError, RecursionError):  # RequestError is a ValueError
        return False


GATEWAY_BODIES = st.one_of(
    RAW.map(as_bytes),
    WILD_DICTS.map(lambda d: json.dumps(d).encode()),
    st.lists(REQUEST_DICTS | JSON_LIKE, max_size=3).map(lambda items: json.dumps({"items": items}).encode()),
)


@pytest.mark.triton
def test_the_gateway_answers_malformed_bodies_with_a_4xx_json_error(gateway) -> None:  # type: ignore[no-untyped-def]
    """Bodies the gateway must refuse (it would generate for the others) get a 4xx with a JSON
    `detail`, never a 5xx or a dropped connection; then /health is still 200."""
    with gateway.client() as http:

        @fuzz(30)
        @given(path=st.sampled_from([*GATEWAY_PATHS, BATCH]), content=GATEWAY_BODIES)
        @example(path="/api/v1/generate/image", content=b'{"species": "x", "width": NaN}')
        @example(path="/api/v1/generate/image", content=b'{"\\ud800": 1}')
        @example(path="/api/v1/generate/gif", content=b'{"species": "\\udfff"}')
        @example(path="/api/v1/generate/image", content=b"[" * 50_000)
        @example(path="/api/v1/generate/image", content=b'{"species": ' + b"1" * 5000 + b"}")
        @example(path=BATCH, content=b'{"items": NaN}')
        @example(path=BATCH, content=b'{"items": [{"species": "x", "seed": -Infinity}]}')
        def post(path: str, content: bytes) -> None:
            assume(not gateway_accepts(path, content))
            # Its own API key: a fresh rate-limit window, so every example reaches validation.
            headers = {"Content-Type": "application/json", "X-API-Key": secrets.token_hex(8)}
            response = http.post(path, content=content, headers=headers)
            assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
            assert response.json()["detail"]

        post()
        assert http.get("/health").status_code == 200
