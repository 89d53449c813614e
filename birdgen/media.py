"""Encode generated images and animations so every file says it is AI-generated, and read that label back.

The platform shows these pictures next to real bird identifications, so the label must travel with the
file, not just with the HTTP response: each output carries an XMP packet with the IPTC digital source
type `trainedAlgorithmicMedia` (what browsers, CMSs and exiftool look for), the IPTC 2025.1 AI
properties, a plain-language caption, and the full generation metadata as JSON so an image can be
traced back to (and regenerated from) its request. PNG additionally carries the JSON and the caption
as iTXt chunks, which PNG tools show without an XMP parser. Animations are animated WebP (same XMP
packet) or GIF, which has no standard XMP place Pillow can write, so its comment extension carries the
caption, the IPTC digital source type and the JSON.

Encoding is deterministic (no timestamps, fixed encoder settings): the same pixels and metadata give the
same bytes, which keeps the Redis cache and the "same request, same bytes" promise honest.
No torch here: the gateway and the Triton post-processing stage both import this.
"""

from __future__ import annotations

import io
import json
import re
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

FORMATS = ("png", "webp", "jpeg")
ANIMATION_FORMATS = ("webp", "gif")
DITHERS = ("floyd-steinberg", "none")
# 50 fps = 20 ms, the shortest GIF delay browsers honour (they play 0-10 ms delays at 100 ms).
MIN_FPS, MAX_FPS = 1, 50

DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
BIRDGEN_NS = "https://chirpneighbors.org/ns/birdgen/1.0/"
PNG_JSON_KEY = "birdgen"
PNG_XMP_KEY = "XML:com.adobe.xmp"

_NS = {
    "x": "adobe:ns:meta/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "dc": "http://purl.org/dc/elements/1.1/",
    "xmp": "http://ns.adobe.com/xap/1.0/",
    "Iptc4xmpExt": "http://iptc.org/std/Iptc4xmpExt/2008-02-29/",
    "birdgen": BIRDGEN_NS,
}
_GENERATION_TAG = f"{{{BIRDGEN_NS}}}generation"
_SOURCE_TYPE_ATTR = f"{{{_NS['Iptc4xmpExt']}}}DigitalSourceType"
_DESCRIPTION_TAG = f"{{{_NS['dc']}}}description"
_LI_TAG = f"{{{_NS['rdf']}}}li"

# PIL modes each format can store as-is; anything else is converted to RGB.
_MODES = {
    "png": ("1", "L", "LA", "P", "RGB", "RGBA"),
    "webp": ("RGB", "RGBA"),
    "jpeg": ("L", "RGB"),
}
# JPEG APP1 segment limit (65533) minus the "http://ns.adobe.com/xap/1.0/\0" header.
_JPEG_XMP_MAX = 65533 - 29
# libwebp effort 0..6. Measured on 512/1024 px images: 0 is 3.5x faster than libwebp's default 4
# (5 vs 17.5 ms at 512 px) and the files differ by under 1%, so latency wins.
_WEBP_METHOD = 0

# GIF delays are centiseconds.
_GIF_UNIT_MS = 10
# The shared GIF palette is computed from at most this many pixels, sampled on a regular grid over all
# frames: FASTOCTREE on 1 Mpx takes ~20 ms, against ~900 ms for MEDIANCUT (mean error ~10% lower).
_GIF_PALETTE_SAMPLE = 1 << 20
# The GIF comment is "<caption>\n<prefix><source type>\n<prefix><json>"; the JSON has no raw newline,
# so parsing from the end works whatever the caption contains.
_GIF_SOURCE_PREFIX = "IPTC DigitalSourceType: "
_GIF_JSON_PREFIX = "birdgen: "

# Not allowed in XML 1.0 at all (C0 controls except tab/LF/CR, surrogates, U+FFFE/U+FFFF).
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
# What json.dumps(ensure_ascii=False) can still emit that XML or UTF-8 cannot carry.
_JSON_UNSAFE = re.compile("[\ud800-\udfff\ufffe\uffff]")


def ai_label(metadata: Mapping[str, object]) -> str:
    """The human-readable caption, e.g. "AI-generated image of European Robin by birdgen".

    Shared so GIF comments, alt text and the gateway say exactly the same thing as the file.
    """
    species = metadata.get("species")
    subject = f" of {species}" if species else ""
    scientific = metadata.get("scientific_name")
    if species and scientific:
        subject += f" ({scientific})"
    return f"AI-generated image{subject} by birdgen"


def metadata_json(metadata: Mapping[str, object]) -> str:
    """Canonical JSON of the metadata: sorted keys and compact, so equal dicts give equal bytes.

    Standard JSON only (NaN/Infinity raise ValueError) because browsers parse it too; numpy scalars and
    arrays are converted, other non-JSON values raise TypeError rather than being stringified silently.
    """
    text = json.dumps(
        dict(metadata),
        ensure_ascii=False,
        sort_keys=True,
        separators=(",", ":"),
        allow_nan=False,
        default=_json_default,
    )
    # Lone surrogates and U+FFFE/FFFF survive ensure_ascii=False but not UTF-8/XML; \u-escape them.
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def xmp_packet(metadata: Mapping[str, object]) -> str:
    """The XMP packet labelling an image as AI-generated and carrying the generation metadata.

    Uses IPTC DigitalSourceType (the standard AI-generated flag), the IPTC 2025.1 AI properties
    (system, version, prompt), dc:title/description/subject for people and catalogue search,
    xmp:CreatorTool, and `birdgen:generation`, the lossless JSON that read_metadata() returns.
    """
    version = metadata.get("model_version")
    label = ai_label(metadata)
    attrs = [
        ("Iptc4xmpExt:DigitalSourceType", DIGITAL_SOURCE_TYPE),
        ("Iptc4xmpExt:AISystemUsed", "birdgen"),
    ]
    if version:
        attrs.append(("Iptc4xmpExt:AISystemVersionUsed", str(version)))
    prompt = metadata.get("prompt")
    if prompt:
        info = str(prompt)
        if metadata.get("negative_prompt"):
            info += f"\nNegative prompt: {metadata['negative_prompt']}"
        attrs.append(("Iptc4xmpExt:AIPromptInformation", info))
    attrs.append(("xmp:CreatorTool", f"birdgen {version}" if version else "birdgen"))
    for key, prop in (("seed", "seed"), ("family", "family"), ("lora", "lora")):
        if metadata.get(key) is not None:
            attrs.append((f"birdgen:{prop}", str(metadata[key])))

    subjects = [str(metadata[k]) for k in ("species", "scientific_name", "family") if metadata.get(k)]
    ns_decls = "".join(f'\n    xmlns:{p}="{u}"' for p, u in _NS.items() if p not in ("x", "rdf"))
    attr_xml = "".join(f'\n    {name}="{_xml_attr(value)}"' for name, value in attrs)
    subject_xml = ""
    if subjects:
        items = "".join(f"<rdf:li>{_xml_text(s)}</rdf:li>" for s in subjects)
        subject_xml = f"\n   <dc:subject><rdf:Bag>{items}</rdf:Bag></dc:subject>"
    alt = f'<rdf:Alt><rdf:li xml:lang="x-default">{_xml_text(label)}</rdf:li></rdf:Alt>'
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        f'<x:xmpmeta xmlns:x="{_NS["x"]}">\n'
        f' <rdf:RDF xmlns:rdf="{_NS["rdf"]}">\n'
        f'  <rdf:Description rdf:about=""{ns_decls}{attr_xml}>\n'
        f"   <dc:title>{alt}</dc:title>\n"
        f"   <dc:description>{alt}</dc:description>{subject_xml}\n"
        f"   <birdgen:generation>{_xml_text(metadata_json(metadata))}</birdgen:generation>\n"
        "  </rdf:Description>\n"
        " </rdf:RDF>\n"
        "</x:xmpmeta>\n"
        '<?xpacket end="r"?>'
    )


def encode_image(
    pixels: np.ndarray | Image.Image,
    fmt: str,
    metadata: Mapping[str, object],
    *,
    quality: int = 90,
    compress_level: int = 1,
) -> bytes:
    """Encode `pixels` (uint8 HWC RGB array, or a PIL image) as `fmt` with the AI label and metadata.

    PIL images keep their mode where the format stores it (png: 1/L/LA/P/RGB/RGBA, webp: RGB/RGBA,
    jpeg: L/RGB), else are converted to RGB (alpha dropped); their own metadata is not copied.
    `quality` (1-100) applies to webp and jpeg; png is lossless and uses `compress_level` (0-9, zlib).
    The default is 1, not zlib's 6: served images are latency-bound, and 1 was 3-5x faster for ~20%
    larger files at 512 px (80 -> 15 ms), a large share of a GPU request's 20 ms budget. zlib's RLE
    strategy then cuts another 10-30% (a 512 px photo: 16.5 -> 14.5 ms, noise 27 -> 19 ms) at about
    the same size, since PNG's row filters already leave mostly runs of small differences.
    Raises ValueError for an unknown format, bad arguments or pixels, or (jpeg) an XMP packet over
    the 64 KB APP1 limit.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown image format {fmt!r}; allowed: {', '.join(FORMATS)}")
    _check_int("quality", quality, 1, 100)
    _check_int("compress_level", compress_level, 0, 9)
    image = _to_image(pixels, fmt)
    xmp = xmp_packet(metadata).encode("utf-8")
    out = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        # XMP spec part 3: the PNG XMP chunk is an uncompressed iTXt with this exact keyword.
        info.add_itxt(PNG_XMP_KEY, xmp.decode("utf-8"))
        info.add_itxt(PNG_JSON_KEY, metadata_json(metadata))
        info.add_itxt("Description", ai_label(metadata))
        version = metadata.get("model_version")
        info.add_itxt("Software", f"birdgen {version}" if version else "birdgen")
        image.save(
            out, "PNG", pnginfo=info, compress_level=compress_level, compress_type=zlib.Z_RLE, optimize=False
        )
    elif fmt == "webp":
        image.save(out, "WEBP", xmp=xmp, quality=quality, method=_WEBP_METHOD, lossless=False, exact=False)
    else:
        if len(xmp) > _JPEG_XMP_MAX:
            raise ValueError(
                f"XMP packet is {len(xmp)} bytes; JPEG allows {_JPEG_XMP_MAX} (shorten the prompt or use png)"
            )
        image.save(out, "JPEG", xmp=xmp, quality=quality, optimize=False, progressive=False)
    return out.getvalue()


def frame_durations(count: int, fps: int, unit_ms: int = 1) -> list[int]:
    """Per-frame durations in ms, multiples of `unit_ms`, for `count` frames at `fps`.

    Frame i ends at (i + 1) * 1000 / fps rounded to the unit, so the total is exact to half a unit and
    each frame is within one unit of 1000 / fps: at 8 fps GIF (10 ms units) alternates 130/120 ms,
    24 fps WebP (1 ms) gives 42/41/42 ms.
    """
    unit = fps * unit_ms
    ends = [((i + 1) * 2000 + unit) // (2 * unit) * unit_ms for i in range(count)]  # round half up
    return [end - start for start, end in pairwise([0, *ends])]


def encode_animation(
    frames: Sequence[np.ndarray] | np.ndarray,
    fps: int,
    fmt: str,
    metadata: Mapping[str, object],
    *,
    quality: int = 80,
    lossless: bool = False,
    dither: str = "floyd-steinberg",
) -> bytes:
    """Encode uint8 RGB `frames` ((F, H, W, 3) array or a list of HxWx3) as a looping animation.

    webp: animated WebP carrying the same XMP packet as stills, exact integer-ms frame durations
    (frame_durations), `quality` 1-100 (with `lossless`, libwebp's effort instead). gif: one palette
    of up to 256 colours for the whole clip (less flicker than per-frame palettes, and frames only need
    the global colour table), each frame mapped to it with `dither` ("floyd-steinberg" or "none"),
    frames cropped to the region that changed (disposal 1: leave in place), durations in 10 ms units
    with the total exact (8 fps: 130/120 ms alternating), and the caption, IPTC digital source type and
    metadata JSON in the comment extension. GIF ignores `quality` and `lossless`; WebP ignores `dither`.
    Both loop forever and are deterministic. Both encoders store a run of identical frames once with
    the summed duration (lossy WebP also merges frames that differ by a few levels, e.g. +-2 at quality
    80), so the file can hold fewer frames than given, with the same total; a clip whose frames all
    merge becomes a still WebP without a duration.
    Raises ValueError for an unknown format, fps outside 1..50, no frames, or bad frames/arguments.
    """
    if fmt not in ANIMATION_FORMATS:
        raise ValueError(f"unknown animation format {fmt!r}; allowed: {', '.join(ANIMATION_FORMATS)}")
    _check_int("fps", fps, MIN_FPS, MAX_FPS)
    _check_int("quality", quality, 1, 100)
    if not isinstance(lossless, bool):
        raise ValueError(f"lossless must be True or False, got {lossless!r}")
    if dither not in DITHERS:
        raise ValueError(f"unknown dither {dither!r}; allowed: {', '.join(DITHERS)}")
    stack = _frame_stack(frames)
    images = [Image.fromarray(frame, "RGB") for frame in stack]
    out = io.BytesIO()
    if fmt == "webp":
        images[0].save(
            out,
            "WEBP",
            save_all=True,
            append_images=images[1:],
            duration=frame_durations(len(images), fps),
            loop=0,
            quality=quality,
            lossless=lossless,
            method=_WEBP_METHOD,
            xmp=xmp_packet(metadata).encode("utf-8"),
        )
    else:
        palette = _gif_palette(stack)
        mode = Image.Dither.FLOYDSTEINBERG if dither == "floyd-steinberg" else Image.Dither.NONE
        indexed = [image.quantize(palette=palette, dither=mode) for image in images]
        indexed[0].save(
            out,
            "GIF",
            save_all=True,
            append_images=indexed[1:],
            duration=frame_durations(len(images), fps, _GIF_UNIT_MS),
            loop=0,
            # Passing the palette keeps every frame on the global colour table; optimize=True would
            # also paint unchanged pixels transparent: 5-20% larger on noisy clips, ~equal on clean ones.
            palette=palette.palette.tobytes(),
            optimize=False,
            disposal=1,
            interlace=False,
            comment=_gif_comment(metadata),
        )
    return out.getvalue()


def encode_poster(frame: np.ndarray, metadata: Mapping[str, object]) -> bytes:
    """A PNG still of one animation frame with the same label, for previews and clients without animation."""
    return encode_image(frame, "png", metadata)


@dataclass
class AnimationInfo:
    """What an animation file holds, as read_animation() finds it."""

    format: str  # "webp" or "gif"
    frame_count: int  # frames stored (runs of identical frames are stored once)
    durations_ms: list[int]  # per stored frame
    loop: int  # 0 = forever; a GIF without a loop block plays once and reads as 1
    size: tuple[int, int]  # (width, height)
    metadata: dict[str, Any]  # as given to encode_animation
    label: str  # the human-readable caption in the file
    digital_source_type: str  # IPTC, trainedAlgorithmicMedia for birdgen output

    @property
    def total_ms(self) -> int:
        return sum(self.durations_ms)


def read_animation(data: bytes) -> AnimationInfo:
    """Frames, timing, loop, size, label and metadata of an animated WebP or GIF (stills too).

    Decodes every frame (Pillow reports WebP durations only once a frame is loaded). Raises ValueError
    for bytes that are not a WebP/GIF or carry no birdgen metadata.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format
            if kind not in ("WEBP", "GIF"):
                raise ValueError(f"not an animation: {kind} (allowed: {', '.join(ANIMATION_FORMATS)})")
            info = dict(image.info)
            size = image.size
            durations = []
            for index in range(getattr(image, "n_frames", 1)):
                image.seek(index)
                image.load()
                durations.append(int(image.info.get("duration", 0)))
    except (UnidentifiedImageError, OSError, EOFError) as exc:
        raise ValueError(f"not a readable image: {exc}") from exc
    fields = _label_fields(info)
    if "generation" not in fields:
        raise ValueError(f"{kind} animation carries no birdgen metadata (no XMP property or GIF comment)")
    return AnimationInfo(
        format=kind.lower(),
        frame_count=len(durations),
        durations_ms=durations,
        loop=int(info.get("loop", 1)),
        size=size,
        metadata=_loads(fields["generation"]),
        label=fields.get("label", ""),
        digital_source_type=fields.get("source_type", ""),
    )


def read_metadata(data: bytes) -> dict[str, Any]:
    """The generation metadata dict written by encode_image / encode_animation, from any of their formats.

    Prefers PNG's `birdgen` iTXt chunk, else the XMP `birdgen:generation` property (PNG, WebP incl.
    animated, JPEG), else a GIF's comment. Raises ValueError when the bytes are not an image or carry
    no birdgen metadata.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:  # header and metadata only; pixels are not decoded
            info = dict(image.info)
            kind = image.format
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"not a readable image: {exc}") from exc
    text = info.get(PNG_JSON_KEY)
    if isinstance(text, str):
        return _loads(text)
    generation = _label_fields(info).get("generation")
    if generation is not None:
        return _loads(generation)
    raise ValueError(
        f"{kind} image carries no birdgen metadata (no {PNG_JSON_KEY!r} chunk, XMP property or GIF comment)"
    )


def _to_image(pixels: np.ndarray | Image.Image, fmt: str) -> Image.Image:
    """A fresh PIL image in a mode `fmt` can store, without any metadata the input carried."""
    if isinstance(pixels, Image.Image):
        image = pixels.copy() if pixels.mode in _MODES[fmt] else pixels.convert("RGB")
        # Drop stale exif/icc/xmp/text from the source so only our metadata is written (and bytes
        # depend on pixels + metadata alone); palette transparency is part of the pixels, keep it.
        keep = {"transparency": pixels.info["transparency"]} if "transparency" in pixels.info else {}
        image.info = keep
        return image
    array = np.asarray(pixels)
    if array.dtype != np.uint8:
        raise ValueError(f"pixels must be uint8, got {array.dtype}")
    if array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape:
        raise ValueError(f"pixels must be a non-empty HxWx3 RGB array, got shape {array.shape}")
    return Image.fromarray(np.ascontiguousarray(array), "RGB")


def _frame_stack(frames: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """Validated (F, H, W, 3) uint8 frames, contiguous."""
    if isinstance(frames, np.ndarray) and frames.ndim != 4:
        raise ValueError(
            f"frames must be an (F, H, W, 3) array or a list of HxWx3 arrays, got shape {frames.shape}"
        )
    arrays = [np.asarray(frame) for frame in frames]
    if not arrays:
        raise ValueError("frames is empty; an animation needs at least one frame")
    for index, array in enumerate(arrays):
        if array.dtype != np.uint8:
            raise ValueError(f"frame {index} must be uint8, got {array.dtype}")
        if array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape:
            raise ValueError(f"frame {index} must be a non-empty HxWx3 RGB array, got shape {array.shape}")
        if array.shape != arrays[0].shape:
            raise ValueError(f"frame {index} has shape {array.shape}, frame 0 has {arrays[0].shape}")
    return np.ascontiguousarray(np.stack(arrays))


def _gif_palette(stack: np.ndarray) -> Image.Image:
    """A "P" image holding one palette (distinct colours only) for all frames of the clip."""
    count, height, width, _ = stack.shape
    step = max(1, int(np.ceil(np.sqrt(count * height * width / _GIF_PALETTE_SAMPLE))))
    sample = stack[:, ::step, ::step]
    sample = Image.fromarray(np.ascontiguousarray(sample.reshape(-1, sample.shape[2], 3)), "RGB")
    quantized = sample.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    flat = quantized.getpalette() or [0, 0, 0]
    # FASTOCTREE pads with repeated black; duplicates would make Pillow's GIF writer remap indices.
    colors = dict.fromkeys(zip(flat[0::3], flat[1::3], flat[2::3], strict=True))
    palette = Image.new("P", (1, 1))
    palette.putpalette([channel for color in colors for channel in color])
    return palette


def _gif_comment(metadata: Mapping[str, object]) -> str:
    return (
        f"{ai_label(metadata)}\n{_GIF_SOURCE_PREFIX}{DIGITAL_SOURCE_TYPE}\n"
        f"{_GIF_JSON_PREFIX}{metadata_json(metadata)}"
    )


def _label_fields(info: Mapping[str, Any]) -> dict[str, str]:
    """generation (JSON), source_type and label from an opened image's XMP or GIF comment."""
    xmp = info.get("xmp")
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8")
    if isinstance(xmp, bytes) and xmp:
        fields = _xmp_fields(xmp)
        if "generation" in fields:
            return fields
    comment = info.get("comment")
    if isinstance(comment, bytes):
        try:
            label, source, generation = comment.decode("utf-8").rsplit("\n", 2)
        except ValueError:  # not UTF-8, or fewer than three lines
            return {}
        if source.startswith(_GIF_SOURCE_PREFIX) and generation.startswith(_GIF_JSON_PREFIX):
            return {
                "generation": generation.removeprefix(_GIF_JSON_PREFIX),
                "source_type": source.removeprefix(_GIF_SOURCE_PREFIX),
                "label": label,
            }
    return {}


def _xmp_fields(xmp: bytes) -> dict[str, str]:
    """birdgen:generation, DigitalSourceType (element or attribute form) and dc:description from XMP."""
    # ElementTree resolves internal entities; XMP never needs a DTD, so refuse one outright.
    if b"<!DOCTYPE" in xmp or b"<!ENTITY" in xmp:
        return {}
    start, end = xmp.find(b"<x:xmpmeta"), xmp.rfind(b"</x:xmpmeta>")
    body = xmp[start : end + len(b"</x:xmpmeta>")] if start >= 0 and end > start else xmp
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return {}
    fields: dict[str, str] = {}
    for element in root.iter():
        for key, name in (("generation", _GENERATION_TAG), ("source_type", _SOURCE_TYPE_ATTR)):
            if element.tag == name:
                fields.setdefault(key, element.text or "")
            elif name in element.attrib:
                fields.setdefault(key, element.attrib[name])
        if element.tag == _DESCRIPTION_TAG:
            item = element.find(f".//{_LI_TAG}")
            if item is not None:
                fields.setdefault("label", item.text or "")
    return fields


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in {low}..{high}, got {value!r}")


def _loads(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"birdgen metadata is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"birdgen metadata must be a JSON object, got {type(value).__name__}")
    return value


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"metadata value of type {type(value).__name__} is not JSON serializable")


def _xml_text(value: str) -> str:
    """Escape for XML character data; characters XML 1.0 cannot hold become U+FFFD."""
    value = _XML_INVALID.sub("\ufffd", value)
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _xml_attr(value: str) -> str:
    """Escape for a double-quoted XML attribute; newlines/tabs as references so parsers keep them."""
    return (
        _xml_text(value)
        .replace('"', "&quot;")
        .replace("\n", "&#10;")
        .replace("\r", "&#13;")
        .replace("\t", "&#9;")
    )
