"""Animations must keep their timing, loop forever, and carry the same AI label and metadata as stills."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageSequence

from birdgen.media import (
    ANIMATION_FORMATS,
    DIGITAL_SOURCE_TYPE,
    MAX_FPS,
    MIN_FPS,
    ai_label,
    encode_animation,
    encode_image,
    encode_poster,
    frame_durations,
    read_animation,
    read_metadata,
    xmp_packet,
)

AWKWARD = "<&\"ü鳥'> ]]>\n\ttab"
META = {
    "prompt": f"a European robin {AWKWARD}, singing",
    "negative_prompt": "blurry & <lowres>",
    "seed": 1234567890123,
    "steps": 4,
    "frames": 16,
    "fps": 8,
    "model_version": "sdxl-turbo-1.0+animatediff",
    "family": "Passeriformes",
    "lora": None,
    "species": f"Robin {AWKWARD}",
    "scientific_name": "Erithacus rubecula",
}


def _clip(frames: int = 16, size: int = 64, noise: float = 4.0, seed: int = 0) -> np.ndarray:
    """A gradient sliding diagonally plus Gaussian noise: every frame differs, as generated ones do."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    out = []
    for f in range(frames):
        shift = f * size / 32
        base = np.stack(
            [
                (x + shift) % size / size * 255,
                (y + shift / 2) % size / size * 255,
                (x + y + 3 * shift) / 2 % 256,
            ],
            -1,
        )
        out.append(np.clip(base + rng.normal(0, noise, base.shape), 0, 255).astype(np.uint8))
    return np.stack(out)


def _decode(data: bytes) -> list[np.ndarray]:
    with Image.open(io.BytesIO(data)) as image:
        return [np.asarray(frame.convert("RGB"), dtype=np.int16) for frame in ImageSequence.Iterator(image)]


@pytest.mark.parametrize("fmt", ANIMATION_FORMATS)
@pytest.mark.parametrize(("count", "fps"), [(16, 8), (40, 20), (48, 24)])
def test_frame_count_durations_and_loop(fmt: str, count: int, fps: int) -> None:
    info = read_animation(encode_animation(_clip(count, 32), fps, fmt, META))
    assert info.format == fmt
    assert info.frame_count == count
    assert info.size == (32, 32)
    assert info.loop == 0  # forever
    assert abs(info.total_ms - count * 1000 / fps) <= (1 if fmt == "webp" else 5)
    unit = 1 if fmt == "webp" else 10
    assert all(abs(d - 1000 / fps) < unit for d in info.durations_ms), info.durations_ms
    assert info.durations_ms == frame_durations(count, fps, unit)
    if fmt == "webp" and 1000 % fps == 0:
        assert info.durations_ms == [1000 // fps] * count


def test_gif_at_8fps_alternates_130_and_120_ms() -> None:
    # What Pillow wrote, per frame: the graphic control extension stores centiseconds.
    with Image.open(io.BytesIO(encode_animation(_clip(16, 32), 8, "gif", META))) as image:
        durations = [frame.info["duration"] for frame in ImageSequence.Iterator(image)]
    assert durations == [130, 120] * 8


@pytest.mark.parametrize("unit", [1, 10])
def test_frame_durations_total_exact_and_each_frame_within_a_unit(unit: int) -> None:
    for fps in range(MIN_FPS, MAX_FPS + 1):
        for count in (1, 7, 16, 48, 120):
            durations = frame_durations(count, fps, unit)
            assert len(durations) == count
            assert all(d % unit == 0 and abs(d - 1000 / fps) < unit for d in durations), (fps, durations)
            assert abs(sum(durations) - count * 1000 / fps) <= unit / 2, (fps, count)


@pytest.mark.parametrize("fmt", ANIMATION_FORMATS)
def test_metadata_and_ai_label_round_trip(fmt: str) -> None:
    data = encode_animation(_clip(), 8, fmt, META)
    info = read_animation(data)
    assert info.metadata == META
    assert read_metadata(data) == META
    assert info.label == ai_label(META)
    assert info.digital_source_type == DIGITAL_SOURCE_TYPE


def test_webp_carries_the_same_xmp_packet_as_stills() -> None:
    with Image.open(io.BytesIO(encode_animation(_clip(), 8, "webp", META))) as image:
        assert image.info["xmp"] == xmp_packet(META).encode("utf-8")


def test_gif_comment_says_ai_generated_in_plain_text() -> None:
    with Image.open(io.BytesIO(encode_animation(_clip(), 8, "gif", META))) as image:
        comment = image.info["comment"].decode("utf-8")
    assert comment.startswith(ai_label(META) + "\n")
    assert DIGITAL_SOURCE_TYPE in comment
    assert "AI-generated" in comment


@pytest.mark.parametrize(
    ("fmt", "options"),
    [("webp", {}), ("webp", {"lossless": True, "quality": 50}), ("gif", {}), ("gif", {"dither": "none"})],
)
def test_deterministic_and_list_input_equals_array(fmt: str, options: dict) -> None:
    frames = _clip()
    data = encode_animation(frames, 8, fmt, META, **options)
    assert encode_animation(frames.copy(), 8, fmt, dict(META), **options) == data
    assert encode_animation(list(frames), 8, fmt, META, **options) == data
    assert encode_animation(frames, 8, fmt, {**META, "seed": 1}, **options) != data


def test_webp_smaller_than_gif_at_defaults() -> None:
    frames = _clip(16, 256)
    webp = encode_animation(frames, 8, "webp", META)
    gif = encode_animation(frames, 8, "gif", META)
    assert len(webp) < len(gif) / 2, (len(webp), len(gif))


def test_dither_choice_changes_the_gif_and_both_stay_faithful() -> None:
    frames = _clip()
    dithered = encode_animation(frames, 8, "gif", META, dither="floyd-steinberg")
    plain = encode_animation(frames, 8, "gif", META, dither="none")
    assert dithered != plain
    for data in (dithered, plain):
        decoded = _decode(data)
        assert len(decoded) == len(frames)
        assert np.mean([np.abs(d - f).mean() for d, f in zip(decoded, frames, strict=True)]) < 16
        # One palette for the whole clip: all frames together use at most 256 colours.
        colours = np.unique(np.concatenate([d.reshape(-1, 3) for d in decoded]), axis=0)
        assert len(colours) <= 256


def test_webp_frames_decode_close_to_input() -> None:
    frames = _clip(noise=0)
    lossy = _decode(encode_animation(frames, 8, "webp", META))
    assert np.mean([np.abs(d - f).mean() for d, f in zip(lossy, frames, strict=True)]) < 6
    lossless = _decode(encode_animation(frames, 8, "webp", META, lossless=True))
    assert all(np.array_equal(d, f) for d, f in zip(lossless, frames, strict=True))


@pytest.mark.parametrize("fmt", ANIMATION_FORMATS)
def test_repeated_frames_are_stored_once_and_keep_the_total(fmt: str) -> None:
    a, b = _clip(2, 32)
    info = read_animation(encode_animation([a, a, a, b], 10, fmt, META))
    assert info.frame_count == 2
    assert info.durations_ms == [300, 100]


@pytest.mark.parametrize("fmt", ANIMATION_FORMATS)
def test_single_frame_keeps_the_label(fmt: str) -> None:
    info = read_animation(encode_animation(_clip(1, 32), 8, fmt, META))
    assert info.frame_count == 1
    assert info.metadata == META


def test_poster_is_a_labelled_png() -> None:
    frame = _clip(1)[0]
    poster = encode_poster(frame, META)
    assert poster.startswith(b"\x89PNG\r\n\x1a\n")
    assert poster == encode_image(frame, "png", META)
    assert read_metadata(poster) == META
    assert np.array_equal(_decode(poster)[0], frame)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fmt": "mp4"}, r"'mp4'.*webp, gif"),
        ({"fmt": "png"}, r"'png'.*webp, gif"),
        ({"fps": 0}, r"fps.*1\.\.50.*0"),
        ({"fps": 51}, r"fps.*1\.\.50.*51"),
        ({"fps": 8.0}, r"fps.*8\.0"),
        ({"fps": True}, "fps"),
        ({"quality": 0}, r"quality.*1\.\.100"),
        ({"lossless": "yes"}, "lossless"),
        ({"dither": "ordered"}, r"'ordered'.*floyd-steinberg, none"),
        ({"frames": []}, "empty"),
        ({"frames": np.zeros((0, 8, 8, 3), np.uint8)}, "empty"),
        ({"frames": np.zeros((8, 8, 3), np.uint8)}, r"\(F, H, W, 3\).*\(8, 8, 3\)"),
        ({"frames": [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8)]}, "frame 1 has shape"),
        ({"frames": [np.zeros((8, 8, 3), np.float32)]}, "frame 0 must be uint8"),
        ({"frames": [np.zeros((8, 8, 4), np.uint8)]}, "frame 0 must be a non-empty HxWx3"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict, message: str) -> None:
    args = {"frames": _clip(2, 8), "fps": 8, "fmt": "webp", "metadata": META, **kwargs}
    with pytest.raises(ValueError, match=message):
        encode_animation(**args)


def test_read_animation_rejects_other_files() -> None:
    with pytest.raises(ValueError, match="not a readable image"):
        read_animation(b"GIF89a but not really")
    with pytest.raises(ValueError, match="not an animation: PNG"):
        read_animation(encode_image(_clip(1)[0], "png", META))
    frames = [Image.fromarray(f) for f in _clip(2, 16)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], comment="made by hand\nbirdgen: {}")
    with pytest.raises(ValueError, match="no birdgen metadata"):
        read_animation(buf.getvalue())
    with pytest.raises(ValueError, match="no birdgen metadata"):
        read_metadata(buf.getvalue())
