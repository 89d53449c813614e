"""`birdgen qa report`: every species once, per-family rows, review outcomes, and a planted
low-quality species highlighted against the catalogue's median."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from birdgen.catalogue import Catalogue
from birdgen.cli import main
from birdgen.client.pregenerate import MANIFEST
from birdgen.qa.report import build_report, write_report
from birdgen.qa.review import REVIEW_FOLDER, ReviewQueue
from birdgen.qa_config import QaConfig

SPECIES = ["amerob", "norcar", "blujay", "mallar3", "killde", "grhowl", "baleag", "rethaw", "mallar3"]
PLANTED = "grhowl"  # Great Horned Owl: served worse than the rest


def draw(species_id: str, n: int, *, bad: bool) -> dict[str, Any]:
    """A kept draw's verdict; good species vary a little around the same quality."""
    wobble = (n % 3) - 1
    return {
        "passed": not bad,
        "failures": ["brisque 61.0 > 35"] if bad else [],
        "brisque": 61.0 if bad else 20.0 + wobble,
        "sharpness": 40.0 if bad else 400.0 + 10 * wobble,
        "seed": 1000 + n,
        "zero_shot": {
            "score": 0.05 if bad else 0.6 + 0.01 * wobble,
            "predicted": "easowl1" if bad else species_id,
            "rank": 9 if bad else 1,
            "threshold": 0.0,
            "top_k": 3,
            "passed": not bad,
        },
    }


def record(species_id: str, kind: str, n: int, **extra: Any) -> dict[str, Any]:
    species = Catalogue.load().lookup(species_id=species_id)
    bad = species_id == PLANTED
    verdict = draw(species_id, n, bad=bad)
    return {
        "id": f"{species_id}-{kind}",
        "kind": kind,
        "species_id": species_id,
        "species": species.common_name,
        "status": "done",
        "request": {"species": species.common_name, "family": None},
        "qa": {
            "passed": not bad,
            "flagged": bad,
            "seed": verdict["seed"],
            "regenerations": 3 if bad else n % 2,
            "chosen": 0,
            "draws": [verdict],
            "review": False,
        },
        **extra,
    }


@pytest.fixture
def catalogue_folder(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    lines = []
    for n, species_id in enumerate(dict.fromkeys(SPECIES)):
        for kind in ("image", "animation"):
            lines.append(record(species_id, kind, n))
    lines.append(record("amerob", "image", 7))  # a later line about an item wins (a resumed run)
    lines.append({"id": "failed-one", "kind": "image", "species_id": "comloo", "status": "failed"})
    lines.append({**record("comloo", "image", 1), "id": "no-qa", "qa": None} | {"status": "done"})
    (out / MANIFEST).write_text(
        "\n".join(json.dumps({k: v for k, v in r.items() if v is not None}) for r in lines)
    )
    queue = ReviewQueue(out / REVIEW_FOLDER)
    for item_id in ("grhowl-image", "amerob-image", "blujay-animation"):
        queue.enqueue({"id": item_id, "kind": "image"}, b"picture", ".png")
    queue.decide("grhowl-image", "rejected", reviewer="ana")
    queue.decide("amerob-image", "approved", reviewer="ana")
    return out


def test_the_report_lists_every_species_once_and_highlights_the_planted_one(catalogue_folder: Path) -> None:
    report = build_report(catalogue_folder)
    names = [group.items[0]["species_id"] for group in report.species]
    assert sorted(names) == sorted(set(SPECIES))  # once each; failed and QA-less items left out
    assert report.skipped == 1 and len(report.items) == 2 * len(set(SPECIES))
    highlighted = {group.items[0]["species_id"]: group.worse for group in report.species if group.worse}
    assert highlighted == {PLANTED: ["verification", "brisque", "sharpness"]}
    assert report.medians["brisque"] == pytest.approx(20.0, abs=1.0)
    owl = next(group for group in report.species if group.items[0]["species_id"] == PLANTED)
    assert owl.row() | {} == owl.row() and owl.row()["rejected"] == 1 and owl.row()["flagged"] == 2
    assert owl.row()["accuracy"] == 0.0
    robin = next(group for group in report.species if group.items[0]["species_id"] == "amerob")
    assert robin.row()["approved"] == 1 and robin.row()["regenerations"] == 1  # the later line counted
    families = {group.name: group for group in report.families}
    assert families["Strigiformes"].row()["items"] == 2 and "Passeriformes" in families


def test_the_margin_is_a_share_of_each_median(catalogue_folder: Path) -> None:
    """Margin 1: BRISQUE 61 is past 20 + 20, but sharpness 40 is not below 400 - 400, nor a
    verification of 0.05 below 0.6 - 0.6."""
    config = QaConfig.load()
    wide = config.model_copy(update={"report": config.report.model_copy(update={"margin": 1.0})})
    assert {g.name: g.worse for g in build_report(catalogue_folder, wide).species if g.worse} == {
        "Great Horned Owl": ["brisque"]
    }


def test_the_cli_writes_csv_markdown_html_and_plots(
    catalogue_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["qa", "report", "--out", str(catalogue_folder)]) == 0
    said = capsys.readouterr().out
    assert (
        f"{2 * len(set(SPECIES))} items, {len(set(SPECIES))} species, 1 highlighted (Great Horned Owl)"
        in said
    )
    folder = catalogue_folder / "qa-report"
    with (folder / "species.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert sorted(row["species_id"] for row in rows) == sorted(set(SPECIES))
    assert {row["species_id"]: row["highlighted"] for row in rows if row["highlighted"]} == {
        PLANTED: "verification brisque sharpness"
    }
    with (folder / "items.csv").open() as file:
        assert len(list(csv.DictReader(file))) == 2 * len(set(SPECIES))
    assert (folder / "families.csv").read_text().startswith("family,items,")
    for plot in ("verification.png", "brisque.png", "sharpness.png"):
        assert (folder / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (folder / "classifier.png").exists()  # no classifier scores: no plot
    markdown = (folder / "report.md").read_text()
    highlighted = markdown.split("## Highlighted species")[1].split("## Families")[0]
    assert "Great Horned Owl" in highlighted and "American Robin" not in highlighted
    header, _, owl = highlighted.strip().splitlines()
    columns = dict(zip(header.strip("| ").split(" | "), owl.strip("| ").split(" | "), strict=True))
    assert columns | {"brisque": "61.0", "sharpness": "40.0", "accuracy": "0.0", "rejected": "1"} == columns
    assert "![brisque.png](brisque.png)" in markdown and "1 approved, 1 rejected, 1 pending" in markdown
    page = (folder / "report.html").read_text()
    assert page.count("<tr class=worse>") == 1 and '<img src="brisque.png"' in page

    assert main(["qa", "report", "--out", str(catalogue_folder / "nowhere")]) == 2
    assert "has no manifest.jsonl" in capsys.readouterr().err


def test_write_report_on_an_empty_catalogue_still_writes_its_tables(tmp_path: Path) -> None:
    (tmp_path / MANIFEST).write_text("")
    written = write_report(build_report(tmp_path), tmp_path / "report")
    assert {p.name for p in written} == {
        "items.csv",
        "species.csv",
        "families.csv",
        "report.md",
        "report.html",
    }
