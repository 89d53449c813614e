"""Every encoded image must say it is AI-generated and give back exactly the metadata it was given."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from birdgen.media import (
    BIRDGEN_NS,
    DIGITAL_SOURCE_TYPE,
    FORMATS,
    ai_label,
    encode_image,
    metadata_json,
    read_metadata,
    xmp_packet,
)

AWKWARD = "<b>&\"ü鳥'</b> ]]> \n\ttab"
RDF = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"
IPTC = "{http://iptc.org/std/Iptc4xmpExt/2008-02-29/}"
XMP = "{http://ns.adobe.com/xap/1.0/}"
DC = "{http://purl.org/dc/elements/1.1/}"


def _metadata(**overrides: object) -> dict:
    meta = {
        "prompt": f"a European robin {AWKWARD}, field guide illustration",
        "negative_prompt": "blurry & <lowres>",
        "seed": 1234567890123,
        "steps": 1,
        "width": 48,
        "height": 32,
        "model_version": "sdxl-turbo-1.0",
        "family": "Passeriformes",
        "lora": None,
        "timings_ms": {"unet": 12.5, "vae": 3.25, "total": 17},
        "ai_generated": True,
        "species": f"Robin {AWKWARD}",
        "scientific_name": "Erithacus rubecula",
    }
    meta.update(overrides)
    return meta


def _gradient(height: int = 32, width: int = 48) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1).astype(
        np.uint8
    )


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _xmp(data: bytes) -> ET.Element:
    with Image.open(io.BytesIO(data)) as image:
        raw = image.info["xmp"]
    return ET.fromstring(raw)


def _description(root: ET.Element) -> ET.Element:
    return root.find(f"{RDF}RDF/{RDF}Description")


@pytest.mark.parametrize("fmt", FORMATS)
def test_roundtrip_metadata_and_pixels(fmt: str) -> None:
    pixels = _gradient()
    meta = _metadata()
    data = encode_image(pixels, fmt, meta)
    assert read_metadata(data) == meta
    decoded = _decode(data)
    assert decoded.shape == pixels.shape
    if fmt == "png":
        np.testing.assert_array_equal(decoded, pixels)
    else:
        # Lossy at quality 90 on a smooth gradient: small average error only.
        assert np.abs(decoded.astype(int) - pixels.astype(int)).mean() < 3.0


@pytest.mark.parametrize("fmt", FORMATS)
def test_xmp_labels_the_file_as_ai_generated(fmt: str) -> None:
    meta = _metadata()
    desc = _description(_xmp(encode_image(_gradient(), fmt, meta)))
    assert desc.get(f"{IPTC}DigitalSourceType") == DIGITAL_SOURCE_TYPE
    assert desc.get(f"{XMP}CreatorTool") == "birdgen sdxl-turbo-1.0"
    assert desc.get(f"{IPTC}AISystemVersionUsed") == "sdxl-turbo-1.0"
    assert desc.get(f"{IPTC}AIPromptInformation").startswith(meta["prompt"])
    assert desc.get(f"{{{BIRDGEN_NS}}}seed") == "1234567890123"
    label = desc.find(f"{DC}description/{RDF}Alt/{RDF}li").text
    assert (
        label == ai_label(meta) == f"AI-generated image of {meta['species']} (Erithacus rubecula) by birdgen"
    )
    assert desc.find(f"{DC}title/{RDF}Alt/{RDF}li").text == label
    subjects = [li.text for li in desc.findall(f"{DC}subject/{RDF}Bag/{RDF}li")]
    assert subjects == [meta["species"], "Erithacus rubecula", "Passeriformes"]


def test_xmp_packet_is_well_formed_xml_for_hostile_strings() -> None:
    meta = _metadata(prompt="\x01ctrl \ud800 lone \ufffe & <x:xmpmeta> ]]>", species=None, model_version=None)
    packet = xmp_packet(meta)
    assert DIGITAL_SOURCE_TYPE in packet
    assert packet.startswith("<?xpacket begin=") and packet.endswith('<?xpacket end="r"?>')
    root = ET.fromstring(packet.encode("utf-8"))  # the packet must also be valid UTF-8
    desc = _description(root)
    assert desc.get(f"{XMP}CreatorTool") == "birdgen"
    assert desc.find(f"{DC}description/{RDF}Alt/{RDF}li").text == "AI-generated image by birdgen"
    for fmt in FORMATS:  # the JSON stays lossless even for characters XML cannot hold
        assert read_metadata(encode_image(_gradient(), fmt, meta)) == meta


def test_png_carries_readable_text_chunks() -> None:
    meta = _metadata()
    with Image.open(io.BytesIO(encode_image(_gradient(), "png", meta))) as image:
        info = image.info
    assert info["birdgen"] == metadata_json(meta)
    assert info["Description"] == ai_label(meta)
    assert info["Software"] == "birdgen sdxl-turbo-1.0"
    assert b"trainedAlgorithmicMedia" in info["xmp"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_deterministic_bytes(fmt: str) -> None:
    meta = _metadata()
    reordered = dict(reversed(list(meta.items())))
    first = encode_image(_gradient(), fmt, meta)
    assert encode_image(_gradient(), fmt, meta) == first
    assert encode_image(_gradient(), fmt, reordered) == first
    assert encode_image(_gradient(), fmt, _metadata(seed=1)) != first


def test_pil_input_drops_stale_metadata_and_keeps_alpha_for_png() -> None:
    stale = PngImagePlugin.PngInfo()
    stale.add_itxt("birdgen", '{"seed": 999}')
    stale.add_text("Comment", "old")
    buf = io.BytesIO()
    Image.fromarray(_gradient()).convert("RGBA").save(buf, "PNG", pnginfo=stale)
    with Image.open(io.BytesIO(buf.getvalue())) as source:
        source.load()
        meta = _metadata()
        png = encode_image(source, "png", meta)
        jpeg = encode_image(source, "jpeg", meta)
    with Image.open(io.BytesIO(png)) as image:
        assert image.mode == "RGBA"
        assert "Comment" not in image.info
    assert read_metadata(png) == meta
    assert read_metadata(jpeg) == meta


def test_quality_changes_lossy_output() -> None:
    meta = _metadata()
    for fmt in ("webp", "jpeg"):
        low, high = (encode_image(_gradient(), fmt, meta, quality=q) for q in (10, 95))
        assert len(low) < len(high)
    level1, level9 = (encode_image(_gradient(), "png", meta, compress_level=c) for c in (1, 9))
    np.testing.assert_array_equal(_decode(level1), _decode(level9))


def test_unknown_format_names_allowed_values() -> None:
    with pytest.raises(ValueError, match=r"'gif'.*png, webp, jpeg"):
        encode_image(_gradient(), "gif", _metadata())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"quality": 0}, "quality"), ({"quality": 101}, "quality"), ({"compress_level": 10}, "compress_level")],
)
def test_bad_encoder_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_image(_gradient(), "png", _metadata(), **kwargs)


@pytest.mark.parametrize(
    "pixels", [_gradient().astype(np.float32), _gradient()[..., 0], np.zeros((0, 4, 3), np.uint8)]
)
def test_bad_pixels(pixels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="pixels"):
        encode_image(pixels, "png", _metadata())


def test_jpeg_rejects_xmp_over_app1_limit() -> None:
    with pytest.raises(ValueError, match="XMP packet"):
        encode_image(_gradient(), "jpeg", _metadata(prompt="x" * 70_000))
    assert read_metadata(encode_image(_gradient(), "png", _metadata(prompt="x" * 70_000)))["prompt"]


def test_numpy_values_and_non_json_values() -> None:
    meta = _metadata(seed=np.int64(7), timings_ms={"unet": np.float32(1.5)})
    assert read_metadata(encode_image(_gradient(), "png", meta))["seed"] == 7
    with pytest.raises(TypeError, match="set"):
        encode_image(_gradient(), "png", _metadata(lora={"a"}))
    with pytest.raises(ValueError):
        encode_image(_gradient(), "png", _metadata(seed=float("nan")))


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "JPEG", "GIF"])
def test_read_metadata_without_birdgen_metadata(fmt: str) -> None:
    buf = io.BytesIO()
    Image.fromarray(_gradient()).save(buf, fmt)
    with pytest.raises(ValueError, match="no birdgen metadata"):
        read_metadata(buf.getvalue())


def test_read_metadata_rejects_non_images_and_foreign_xmp() -> None:
    with pytest.raises(ValueError, match="not a readable image"):
        read_metadata(b"definitely not an image")
    foreign = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>'
    entity = b'<!DOCTYPE x [<!ENTITY a "b">]><x:xmpmeta xmlns:x="adobe:ns:meta/">&a;</x:xmpmeta>'
    for xmp in (foreign, entity, b"<unclosed"):
        buf = io.BytesIO()
        Image.fromarray(_gradient()).save(buf, "JPEG", xmp=xmp)
        with pytest.raises(ValueError, match="no birdgen metadata"):
            read_metadata(buf.getvalue())
