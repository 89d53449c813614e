"""BirdDataset on synthetic photos: the gates and their reasons, deterministic augmentation, SDXL
micro-conditioning and the attribution kept with a LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from birdgen.catalogue import Catalogue, UnknownFamilyError
from birdgen.prompts import PromptLibrary
from birdgen.qa.measures import laplacian_variance
from birdgen.schema import ImageRequest
from birdgen.training.dataset import (
    BAD_METADATA,
    DUPLICATE,
    LICENCE,
    MISSING_FILE,
    TOO_BLURRY,
    TOO_SMALL,
    UNKNOWN_FAMILY,
    UNREADABLE,
    BirdDataset,
    DatasetError,
    normalise_licence,
    write_attribution,
)

RESOLUTION = 64


def textured(width: int, height: int, seed: int) -> Image.Image:
    """A sharp synthetic 'photo': smooth colour gradients plus fine noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([x * 200, y * 200, (1 - x) * 150], axis=-1)
    pixels = np.clip(base + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def row(file: str, **overrides: str) -> dict[str, str]:
    return {
        "file": file,
        "species": "American Robin",
        "scientific_name": "Turdus migratorius",
        "family": "Passeriformes",
        "source": "https://example.org/" + file,
        "licence": "CC-BY-4.0",
        "author": "A. Birder",
        **overrides,
    }


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def photo_dir(tmp_path: Path) -> Path:
    textured(128, 96, 1).save(tmp_path / "robin_wide.png")
    textured(80, 120, 2).save(tmp_path / "robin_tall.jpg", quality=95)
    textured(96, 96, 3).save(tmp_path / "gull.png")
    textured(96, 96, 4).save(tmp_path / "nc.png")
    textured(40, 40, 5).save(tmp_path / "tiny.png")
    textured(128, 96, 6).filter(ImageFilter.GaussianBlur(6)).save(tmp_path / "blurred.png")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    write_jsonl(
        tmp_path / "metadata.jsonl",
        [
            row("robin_wide.png", licence="cc by 4.0"),
            row("robin_tall.jpg", licence="CC0-1.0", pose="flying", season="winter"),
            row("gull.png", species="European Herring Gull", family="Charadriiformes", licence="CC0"),
            row("nc.png", licence="CC-BY-NC-4.0"),
            row("tiny.png"),
            row("blurred.png"),
            row("broken.jpg"),
            row("absent.png"),
            row("robin_wide.png"),
            row("no_author.png", author=""),
            row("bad_pose.png", pose="somersault"),
        ],
    )
    return tmp_path


def test_licence_spellings_normalise() -> None:
    assert {normalise_licence(t) for t in ("CC-BY-4.0", "cc by 4.0", "CC BY 2.0", "CC-BY")} == {"CC-BY"}
    assert normalise_licence("https://creativecommons.org/licenses/by/4.0/") == "CC-BY"
    assert {normalise_licence(t) for t in ("CC0", "CC0 1.0", "cc0-1.0")} == {"CC0"}
    assert normalise_licence("CC BY-NC 4.0") == "CC-BY-NC"
    assert normalise_licence("Creative Commons Attribution-ShareAlike 4.0") == "CC-BY-SA"


def test_rejections_name_file_and_reason(photo_dir: Path) -> None:
    data = BirdDataset(photo_dir, resolution=RESOLUTION)
    reasons = {(r.file, r.reason) for r in data.rejected}
    assert reasons == {
        ("nc.png", LICENCE),
        ("tiny.png", TOO_SMALL),
        ("blurred.png", TOO_BLURRY),
        ("broken.jpg", UNREADABLE),
        ("absent.png", MISSING_FILE),
        ("robin_wide.png", DUPLICATE),
        ("no_author.png", BAD_METADATA),
        ("bad_pose.png", BAD_METADATA),
    }
    assert [r.file for r in data.records] == ["robin_wide.png", "robin_tall.jpg", "gull.png"]
    details = {r.file: r.detail for r in data.rejected}
    assert "CC-BY-NC" in details["nc.png"] and "40x40" in details["tiny.png"]
    assert "sharpness" in details["blurred.png"] and "author" in details["no_author.png"]
    assert "pose" in details["bad_pose.png"]
    assert data.rejection_counts()[BAD_METADATA] == 2


def test_family_filter_and_licence_list(photo_dir: Path) -> None:
    data = BirdDataset(photo_dir, resolution=RESOLUTION, family="passeriformes")
    assert data.family == "Passeriformes"
    assert ("gull.png", UNKNOWN_FAMILY) in {(r.file, r.reason) for r in data.rejected}
    assert [r.file for r in data.records] == ["robin_wide.png", "robin_tall.jpg"]

    permissive = BirdDataset(photo_dir, resolution=RESOLUTION, licences=["CC0", "cc-by", "CC BY-NC"])
    assert "nc.png" in [r.file for r in permissive.records]
    cc0_only = BirdDataset(photo_dir, resolution=RESOLUTION, licences=["CC0"])
    assert [r.file for r in cc0_only.records] == ["robin_tall.jpg", "gull.png"]


def test_thresholds_are_configurable(photo_dir: Path) -> None:
    lenient = BirdDataset(photo_dir, resolution=RESOLUTION, min_side=32, min_sharpness=0.0)
    assert {"tiny.png", "blurred.png"} <= {r.file for r in lenient.records}
    strict = BirdDataset(photo_dir, resolution=RESOLUTION, min_sharpness=1e9)
    assert len(strict) == 0


def test_sharpness_separates_sharp_from_blurred() -> None:
    sharp = textured(64, 64, 0)
    blurred = sharp.filter(ImageFilter.GaussianBlur(3))
    assert laplacian_variance(np.asarray(sharp.convert("L"))) > 20 * laplacian_variance(
        np.asarray(blurred.convert("L"))
    )
    assert laplacian_variance(np.zeros((32, 32))) == 0.0


def test_captions_come_from_the_serving_templates(photo_dir: Path) -> None:
    data = BirdDataset(photo_dir, resolution=RESOLUTION)
    library = PromptLibrary.load()
    served = library.build(ImageRequest(species="American Robin", scientific_name="Turdus migratorius"))
    assert data[0]["caption"] == served.text
    flying = ImageRequest(
        species="American Robin", scientific_name="Turdus migratorius", pose="flying", season="winter"
    )
    assert data[1]["caption"] == library.build(flying).text
    assert "flying" in data[1]["caption"] and "winter" in data[1]["caption"]
    assert data.records[1].pose == "flying"


def test_metadata_caption_wins_and_csv_works(tmp_path: Path) -> None:
    textured(96, 96, 7).save(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text(
        "file,species,family,source,License,author,caption\n"
        "a.png,Blue Jay,Passeriformes,https://example.org/a,CC BY 4.0,J. Doe,a blue jay on a feeder\n"
    )
    data = BirdDataset(tmp_path, resolution=RESOLUTION)
    assert not data.rejected
    assert data[0]["caption"] == "a blue jay on a feeder"
    assert data.records[0].licence == "CC BY 4.0" and data.records[0].licence_key == "CC-BY"


def test_malformed_metadata_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "metadata.jsonl").write_text(json.dumps(row("a.png")) + "\n{not json\n")
    with pytest.raises(DatasetError, match=r"metadata.jsonl:2"):
        BirdDataset(tmp_path, resolution=RESOLUTION)
    with pytest.raises(DatasetError, match="no metadata file"):
        BirdDataset(tmp_path / "nowhere", resolution=RESOLUTION)


def test_item_shape_range_and_micro_conditioning(photo_dir: Path) -> None:
    data = BirdDataset(photo_dir, resolution=RESOLUTION, seed=3)
    for index in range(len(data)):
        item = data[index]
        pixels = item["pixel_values"]
        assert pixels.shape == (3, RESOLUTION, RESOLUTION) and pixels.dtype == torch.float32
        assert pixels.min() >= -1.0 and pixels.max() <= 1.0
        assert item["target_size"] == (RESOLUTION, RESOLUTION)
        assert item["record"] is data.records[index]
    wide, tall = data[0], data[1]
    assert wide["original_size"] == (96, 128) and tall["original_size"] == (120, 80)
    # 128x96 resizes to 85x64: the crop moves along the width only, inside the resized image.
    top, left = wide["crop_top_left"]
    assert top == 0 and 0 <= left <= 85 - RESOLUTION
    top, left = tall["crop_top_left"]
    assert left == 0 and 0 <= top <= 96 - RESOLUTION


def test_centre_crop_without_augmentation_matches_a_plain_resize(photo_dir: Path) -> None:
    data = BirdDataset(photo_dir, resolution=RESOLUTION, flip=False, random_crop=False, jitter=0.0)
    item = data[0]
    assert item["crop_top_left"] == (0, (85 - RESOLUTION) // 2)
    resized = (
        Image.open(photo_dir / "robin_wide.png").convert("RGB").resize((85, 64), Image.Resampling.BICUBIC)
    )
    left = (85 - RESOLUTION) // 2
    expected = np.asarray(resized.crop((left, 0, left + RESOLUTION, RESOLUTION)), dtype=np.float32)
    assert torch.equal(item["pixel_values"], torch.from_numpy(expected).permute(2, 0, 1) / 127.5 - 1.0)


def test_flip_reports_the_crop_in_flipped_coordinates(photo_dir: Path) -> None:
    """Find an epoch where the wide photo is flipped; its pixels are the mirrored unflipped crop."""
    plain = BirdDataset(photo_dir, resolution=RESOLUTION, flip=False, jitter=0.0, seed=5)
    flipping = BirdDataset(photo_dir, resolution=RESOLUTION, flip=True, jitter=0.0, seed=5)
    for epoch in range(20):
        plain.set_epoch(epoch)
        flipping.set_epoch(epoch)
        a, b = plain[0], flipping[0]
        if not torch.equal(a["pixel_values"], b["pixel_values"]):
            assert torch.equal(b["pixel_values"], a["pixel_values"].flip(-1))
            assert b["crop_top_left"][1] == 85 - RESOLUTION - a["crop_top_left"][1]
            return
    pytest.fail("no flip in 20 epochs")


def test_augmentation_is_a_function_of_seed_epoch_index(photo_dir: Path) -> None:
    first = BirdDataset(photo_dir, resolution=RESOLUTION, seed=11)
    second = BirdDataset(photo_dir, resolution=RESOLUTION, seed=11)
    # Global RNG state must not matter: disturb it between the two reads.
    torch.manual_seed(0)
    np.random.seed(0)
    a = [first[i] for i in range(len(first))]
    torch.manual_seed(123)
    np.random.seed(123)
    second[2]  # reading out of order changes nothing either
    b = [second[i] for i in range(len(second))]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["pixel_values"], y["pixel_values"])
        assert x["caption"] == y["caption"] and x["crop_top_left"] == y["crop_top_left"]

    second.set_epoch(1)
    later = [second[i] for i in range(len(second))]
    assert any(not torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(a, later, strict=True))
    assert [x["caption"] for x in a] == [y["caption"] for y in later]
    second.set_epoch(0)
    assert torch.equal(second[1]["pixel_values"], a[1]["pixel_values"])

    other_seed = BirdDataset(photo_dir, resolution=RESOLUTION, seed=12)
    assert any(not torch.equal(other_seed[i]["pixel_values"], a[i]["pixel_values"]) for i in range(3))


def test_attribution_lists_accepted_photos(photo_dir: Path, tmp_path: Path) -> None:
    data = BirdDataset(photo_dir, resolution=RESOLUTION)
    entries = data.attribution()
    assert [e["file"] for e in entries] == ["robin_wide.png", "robin_tall.jpg", "gull.png"]
    assert entries[0] == {
        "file": "robin_wide.png",
        "species": "American Robin",
        "source": "https://example.org/robin_wide.png",
        "author": "A. Birder",
        "licence": "cc by 4.0",
    }
    md, js = write_attribution(tmp_path / "out", entries, title="Passeriformes")
    assert json.loads(js.read_text()) == entries
    text = md.read_text()
    assert "Passeriformes" in text and "European Herring Gull" in text and "nc.png" not in text
    assert text.count("A. Birder") == 3


def test_exif_orientation_gives_the_upright_size(tmp_path: Path) -> None:
    """A camera's portrait JPEG is stored landscape with an Orientation tag; SDXL is told the upright size."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    textured(120, 80, 8).save(tmp_path / "portrait.jpg", quality=95, exif=exif)
    write_jsonl(tmp_path / "metadata.jsonl", [row("portrait.jpg")])
    item = BirdDataset(tmp_path, resolution=RESOLUTION)[0]
    assert item["original_size"] == (120, 80)


def test_family_from_the_catalogue(tmp_path: Path) -> None:
    """A row may give the order, a taxonomic family, or nothing: the species catalogue fills the family."""
    for i in range(4):
        textured(96, 96, 20 + i).save(tmp_path / f"{i}.png")
    no_family = row("0.png", family="")
    gull = row("2.png", species="Herring Gull", scientific_name="Larus argentatus", family="")
    unknown = row("3.png", species="Imaginary Warbler", scientific_name="", family="")
    write_jsonl(tmp_path / "metadata.jsonl", [no_family, row("1.png", family="Turdidae"), gull, unknown])
    data = BirdDataset(tmp_path, resolution=RESOLUTION, family="Passeriformes")
    assert [(r.file, r.family) for r in data.records] == [
        ("0.png", "Passeriformes"),
        ("1.png", "Passeriformes"),
    ]
    rejected = {r.file: r for r in data.rejected}
    assert rejected["2.png"].reason == UNKNOWN_FAMILY and "Charadriiformes" in rejected["2.png"].detail
    assert rejected["3.png"].reason == UNKNOWN_FAMILY and "not in the catalogue" in rejected["3.png"].detail


def test_a_family_the_catalogue_does_not_know_is_the_resolvers_error(tmp_path: Path) -> None:
    """Rows and `--family` go through Catalogue.family: the same error as a request or `--lora` gets."""
    for i in range(2):
        textured(96, 96, 30 + i).save(tmp_path / f"{i}.png")
    write_jsonl(tmp_path / "metadata.jsonl", [row("0.png", family="Dinosauria"), row("1.png", family="")])
    data = BirdDataset(tmp_path, resolution=RESOLUTION)  # every family: still no room for a made-up one
    assert [r.file for r in data.records] == ["1.png"]
    (rejected,) = data.rejected
    assert rejected.reason == UNKNOWN_FAMILY
    assert rejected.detail == str(UnknownFamilyError("Dinosauria", Catalogue.load().families))
    with pytest.raises(UnknownFamilyError, match="invalid 'family': got 'Passerines'"):
        BirdDataset(tmp_path, resolution=RESOLUTION, family="Passerines")
