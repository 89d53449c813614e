"""E-ink output: a generated picture cropped, dithered and packed for an ESP32 e-paper panel.

An ESP32 has neither the memory nor the time to resize and dither a 512 px PNG, so the service does
it: the picture is fitted to the panel (cropped around the bird, centre-cropped or letterboxed),
dithered to the panel's palette, and returned twice, as a PNG preview (labelled AI-generated like
every birdgen output, with the e-ink settings added to its metadata) and as the raw buffer the
device hands to its driver unchanged. Everything works from the encoded image and its metadata, so
a cached picture is re-rendered without generating it again. Panels and palettes live in
`data/eink_panels.yaml`; no torch here (the client library and the gateway import this).

Buffer layout (the GxEPD2 family's, checked against ZinggJM/GxEPD2 and ZinggJM/GxEPD2_4G sources,
see docs/eink.md): rows top to bottom, each row padded to a whole byte, the leftmost pixel in the
most significant bits; a pixel's value is its colour's position in the palette.

- 1 bit (bw): 8 pixels per byte, 1 = white, 0 = black (GxEPD2_BW::drawPixel sets bit 7 - x % 8
  for white; GxEPD2_420::_writeImage pads rows to (w + 7) / 8 bytes).
- 2 bits (grey4): 4 pixels per byte, 00 black, 01 dark grey, 10 light grey, 11 white
  (GxEPD2_4G_4G::drawPixel and GxEPD2_420::writeImage_4G with bpp 2; Waveshare's
  EPD_4IN2_4GrayDisplay reads the same codes).
- 4 bits (7colour): 2 pixels per byte, high nibble = left pixel; 0 black, 1 white, 2 green, 3 blue,
  4 red, 5 yellow, 6 orange (GxEPD2_7C::color7 and drawPixel, GxEPD2_730c_GDEY073D46::writeNative).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from birdgen.eink_panels import PRESETS, Palette
from birdgen.media import encode_image, read_metadata
from birdgen.schema import EINK, ImageRequest, eink_option

BIT_ORDER = "rows top to bottom, each padded to a whole byte; the leftmost pixel in the most significant bits"

# The subject is found on a copy this many pixels on its long side: enough to place a bird, small
# enough to cost under a millisecond, and the downscale averages away sensor-like noise.
_SALIENCY_SIZE = 128
# Only edges at least half as steep as the steepest count (a quarter of its squared gradient). A
# sharp bird on a soft background has the steepest edges; a textured background (leaves, bark) has
# many weaker ones whose area would otherwise drag the centre of mass towards the middle. Relative
# to the steepest edge rather than a fixed share of the pixels, so the texture's extent cannot matter.
_SALIENT_FRACTION = 0.25


def _bayer(size: int) -> np.ndarray:
    """The size x size Bayer threshold map, values evenly spread in (-0.5, 0.5)."""
    matrix = np.zeros((1, 1))
    while matrix.shape[0] < size:
        matrix = np.block([[4 * matrix, 4 * matrix + 2], [4 * matrix + 3, 4 * matrix + 1]])
    return ((matrix + 0.5) / matrix.size - 0.5).astype(np.float32)


# 8x8 gives 64 tone levels, more than the eye separates in a dot pattern on a 100-130 dpi panel.
_BAYER = _bayer(8)


@dataclass(frozen=True)
class EinkResult:
    """A picture ready for one panel: what the device shows (buffer) and what people see (preview)."""

    preview_png: bytes  # the dithered picture in the palette's colours, AI label and metadata kept
    buffer: bytes  # packed as `layout` says; hand it to the driver unchanged
    width: int
    height: int
    panel: str
    palette: str
    bits_per_pixel: int
    layout: dict[str, Any]  # JSON-ready: row_bytes, bit order, colour values, GxEPD2 driver, rotation
    metadata: dict[str, Any]  # the source's generation metadata plus "eink" (the settings, the layout)


def render_eink(
    image: bytes | Image.Image,
    panel: str,
    *,
    palette: str | None = None,
    dither: str | None = None,
    fit: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> EinkResult:
    """Fit, dither and pack `image` for `panel`.

    `image` is an encoded birdgen image (PNG/WebP/JPEG bytes, e.g. from the cache), whose metadata
    is carried over, or a PIL image; `metadata`, when given, replaces what the bytes carry (and is
    required with a PIL image). `palette` defaults to the panel's first; `dither` is
    floyd-steinberg (the default), ordered (Bayer 8x8) or none; `fit` is subject (the default: crop
    around the steepest edges, where the sharp bird is), cover (centre crop) or contain (letterbox
    on white). Names are matched ignoring case and outer spaces.
    Raises RequestError naming the field for an unknown panel, palette, dither or fit, and
    ValueError for bytes that are not an image or carry no metadata when none is given.
    """
    panel_name = eink_option("panel", panel)
    spec = PRESETS.panels[panel_name]
    palette_name = eink_option("palette", palette, panel_name)
    inks = PRESETS.palettes[palette_name]
    dither = eink_option("dither", dither)
    fit = eink_option("fit", fit)

    source, generation = _source(image, metadata)
    fitted, crop = _fit(source, spec.width, spec.height, fit)
    indices = _dither(fitted, inks, dither)

    layout = {
        "bits_per_pixel": inks.bits_per_pixel,
        "pixels_per_byte": 8 // inks.bits_per_pixel,
        "row_bytes": row_bytes(spec.width, inks.bits_per_pixel),
        "order": BIT_ORDER,
        "values": {colour.name: value for value, colour in enumerate(inks.colours)},
        "driver": f"{inks.display_class}<{spec.driver}> ({inks.library})",
        "model": spec.model,
        "rotation": spec.rotation,
    }
    settings = {
        "panel": panel_name,
        "palette": palette_name,
        "dither": dither,
        "fit": fit,
        "width": spec.width,
        "height": spec.height,
        "bits_per_pixel": inks.bits_per_pixel,
        "crop": list(crop),  # the source pixels shown: left, top, right, bottom
        "layout": layout,  # so a preview or a response alone says how to read its buffer
    }
    labelled = {**generation, "eink": settings}
    preview = Image.fromarray(indices, "P")
    preview.putpalette([channel for colour in inks.colours for channel in colour.rgb])
    return EinkResult(
        preview_png=encode_image(preview, "png", labelled),
        buffer=pack_buffer(indices, inks.bits_per_pixel, pad=inks.white_value),
        width=spec.width,
        height=spec.height,
        panel=panel_name,
        palette=palette_name,
        bits_per_pixel=inks.bits_per_pixel,
        layout=layout,
        metadata=labelled,
    )


def render_request(request: ImageRequest, source_png: bytes) -> EinkResult:
    """A `format=eink` request's result, made from the PNG of `request.eink_source()`.

    The server renders this way right after generating that PNG, and a client from the same PNG in
    its cache, so both give the same bytes.
    """
    if request.format != EINK or request.eink_panel is None:
        raise ValueError(f"not an e-ink request: format is {request.format!r}")
    return render_eink(
        source_png,
        request.eink_panel,
        palette=request.eink_palette,
        dither=request.eink_dither,
        fit=request.eink_fit,
    )


def row_bytes(width: int, bits_per_pixel: int) -> int:
    """Bytes per buffer row: ceil(width x bits / 8), rows padded to a whole byte."""
    return (width * bits_per_pixel + 7) // 8


def pack_buffer(indices: np.ndarray, bits_per_pixel: int, *, pad: int = 0) -> bytes:
    """Pack (H, W) palette values into the driver buffer (see the module docstring).

    `pad` fills the bits past the last pixel of a row whose width is not a whole number of bytes
    (render_eink pads with white: drivers write whole bytes, so padding can reach the panel).
    """
    per_byte = _pixels_per_byte(bits_per_pixel)
    values = np.asarray(indices)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"indices must be a non-empty (height, width) array, got shape {values.shape}")
    top = 1 << bits_per_pixel
    if not np.issubdtype(values.dtype, np.integer) or values.min() < 0 or values.max() >= top:
        raise ValueError(f"indices must be integers 0..{top - 1} for {bits_per_pixel} bits per pixel")
    if not 0 <= pad < top:
        raise ValueError(f"pad must be 0..{top - 1}, got {pad}")
    height, width = values.shape
    padded = np.full((height, row_bytes(width, bits_per_pixel) * per_byte), pad, dtype=np.uint8)
    padded[:, :width] = values
    groups = padded.reshape(height, -1, per_byte) << _shifts(bits_per_pixel)
    return np.bitwise_or.reduce(groups, axis=2).tobytes()


def unpack_buffer(buffer: bytes, width: int, height: int, bits_per_pixel: int) -> np.ndarray:
    """The (height, width) uint8 palette values of a packed buffer; padding bits are dropped."""
    per_byte = _pixels_per_byte(bits_per_pixel)
    stride = row_bytes(width, bits_per_pixel)
    if len(buffer) != stride * height:
        raise ValueError(
            f"a {width}x{height} buffer at {bits_per_pixel} bits per pixel is {stride * height} bytes, "
            f"got {len(buffer)}"
        )
    rows = np.frombuffer(buffer, dtype=np.uint8).reshape(height, stride, 1)
    values = (rows >> _shifts(bits_per_pixel)) & ((1 << bits_per_pixel) - 1)
    return values.reshape(height, stride * per_byte)[:, :width]


def _pixels_per_byte(bits_per_pixel: int) -> int:
    if bits_per_pixel not in (1, 2, 4):
        raise ValueError(f"bits_per_pixel must be 1, 2 or 4, got {bits_per_pixel!r}")
    return 8 // bits_per_pixel


def _shifts(bits_per_pixel: int) -> np.ndarray:
    """Where each pixel of a byte sits, leftmost first: 7..0 for 1 bit, 6, 4, 2, 0 for 2, 4, 0 for 4."""
    per_byte = 8 // bits_per_pixel
    return (bits_per_pixel * np.arange(per_byte - 1, -1, -1)).astype(np.uint8)


def _source(
    image: bytes | Image.Image, metadata: Mapping[str, Any] | None
) -> tuple[Image.Image, dict[str, Any]]:
    """The picture as RGB and the generation metadata to carry over."""
    if isinstance(image, Image.Image):
        if metadata is None:
            raise ValueError("a PIL image carries no birdgen metadata: pass metadata=")
        return image.convert("RGB"), dict(metadata)
    try:
        with Image.open(io.BytesIO(image)) as opened:
            picture = opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"not a readable image: {exc}") from exc
    return picture, dict(read_metadata(image) if metadata is None else metadata)


def _fit(image: Image.Image, width: int, height: int, fit: str) -> tuple[Image.Image, tuple[int, ...]]:
    """The picture at the panel's size (Lanczos) and the source box it shows."""
    if fit == "contain":
        padded = ImageOps.pad(image, (width, height), Image.Resampling.LANCZOS, color=(255, 255, 255))
        return padded, (0, 0, *image.size)
    centre = _subject_centre(image) if fit == "subject" else (image.width / 2, image.height / 2)
    box = _crop_box(image.size, width / height, centre)
    return image.resize((width, height), Image.Resampling.LANCZOS, box=box), box


def _crop_box(size: tuple[int, int], aspect: float, centre: tuple[float, float]) -> tuple[int, int, int, int]:
    """The largest box of `aspect` (width / height) centred on `centre`, clamped inside the image.

    The clamp keeps the crop free of empty borders: a subject near an edge ends up near that edge of
    the crop rather than centred with blank space beside it.
    """
    width, height = size
    if width / height > aspect:
        crop_w, crop_h = min(width, round(height * aspect)), height
    else:
        crop_w, crop_h = width, min(height, round(width / aspect))
    left = min(max(round(centre[0] - crop_w / 2), 0), width - crop_w)
    top = min(max(round(centre[1] - crop_h / 2), 0), height - crop_h)
    return left, top, left + crop_w, top + crop_h


def _subject_centre(image: Image.Image) -> tuple[float, float]:
    """Where the bird probably is: the centre of mass of the steepest edges' energy.

    birdgen draws a sharp bird against a soft, often blurred background (shallow depth of field,
    sky, bokeh), so the squared luminance gradient concentrates on the bird. Cheap, deterministic and
    explainable; a featureless picture gives its centre.
    """
    small_w = max(2, round(image.width * _SALIENCY_SIZE / max(image.size)))
    small_h = max(2, round(image.height * _SALIENCY_SIZE / max(image.size)))
    luminance = np.asarray(image.convert("L").resize((small_w, small_h), Image.Resampling.BOX), np.float32)
    grad_y, grad_x = np.gradient(luminance)
    energy = grad_x**2 + grad_y**2
    energy[energy < _SALIENT_FRACTION * energy.max()] = 0
    total = float(energy.sum())
    if total == 0:
        return image.width / 2, image.height / 2
    rows, cols = np.indices(energy.shape)
    x = (float((cols * energy).sum()) / total + 0.5) * image.width / small_w
    y = (float((rows * energy).sum()) / total + 0.5) * image.height / small_h
    return x, y


def _dither(image: Image.Image, palette: Palette, dither: str) -> np.ndarray:
    """(H, W) uint8 palette values for the fitted picture.

    Grey palettes dither the luminance (ITU-R 601, Pillow's "L"): distance in RGB would rate a
    saturated red as far from every grey. Tones are sRGB code values, as every Arduino image
    converter uses, so a 50% grey becomes half black dots.
    """
    if palette.is_grey:
        image = image.convert("L").convert("RGB")  # Pillow maps only RGB (not L) onto a palette
    if dither == "floyd-steinberg":
        inks = Image.new("P", (1, 1))
        inks.putpalette([channel for colour in palette.colours for channel in colour.rgb])
        return np.asarray(image.quantize(palette=inks, dither=Image.Dither.FLOYDSTEINBERG))
    pixels = np.asarray(image, dtype=np.float32)
    if dither == "ordered":
        height, width = pixels.shape[:2]
        threshold = _BAYER[np.arange(height)[:, None] % 8, np.arange(width) % 8]
        pixels = pixels + threshold[..., None] * palette.ordered_spread
    return _nearest(pixels, palette.rgb)


def _nearest(pixels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Index of the nearest colour (Euclidean RGB) per pixel; |p - c|^2 minus the constant |p|^2."""
    distance = (colours**2).sum(axis=1) - 2 * pixels @ colours.T
    return distance.argmin(axis=-1).astype(np.uint8)
