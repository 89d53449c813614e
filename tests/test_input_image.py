"""Client-supplied pictures: every refusal is a RequestError naming the field, checked in the promised
order (bytes, format, declared size before decoding, then the decode), and every mode becomes RGB."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from birdgen.input_image import MAX_BASE64_CHARS, decode_input_image, decode_input_image_base64
from birdgen.request_error import RequestError
from birdgen.schema import LIMITS

FIELD = "control_image"


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def halves(size: tuple[int, int] = (64, 32)) -> Image.Image:
    """Left half red, right half blue: shows a rotation or a mirror."""
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    pixels[:, : size[0] // 2] = (255, 0, 0)
    pixels[:, size[0] // 2 :] = (0, 0, 255)
    return Image.fromarray(pixels, "RGB")


def refusal(data: bytes, width: int = 64, height: int = 32) -> RequestError:
    with pytest.raises(RequestError) as caught:
        decode_input_image(data, FIELD, width, height)
    error = caught.value
    assert error.field == FIELD and "PNG or JPEG" in error.allowed
    assert str(error).startswith(f"invalid {FIELD!r}: got ")
    return error


def png_base64(width: int = 300, height: int = 200, seed: int = 0) -> str:
    """A client's picture (control image, svd image) as base64: seeded noise at a size other than the
    request's, so both the served and the reference side resize it."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return base64.b64encode(encode(Image.fromarray(pixels))).decode()


def with_size(png: bytes, width: int, height: int) -> bytes:
    """`png` whose IHDR declares width × height (CRC fixed), its pixel data left as it was."""
    ihdr = png[12:29]  # b"IHDR" + 13 bytes of fields
    fields = struct.pack(">II", width, height) + ihdr[12:]
    chunk = b"IHDR" + fields
    return png[:12] + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[33:]


def test_png_and_jpeg_decode_to_rgb_pixels_of_the_request_size() -> None:
    picture = halves()
    png = decode_input_image(encode(picture), FIELD, 64, 32)
    assert png.mode == "RGB" and png.size == (64, 32)
    assert np.array_equal(np.asarray(png), np.asarray(picture))  # lossless, no resize: the same pixels
    jpeg = decode_input_image(encode(picture, "JPEG", quality=95), FIELD, 64, 32)
    assert jpeg.mode == "RGB" and np.abs(np.asarray(jpeg, np.int16) - np.asarray(picture)).mean() < 5
    stretched = decode_input_image(encode(picture), FIELD, 256, 512)
    assert stretched.size == (256, 512) and stretched.mode == "RGB"
    assert stretched.getpixel((10, 256))[0] > 200 and stretched.getpixel((245, 256))[2] > 200


def test_too_many_bytes_is_refused_before_reading_them() -> None:
    error = refusal(b"\x89PNG" + bytes(LIMITS.input_image.max_bytes))
    assert error.value == f"{LIMITS.input_image.max_bytes + 4} bytes"
    assert f"at most {LIMITS.input_image.max_bytes} bytes" in error.allowed


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "WEBP", "TIFF", "ICO"])
def test_other_formats_are_refused(fmt: str) -> None:
    error = refusal(encode(halves((32, 32)), fmt))
    assert "bytes starting" in str(error.value)


@pytest.mark.parametrize("data", [b"", b"not an image", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", bytes(100)])
def test_empty_and_garbage_bytes_are_refused(data: bytes) -> None:
    refusal(data)


def test_a_header_declared_bomb_is_refused_before_decoding() -> None:
    # A 1x1 picture's data behind a header claiming 5000 x 5000: decoding first would report a
    # truncated file; the refusal names the declared size, so it came from the header alone.
    small = encode(Image.new("L", (1, 1)))
    error = refusal(with_size(small, 5000, 5000))
    assert error.value == "a PNG image of 5000 × 5000 pixels"
    assert f"{LIMITS.input_image.max_pixels} pixels" in error.allowed
    # Far past Pillow's own bound, which refuses in Image.open: the same kind of error.
    assert "pixels" in str(refusal(with_size(small, 60000, 60000)).value)


def test_the_pixel_bound_holds_with_pillows_own_check_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    small = encode(Image.new("L", (1, 1)))
    assert refusal(with_size(small, 60000, 60000)).value == "a PNG image of 60000 × 60000 pixels"
    side = int(LIMITS.input_image.max_pixels**0.5)
    refusal(with_size(small, side + 1, side))  # one row past the bound


def test_a_real_compressed_bomb_is_refused_without_decoding() -> None:
    # 25 Mpx of zeros compress to ~25 KB: small on the wire, 25 MB (75 MB as RGB) once decoded.
    bomb = encode(Image.new("1", (5000, 5000)))
    assert len(bomb) < LIMITS.input_image.max_bytes // 100
    assert refusal(bomb).value == "a PNG image of 5000 × 5000 pixels"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_refused(fmt: str) -> None:
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = encode(noisy, fmt)
    for cut in (len(data) // 2, len(data) * 3 // 4, 40):
        error = refusal(data[:cut], 64, 64)
        assert "could not be decoded" in error.allowed or "bytes starting" in str(error.value)


def test_a_corrupt_png_chunk_is_refused() -> None:
    data = bytearray(encode(halves()))
    data[40] ^= 0xFF  # inside IDAT: the CRC no longer matches
    refusal(bytes(data))


def test_sixteen_bit_grey_keeps_its_tones() -> None:
    levels = np.array([[0, 0x4000, 0x8000, 0xFFFF]], dtype=np.uint16)
    data = encode(Image.fromarray(levels))
    with Image.open(io.BytesIO(data)) as stored:
        assert stored.mode.startswith("I")  # a true 16-bit PNG
    decoded = np.asarray(decode_input_image(data, FIELD, 4, 1))
    # Scaled to 8 bits (the high byte), not clipped at 255: mid-grey stays mid-grey.
    assert decoded[0, :, 0].tolist() == [0, 0x40, 0x80, 0xFF]
    assert (decoded[..., 0] == decoded[..., 1]).all() and (decoded[..., 1] == decoded[..., 2]).all()


def test_cmyk_jpeg_becomes_rgb() -> None:
    red = Image.new("CMYK", (16, 16), (0, 255, 255, 0))
    data = encode(red, "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as stored:
        assert stored.mode == "CMYK"
    r, g, b = decode_input_image(data, FIELD, 16, 16).getpixel((8, 8))
    assert r > 230 and g < 30 and b < 30


def test_transparent_pixels_become_black_whatever_colour_they_hide() -> None:
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0] = [(255, 255, 255, 0), (200, 100, 50, 255), (200, 100, 50, 128)]
    decoded = np.asarray(decode_input_image(encode(Image.fromarray(rgba, "RGBA")), FIELD, 3, 1))
    assert decoded[0, 0].tolist() == [0, 0, 0]
    assert decoded[0, 1].tolist() == [200, 100, 50]
    assert np.abs(decoded[0, 2].astype(int) - [100, 50, 25]).max() <= 1  # premultiplied
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 255, 255, 0, 128, 0])
    palette.putpixel((1, 0), 1)
    decoded = np.asarray(decode_input_image(encode(palette, transparency=0), FIELD, 2, 1))
    assert decoded[0].tolist() == [[0, 0, 0], [0, 128, 0]]


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"])
def test_every_png_mode_becomes_rgb(mode: str) -> None:
    decoded = decode_input_image(encode(Image.new(mode, (8, 8))), FIELD, 16, 16)
    assert decoded.mode == "RGB" and decoded.size == (16, 16)


def test_the_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated 90° clockwise
    data = encode(halves((64, 32)), "JPEG", quality=95, exif=exif)
    shown = decode_input_image(data, FIELD, 32, 64)
    assert shown.size == (32, 64)
    # The stored left (red) half is on top once rotated, the blue one below.
    assert shown.getpixel((16, 8))[0] > 200 and shown.getpixel((16, 56))[2] > 200


def test_base64_text_decodes_like_its_bytes() -> None:
    data = encode(halves())
    decoded = decode_input_image_base64(base64.b64encode(data).decode(), FIELD, 64, 32)
    assert decoded.tobytes() == decode_input_image(data, FIELD, 64, 32).tobytes()


@pytest.mark.parametrize(
    "text",
    ["not base64!", "QUJD\nREVG", "QUJDRA", "ÄÖÜ=", "A" * (MAX_BASE64_CHARS + 1)],
    ids=["alphabet", "line-break", "padding", "non-ascii", "too-long"],
)
def test_bad_base64_is_refused_naming_the_field(text: str) -> None:
    with pytest.raises(RequestError) as caught:
        decode_input_image_base64(text, FIELD, 64, 32)
    assert caught.value.field == FIELD and "base64" in caught.value.allowed


def test_base64_of_the_largest_allowed_file_is_not_refused_for_its_length() -> None:
    assert len(base64.b64encode(bytes(LIMITS.input_image.max_bytes))) == MAX_BASE64_CHARS
