"""Client-supplied pictures (ControlNet control images, SVD conditioning images): bytes in, RGB out.

Why one module: an uploaded file is the one request input that a decoder library parses, and image
decoders are where malformed input does damage (decompression bombs, truncated streams, odd modes).
Every check happens here, in a fixed order and before any pixel is decoded where it can, and every
failure is a RequestError naming the field and what is allowed, so the gRPC and HTTP layers answer
INVALID_ARGUMENT / 422 as for any other bad field. The bounds are `input_image` in data/limits.yaml.
No torch here: the client and the gateway may check a picture before sending it.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from birdgen.request_error import RequestError
from birdgen.schema import LIMITS

_LIMITS = LIMITS.input_image
# Pillow's plugin names for the formats limits.yaml allows (JPEG's opener also returns MPO files,
# the multi-picture JPEGs of some cameras; their first picture is a plain JPEG).
_PILLOW_FORMATS = {"png": "PNG", "jpeg": "JPEG"}
# The longest base64 text that can decode to max_bytes (3 bytes in 4 characters): the schema's.
MAX_BASE64_CHARS = _LIMITS.max_base64_chars
# What Pillow raises on a corrupt or truncated file: OSError covers "image file is truncated" and
# "broken data stream" (UnidentifiedImageError is one), SyntaxError a bad chunk or marker; the rest
# come from plugins parsing header fields (EXIF, ICC) with struct and zlib.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)


def allowed(what: str = "image") -> str:
    """What an input picture may be, in words: the `allowed` of every RequestError about one."""
    formats = " or ".join(f.upper() for f in _LIMITS.formats)
    return (
        f"a {formats} {what} of at most {_LIMITS.max_bytes} bytes and {_LIMITS.max_pixels} pixels "
        f"(width × height)"
    )


def decode_input_image(
    data: bytes, field: str, width: int | None = None, height: int | None = None
) -> Image.Image:
    """The picture in `data` as an RGB image of exactly width × height (stretched with Lanczos, as
    diffusers' ControlNet image processor resizes a control image), or at its own size without them
    (SVD's image encoder needs the original); RequestError naming `field` else.

    Checks, in order: the byte count; the format, from the file's header; the declared size, from the
    header, before anything is decoded (a PNG of a few KB can declare 60000 × 60000 pixels); then the
    whole decode (truncated or corrupt data). The pixel bound is this module's own, not Pillow's
    process-wide MAX_IMAGE_PIXELS, which any library may switch off. The EXIF orientation is applied
    (a phone photo is used the way it is shown); palette, grey, 16-bit and CMYK pictures become RGB,
    and transparent pixels black (premultiplied), so hidden colours under alpha 0 never matter.
    """
    if len(data) > _LIMITS.max_bytes:
        raise RequestError(field, f"{len(data)} bytes", allowed())
    formats = [_PILLOW_FORMATS[f] for f in _LIMITS.formats]
    try:
        image = Image.open(io.BytesIO(data), formats=formats)
    except UnidentifiedImageError:
        raise RequestError(field, _describe(data), allowed()) from None
    except Image.DecompressionBombError:  # Pillow's own bound (far above ours) refused the header
        raise RequestError(field, f"an image of over {_LIMITS.max_pixels} pixels", allowed()) from None
    except _DECODE_ERRORS as exc:
        raise RequestError(field, _describe(data), f"{allowed()}; {_reason(exc)}") from None
    with image:
        w, h = image.size
        if w < 1 or h < 1 or w * h > _LIMITS.max_pixels:
            raise RequestError(field, f"a {image.format} image of {w} × {h} pixels", allowed())
        try:
            image.load()
            rgb = _rgb(ImageOps.exif_transpose(image))
        except _DECODE_ERRORS as exc:
            raise RequestError(
                field, f"a {image.format} image of {w} × {h} pixels", f"{allowed()}; {_reason(exc)}"
            ) from None
    if width is None or height is None or rgb.size == (width, height):
        return rgb
    return rgb.resize((width, height), Image.Resampling.LANCZOS)


def decode_input_image_base64(
    text: str, field: str, width: int | None = None, height: int | None = None
) -> Image.Image:
    """decode_input_image of a base64 string (how a JSON request carries a picture): the text's
    length is checked before decoding it, and the decoded bytes are checked as any others."""
    what = "image, base64-encoded (standard alphabet, no line breaks)"
    if len(text) > MAX_BASE64_CHARS:
        raise RequestError(field, f"{len(text)} characters of base64", allowed(what))
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error, or text with non-ASCII characters
        raise RequestError(field, f"{len(text)} characters that are not base64", allowed(what)) from None
    return decode_input_image(data, field, width, height)


def _rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB, whatever mode the file had."""
    if image.mode.startswith("I"):
        # 16-bit grey: keep the high byte (convert("L") would clip everything above 255 to white).
        high = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
        image = Image.fromarray(high.astype(np.uint8), "L")
    if image.mode in ("P", "LA", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        black = Image.new("RGBA", image.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, image).convert("RGB")
    return image.convert("RGB")


def _describe(data: bytes) -> str:
    """The got-value of an unreadable file: its size and first bytes (never the whole upload)."""
    return f"{len(data)} bytes starting {data[:8]!r}"


def _reason(exc: BaseException) -> str:
    """Pillow's words for a corrupt file, kept short: 'image file is truncated', 'broken PNG file'."""
    text = str(exc).strip() or type(exc).__name__
    return f"this one could not be decoded: {text[:120]}"
