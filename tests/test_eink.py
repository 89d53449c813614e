"""E-ink output: exact driver bytes per panel, dithering that keeps the tone, crops that keep the bird."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from birdgen.eink import EinkResult, pack_buffer, render_eink, row_bytes, unpack_buffer
from birdgen.eink_panels import DITHERS, FITS, PRESETS, EinkPresets
from birdgen.media import DIGITAL_SOURCE_TYPE, PNG_XMP_KEY, encode_image, read_metadata
from birdgen.prompts import DataFileError
from birdgen.schema import RequestError

PRESET_PAIRS = [(name, palette) for name, panel in PRESETS.panels.items() for palette in panel.palettes]
SOURCE = {"species": "European Robin", "seed": 7, "prompt": "a European robin", "model_version": "test-1"}
# Every panel's white, as a full byte: 1 bit 11111111, 2 bits 11 x 4, 4 bits (value 1) 0001 0001.
WHITE_BYTE = {1: 0xFF, 2: 0xFF, 4: 0x11}


def _png(pixels: np.ndarray, fmt: str = "png") -> bytes:
    """A cached birdgen image: encoded with its label and metadata, as the service stores it."""
    return encode_image(pixels, fmt, SOURCE)


def _flat(width: int, height: int, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.tile(np.array(rgb, dtype=np.uint8), (height, width, 1))


def _palette_rgb(palette: str) -> np.ndarray:
    return np.array([c.rgb for c in PRESETS.palettes[palette].colours], dtype=np.uint8)


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def test_bundled_presets_cover_the_issue() -> None:
    """The panel sizes and palettes issue 8 asks for, with the buffer depth their drivers use."""
    offered = {
        (PRESETS.panels[panel].width, PRESETS.panels[panel].height, palette): bits
        for panel, palette in PRESET_PAIRS
        for bits in [PRESETS.palettes[palette].bits_per_pixel]
    }
    required = {
        (296, 128, "bw"): 1,
        (400, 300, "bw"): 1,
        (400, 300, "grey4"): 2,
        (800, 480, "bw"): 1,
        (800, 480, "7colour"): 4,
    }
    assert required.items() <= offered.items()


@pytest.mark.parametrize(("panel", "palette"), PRESET_PAIRS)
def test_buffer_size_layout_and_preview_agree(panel: str, palette: str) -> None:
    spec, inks = PRESETS.panels[panel], PRESETS.palettes[palette]
    picture = np.random.default_rng(1).integers(0, 256, (300, 500, 3), dtype=np.uint8)
    result = render_eink(_png(picture), panel, palette=palette)

    bits = inks.bits_per_pixel
    assert (result.width, result.height, result.bits_per_pixel) == (spec.width, spec.height, bits)
    assert len(result.buffer) == -(-spec.width * bits // 8) * spec.height
    assert result.layout["row_bytes"] * spec.height == len(result.buffer)
    values = unpack_buffer(result.buffer, result.width, result.height, bits)
    assert values.shape == (spec.height, spec.width)
    assert values.max() < len(inks.colours)
    assert len(np.unique(values)) > 1
    # The preview shows exactly the inks the buffer selects.
    np.testing.assert_array_equal(_decode(result.preview_png), _palette_rgb(palette)[values])


# First bytes of a row holding the palette's colours in order, then white; written out by hand from
# GxEPD2's conventions, not computed by the code under test.
FIRST_ROW_BYTES = {
    "bw": [0b0111_1111],  # black, white x 7: MSB = leftmost pixel, 1 = white
    "grey4": [0b00_01_10_11, 0xFF],  # black, dark grey, light grey, white; then white
    "7colour": [0x01, 0x23, 0x45, 0x61],  # black white, green blue, red yellow, orange white
}


@pytest.mark.parametrize(("panel", "palette"), PRESET_PAIRS)
def test_colour_codes_and_bit_order_match_the_driver(panel: str, palette: str) -> None:
    spec = PRESETS.panels[panel]
    picture = _flat(spec.width, spec.height, (255, 255, 255))
    inks = _palette_rgb(palette)
    picture[0, : len(inks)] = inks
    result = render_eink(_png(picture), panel, palette=palette, dither="none", fit="cover")
    expected = FIRST_ROW_BYTES[palette]
    assert list(result.buffer[: len(expected)]) == expected
    bits = PRESETS.palettes[palette].bits_per_pixel
    assert set(result.buffer[len(expected) :]) == {WHITE_BYTE[bits]}


# One black pixel at x=9 on row 2 of a white picture: which byte and which bits it lands in.
SINGLE_PIXEL = {1: (9 // 8, 0b1011_1111), 2: (9 // 4, 0b11_00_11_11), 4: (9 // 2, 0x10)}


@pytest.mark.parametrize(("panel", "palette"), PRESET_PAIRS)
def test_single_pixel_lands_in_its_byte(panel: str, palette: str) -> None:
    spec = PRESETS.panels[panel]
    bits = PRESETS.palettes[palette].bits_per_pixel
    picture = _flat(spec.width, spec.height, (255, 255, 255))
    picture[2, 9] = 0
    result = render_eink(_png(picture), panel, palette=palette, dither="none", fit="cover")
    offset, value = SINGLE_PIXEL[bits]
    expected = bytearray([WHITE_BYTE[bits]]) * len(result.buffer)
    expected[2 * row_bytes(spec.width, bits) + offset] = value
    assert result.buffer == bytes(expected)


def test_rows_are_padded_to_whole_bytes() -> None:
    """A 10 px row is 2 bytes at 1 bit (6 pad bits), 3 at 2 bits, 5 at 4 bits; padding is `pad`."""
    black = np.zeros((2, 10), dtype=np.uint8)
    assert pack_buffer(black, 1, pad=1) == bytes([0x00, 0b0011_1111]) * 2
    assert pack_buffer(black, 2, pad=3) == bytes([0x00, 0x00, 0b0000_1111]) * 2
    assert pack_buffer(black, 4, pad=1) == bytes([0x00] * 5) * 2


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("width", [1, 7, 8, 10, 13])
def test_pack_unpack_round_trip(bits: int, width: int) -> None:
    values = np.random.default_rng(width).integers(0, 1 << bits, (5, width), dtype=np.uint8)
    packed = pack_buffer(values, bits)
    assert len(packed) == row_bytes(width, bits) * 5
    np.testing.assert_array_equal(unpack_buffer(packed, width, 5, bits), values)


def test_checkerboard_bytes() -> None:
    board = np.indices((2, 16)).sum(axis=0) % 2  # row 0 starts black (0), row 1 white (1)
    assert pack_buffer(board, 1) == bytes([0x55, 0x55, 0xAA, 0xAA])
    assert pack_buffer(board * 3, 2) == bytes([0b00_11_00_11] * 4 + [0b11_00_11_00] * 4)


def test_documented_examples() -> None:
    """The worked bytes in docs/eink.md."""
    assert pack_buffer(np.array([[0, 1, 1, 0, 0, 0, 1, 1]]), 1) == b"\x63"
    assert pack_buffer(np.array([[0, 1, 2, 3]]), 2) == b"\x1b"
    assert pack_buffer(np.array([[4, 5, 1, 0]]), 4) == b"\x45\x10"


def test_pack_and_unpack_reject_bad_input() -> None:
    with pytest.raises(ValueError, match=r"0\.\.1"):
        pack_buffer(np.full((2, 8), 2), 1)
    with pytest.raises(ValueError, match="bits_per_pixel"):
        pack_buffer(np.zeros((2, 8), dtype=np.uint8), 3)
    with pytest.raises(ValueError, match="is 4 bytes, got 3"):
        unpack_buffer(b"\x00\x00\x00", 10, 2, 1)


def _gradient(width: int = 400, height: int = 300) -> np.ndarray:
    """A horizontal grey ramp 0 -> 255, at the panel's size so no resampling blurs it."""
    ramp = np.linspace(0, 255, width).round().astype(np.uint8)
    return np.repeat(np.tile(ramp, (height, 1))[..., None], 3, axis=2)


@pytest.mark.parametrize("dither", ["floyd-steinberg", "ordered"])
def test_gradient_dithers_to_its_darkness(dither: str) -> None:
    picture = _gradient()
    result = render_eink(_png(picture), "400x300", palette="bw", dither=dither, fit="cover")
    black = unpack_buffer(result.buffer, 400, 300, 1) == 0
    darkness = 1 - picture[..., 0] / 255
    assert abs(black.mean() - darkness.mean()) <= 0.02
    assert abs(darkness.mean() - 0.5) < 0.01
    for quarter in range(4):
        columns = slice(quarter * 100, (quarter + 1) * 100)
        assert abs(black[:, columns].mean() - darkness[:, columns].mean()) <= 0.03, quarter


def test_gradient_without_dithering_is_a_hard_threshold() -> None:
    """The reference the dithered results are measured against: no mixing, just nearest ink."""
    result = render_eink(_png(_gradient()), "400x300", palette="bw", dither="none", fit="cover")
    black = unpack_buffer(result.buffer, 400, 300, 1) == 0
    assert black[:, :200].all() and not black[:, 200:].any()


@pytest.mark.parametrize("dither", ["floyd-steinberg", "ordered"])
def test_grey4_keeps_the_mean_tone(dither: str) -> None:
    picture = _gradient()
    result = render_eink(_png(picture), "400x300", palette="grey4", dither=dither, fit="cover")
    levels = unpack_buffer(result.buffer, 400, 300, 2)
    assert abs(levels.mean() * 85 - picture.mean()) <= 0.02 * 255
    assert np.bincount(levels.ravel(), minlength=4).min() > 0.1 * levels.size


def test_ordered_dither_of_mid_grey_is_the_bayer_checkerboard() -> None:
    result = render_eink(_png(_flat(400, 300, (128, 128, 128))), "400x300", dither="ordered", fit="cover")
    assert result.buffer[:50] == b"\x55" * 50  # row 0: black, white, black, ...
    assert result.buffer[50:100] == b"\xaa" * 50


def test_grey_palettes_follow_luminance() -> None:
    """Blue is dark, green light, yellow nearly white; by RGB distance all three would be mid-grey."""
    picture = np.zeros((300, 400, 3), dtype=np.uint8)
    for stripe, rgb in enumerate([(0, 0, 255), (0, 255, 0), (255, 255, 0)]):
        picture[:, stripe * 133 : (stripe + 1) * 133] = rgb
    result = render_eink(_png(picture), "400x300", palette="grey4", dither="none", fit="cover")
    levels = unpack_buffer(result.buffer, 400, 300, 2)
    assert [int(levels[0, 60]), int(levels[0, 200]), int(levels[0, 330])] == [0, 2, 3]


def test_7colour_maps_each_ink_to_its_code() -> None:
    inks = _palette_rgb("7colour")
    picture = np.repeat(np.repeat(inks[None], 480, axis=0), 800 // len(inks) + 1, axis=1)[:, :800]
    for dither in DITHERS:
        result = render_eink(_png(picture), "800x480-7colour", dither=dither, fit="cover")
        values = unpack_buffer(result.buffer, 800, 480, 4)
        stripe = 800 // len(inks) + 1
        for code in range(len(inks)):
            middle = values[:, code * stripe + 10 : (code + 1) * stripe - 10]
            assert (middle == code).all(), (dither, code)


def _square_picture(width: int, height: int, left: int, top: int, side: int = 60) -> np.ndarray:
    """One black square on a light background textured in 8 px blocks (+-30 levels).

    The texture survives the saliency downscale: its weak edges cover the whole picture, so they
    would pull the centre of mass of all edges far towards the middle.
    """
    blocks = np.random.default_rng(3).integers(-30, 31, (height // 8 + 1, width // 8 + 1))
    texture = np.kron(blocks, np.ones((8, 8), dtype=int))[:height, :width, None]
    picture = (190 + texture).repeat(3, axis=2).astype(np.uint8)
    picture[top : top + side, left : left + side] = 0
    return picture


def _black_pixels(result: EinkResult) -> int:
    return int((unpack_buffer(result.buffer, result.width, result.height, result.bits_per_pixel) == 0).sum())


@pytest.mark.parametrize(
    ("size", "square", "panel"),
    [
        ((1024, 512), (860, 220), "400x300"),  # wide picture, bird near the right edge
        ((512, 512), (300, 30), "296x128"),  # square picture, bird near the top
    ],
)
def test_subject_crop_keeps_an_off_centre_subject(
    size: tuple[int, int], square: tuple[int, int], panel: str
) -> None:
    picture = _square_picture(*size, *square)
    data = _png(picture)
    subject = render_eink(data, panel, dither="none", fit="subject")
    cover = render_eink(data, panel, dither="none", fit="cover")

    left, top, right, bottom = subject.metadata["eink"]["crop"]
    assert left <= square[0] and square[0] + 60 <= right
    assert top <= square[1] and square[1] + 60 <= bottom
    scale = subject.width / (right - left)
    expected = (60 * scale) ** 2
    assert abs(_black_pixels(subject) - expected) <= 0.15 * expected
    assert _black_pixels(cover) < 0.5 * expected  # a centre crop loses it: the test can tell


def test_subject_crop_of_a_featureless_picture_is_centred() -> None:
    result = render_eink(_png(_flat(512, 512, (200, 200, 200))), "296x128", fit="subject")
    left, top, right, bottom = result.metadata["eink"]["crop"]
    assert (left, right, bottom - top) == (0, 512, round(512 * 128 / 296))
    assert abs(top - (512 - bottom)) <= 1


def test_contain_letterboxes_with_white() -> None:
    result = render_eink(_png(_flat(512, 512, (0, 0, 0))), "296x128", dither="none", fit="contain")
    values = unpack_buffer(result.buffer, 296, 128, 1)
    assert (values[:, :80] == 1).all() and (values[:, -80:] == 1).all()  # bars: (296 - 128) / 2 = 84 px
    assert (values[:, 90:-90] == 0).all()
    assert result.metadata["eink"]["crop"] == [0, 0, 512, 512]


@pytest.mark.parametrize(
    ("field", "options", "value", "allowed"),
    [
        ("panel", {}, "640x384", list(PRESETS.panels)),
        ("palette", {"palette": "7colour"}, "7colour", ["bw", "grey4"]),
        ("dither", {"dither": "atkinson"}, "atkinson", list(DITHERS)),
        ("fit", {"fit": "stretch"}, "stretch", list(FITS)),
        ("dither", {"dither": 3}, 3, list(DITHERS)),
    ],
)
def test_bad_names_raise_request_error(field: str, options: dict, value: object, allowed: list[str]) -> None:
    panel = value if field == "panel" else "400x300"
    with pytest.raises(RequestError) as caught:
        render_eink(b"never decoded: names are checked first", panel, **options)
    assert (caught.value.field, caught.value.value) == (field, value)
    for name in allowed:
        assert name in caught.value.allowed
    assert str(caught.value).startswith(f"invalid {field!r}")


def test_none_picks_the_defaults() -> None:
    data = _png(_gradient())
    chosen = render_eink(data, "296x128", palette=None, dither=None, fit=None)
    assert chosen == render_eink(data, "296x128", palette="bw", dither="floyd-steinberg", fit="subject")


def test_names_ignore_case_and_spaces() -> None:
    result = render_eink(_png(_gradient()), " 400X300 ", palette="Grey4", dither="Ordered ", fit="COVER")
    assert (result.panel, result.palette, result.metadata["eink"]["dither"]) == (
        "400x300",
        "grey4",
        "ordered",
    )


def test_preview_keeps_the_ai_label_and_adds_the_eink_settings() -> None:
    result = render_eink(_png(_gradient()), "400x300", palette="grey4", dither="ordered", fit="cover")
    metadata = read_metadata(result.preview_png)
    assert metadata == result.metadata
    assert {k: metadata[k] for k in SOURCE} == SOURCE
    assert metadata["eink"] == {
        "panel": "400x300",
        "palette": "grey4",
        "dither": "ordered",
        "fit": "cover",
        "width": 400,
        "height": 300,
        "bits_per_pixel": 2,
        "crop": [0, 0, 400, 300],
        "layout": result.layout,
    }
    with Image.open(io.BytesIO(result.preview_png)) as preview:
        assert preview.format == "PNG" and preview.size == (400, 300)
        assert DIGITAL_SOURCE_TYPE in preview.info[PNG_XMP_KEY]
        assert preview.info["Description"] == "AI-generated image of European Robin by birdgen"


@pytest.mark.parametrize("fmt", ["png", "webp", "jpeg"])
def test_renders_from_any_cached_format(fmt: str) -> None:
    result = render_eink(_png(_square_picture(512, 512, 100, 100), fmt), "296x128", palette="grey4")
    assert read_metadata(result.preview_png)["seed"] == SOURCE["seed"]


def test_same_input_gives_the_same_bytes() -> None:
    data = _png(_square_picture(512, 512, 100, 300))
    first, second = (render_eink(data, "800x480-7colour") for _ in range(2))
    assert (first.buffer, first.preview_png) == (second.buffer, second.preview_png)


def test_pil_image_needs_metadata_and_metadata_overrides() -> None:
    picture = Image.fromarray(_gradient())
    with pytest.raises(ValueError, match="metadata="):
        render_eink(picture, "400x300")
    result = render_eink(picture, "400x300", metadata={"seed": 9})
    assert read_metadata(result.preview_png)["seed"] == 9
    result = render_eink(_png(_gradient()), "400x300", metadata={"seed": 10})
    assert read_metadata(result.preview_png)["seed"] == 10


def test_unlabelled_or_broken_bytes_are_refused() -> None:
    plain = io.BytesIO()
    Image.fromarray(_gradient()).save(plain, "PNG")
    with pytest.raises(ValueError, match="no birdgen metadata"):
        render_eink(plain.getvalue(), "400x300")
    with pytest.raises(ValueError, match="not a readable image"):
        render_eink(b"not an image", "400x300")


def _write_presets(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "eink_panels.yaml"
    path.write_text(text, encoding="utf-8")
    return path


VALID = """
palettes:
  bw:
    bits_per_pixel: 1
    library: GxEPD2
    display_class: GxEPD2_BW
    colours: [{name: black, rgb: [0, 0, 0]}, {name: white, rgb: [255, 255, 255]}]
panels:
  400x300: {model: GDEW042T2, driver: GxEPD2_420, width: 400, height: 300, rotation: 0, palettes: [bw]}
"""


def test_a_valid_presets_file_loads(tmp_path: Path) -> None:
    presets = EinkPresets.load(_write_presets(tmp_path, VALID))
    assert list(presets.panels) == ["400x300"] and presets.palettes["bw"].white_value == 1


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("palettes: [bw]}", "palettes: [grey4]}", "panels.400x300.palettes"),
        ("bits_per_pixel: 1", "bits_per_pixel: 3", "bits_per_pixel"),
        ("{name: white, rgb: [255, 255, 255]}", "{name: white, rgb: [255, 255, 256]}", "rgb"),
        ("{name: white", "{name: paper", "needs 'white'"),
        ("colours: [", "colours: [{name: grey, rgb: [9, 9, 9]}, ", "do not fit"),
        ("400x300:", "400X300:", "lower-case"),
    ],
)
def test_invalid_presets_fail_at_load(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert old in VALID
    with pytest.raises(DataFileError, match=message):
        EinkPresets.load(_write_presets(tmp_path, VALID.replace(old, new)))
