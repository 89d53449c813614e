"""`birdgen qa report`: per-species and per-family quality of a pre-generated catalogue.

Reads the catalogue folder a `birdgen pregenerate --qa` run wrote (manifest.jsonl and the review
folder) and writes items.csv (one row per item: the kept draw's scores), species.csv and
families.csv (means and counts), and report.md / report.html with one plot per measure. A species is
highlighted when a measure is worse than the catalogue's median (over species) by data/qa.yaml's
`report.margin` of that median: rare species must not be served worse than common ones. No torch.
"""

from __future__ import annotations

import csv
import html
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from birdgen.catalogue import Catalogue
from birdgen.client.pregenerate import MANIFEST, read_jsonl
from birdgen.qa.review import REVIEW_FOLDER, ReviewQueue
from birdgen.qa_config import QaConfig

REPORT_FOLDER = "qa-report"
# measure -> (column, higher is better); the order of the report's columns and plots.
MEASURES = {
    "verification": ("zero_shot", True),
    "classifier": ("classifier", True),
    "brisque": ("brisque", False),
    "sharpness": ("sharpness", True),
}
ITEM_COLUMNS = (
    "id", "kind", "species_id", "species", "family", "verification", "predicted", "accurate",
    "classifier", "brisque", "sharpness", "passed", "regenerations", "flagged", "review",
)  # fmt: skip
GROUP_COLUMNS = (
    "items", "verification", "accuracy", "classifier", "brisque", "sharpness", "regenerations",
    "flagged", "reviewed", "approved", "rejected",
)  # fmt: skip


@dataclass
class Group:
    """A species' or family's items; `worse` names each measure it is highlighted for."""

    name: str
    family: str
    items: list[dict[str, Any]] = field(default_factory=list)
    worse: list[str] = field(default_factory=list)

    def mean(self, measure: str) -> float | None:
        values = [row[measure] for row in self.items if row[measure] is not None]
        return statistics.fmean(values) if values else None

    def count(self, column: str, value: Any = True) -> int:
        return sum(row[column] == value for row in self.items)

    def row(self) -> dict[str, Any]:
        reviewed = sum(row["review"] not in ("", "not sampled") for row in self.items)
        accurate = [row["accurate"] for row in self.items if row["accurate"] is not None]
        return {
            "items": len(self.items),
            **{m: _round(self.mean(m)) for m in MEASURES},
            "accuracy": _round(statistics.fmean(accurate)) if accurate else None,
            "regenerations": sum(row["regenerations"] for row in self.items),
            "flagged": self.count("flagged"),
            "reviewed": reviewed,
            "approved": self.count("review", "approved"),
            "rejected": self.count("review", "rejected"),
        }


@dataclass
class QaReport:
    items: list[dict[str, Any]]
    species: list[Group]
    families: list[Group]
    medians: dict[str, float]
    margin: float
    skipped: int  # done items without QA verdicts (a run without --qa)


def _round(value: float | None) -> float | None:
    """Four significant digits: probabilities over hundreds of species are small numbers."""
    return None if value is None else float(f"{value:.4g}")


def item_rows(out: Path, catalogue: Catalogue) -> tuple[list[dict[str, Any]], int]:
    """One row per done item with QA verdicts (its kept draw), and how many done items had none."""
    records, _ = read_jsonl(out / MANIFEST)
    reviews = {entry.id: entry.status for entry in ReviewQueue(out / REVIEW_FOLDER).entries()}
    rows, skipped = [], 0
    for record in records.values():
        if record.get("status") != "done":
            continue
        qa = record.get("qa")
        if qa is None:
            skipped += 1
            continue
        draw = qa["draws"][qa["chosen"]]
        request = record["request"]
        known = catalogue.lookup(species_id=record["species_id"])
        zero_shot = draw.get("zero_shot") or {}
        classifier = draw.get("classifier") or {}
        rows.append(
            {
                "id": record["id"],
                "kind": record["kind"],
                "species_id": record["species_id"],
                "species": record["species"],
                "family": request.get("family") or (known.family if known else "unknown"),
                "verification": zero_shot.get("score"),
                "predicted": zero_shot.get("predicted", ""),
                "accurate": (zero_shot["predicted"] == record["species_id"]) if zero_shot else None,
                "classifier": classifier.get("score"),
                "brisque": draw["brisque"],
                "sharpness": draw["sharpness"],
                "passed": qa["passed"],
                "regenerations": qa["regenerations"],
                "flagged": qa["flagged"],
                "review": reviews.get(record["id"], "not sampled"),
            }
        )
    rows.sort(key=lambda row: (row["family"], row["species_id"], row["kind"]))
    return rows, skipped


def _groups(rows: Iterable[dict[str, Any]], key: str) -> list[Group]:
    groups: dict[str, Group] = {}
    for row in rows:
        group = groups.setdefault(
            row[key], Group(row[key] if key == "family" else row["species"], row["family"])
        )
        group.items.append(row)
    return list(groups.values())


def build_report(out: Path, config: QaConfig | None = None, catalogue: Catalogue | None = None) -> QaReport:
    """The report of the catalogue folder `out`; see the module docstring for the highlighting."""
    config = config or QaConfig.load()
    rows, skipped = item_rows(out, catalogue or Catalogue.load())
    species = _groups(rows, "species_id")
    margin = config.report.margin
    medians = {}
    for measure, (_, higher_is_better) in MEASURES.items():
        means = [(group, group.mean(measure)) for group in species]
        values = [value for _, value in means if value is not None]
        if len(values) < 2:
            continue  # one species has nothing to be worse than
        median = medians[measure] = statistics.median(values)
        slack = margin * abs(median)
        for group, value in means:
            if value is not None and (value < median - slack if higher_is_better else value > median + slack):
                group.worse.append(measure)
    return QaReport(rows, species, _groups(rows, "family"), medians, margin, skipped)


def write_report(report: QaReport, folder: Path, title: str = "birdgen quality report") -> list[Path]:
    """items.csv, species.csv, families.csv, one PNG per measure with values, report.md and report.html."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [
        _write_csv(folder / "items.csv", ITEM_COLUMNS, report.items),
        _write_csv(
            folder / "species.csv",
            ("species_id", "species", "family", *GROUP_COLUMNS, "highlighted"),
            [
                {"species_id": g.items[0]["species_id"], "species": g.name, "family": g.family}
                | g.row()
                | {"highlighted": " ".join(g.worse)}
                for g in report.species
            ],
        ),
        _write_csv(
            folder / "families.csv",
            ("family", *GROUP_COLUMNS),
            [{"family": g.name} | g.row() for g in report.families],
        ),
    ]
    plots = _plot(report, folder)
    written += plots
    for path, render in ((folder / "report.md", _markdown), (folder / "report.html", _html)):
        path.write_text(render(report, title, [p.name for p in plots]), encoding="utf-8")
        written.append(path)
    return written


def _write_csv(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return path


def _plot(report: QaReport, folder: Path, worst: int = 25) -> list[Path]:
    """Per measure: the species' means as a histogram (median and margin marked) and the `worst`
    species as bars, highlighted ones in red."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display here
    import matplotlib.pyplot as plt

    paths = []
    for measure, (_, higher_is_better) in MEASURES.items():
        means = [(g, g.mean(measure)) for g in report.species]
        means = [(g, v) for g, v in means if v is not None]
        if not means:
            continue
        means.sort(key=lambda gv: gv[1], reverse=not higher_is_better)  # worst first
        figure, (spread, bars) = plt.subplots(1, 2, figsize=(12, max(4.0, 0.25 * min(worst, len(means)) + 1)))
        spread.hist([v for _, v in means], bins=min(30, max(5, len(means))), color="C0")
        median = report.medians.get(measure)
        if median is not None:
            slack = report.margin * abs(median)
            spread.axvline(median, color="k", label="median")
            spread.axvline(
                median + (-slack if higher_is_better else slack), color="C3", ls="--", label="margin"
            )
            spread.legend()
        spread.set(title=f"{measure}: species means", xlabel=measure, ylabel="species")
        shown = means[:worst][::-1]
        bars.barh(
            [g.name for g, _ in shown],
            [v for _, v in shown],
            color=["C3" if measure in g.worse else "C0" for g, _ in shown],
        )
        better = "higher" if higher_is_better else "lower"
        bars.set(title=f"{min(worst, len(means))} worst species ({better} is better)")
        bars.tick_params(axis="y", labelsize=7)
        figure.tight_layout()
        path = folder / f"{measure}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        paths.append(path)
    return paths


def _summary(report: QaReport) -> list[tuple[str, str]]:
    items = report.items
    accurate = [row["accurate"] for row in items if row["accurate"] is not None]
    reviewed = [row for row in items if row["review"] != "not sampled"]
    lines = [
        ("items", f"{len(items)} ({report.skipped} done item(s) without QA verdicts left out)"),
        ("species / families", f"{len(report.species)} / {len(report.families)}"),
        ("passed every gate", f"{sum(row['passed'] for row in items)} of {len(items)}"),
        ("flagged (no draw passed)", str(sum(row["flagged"] for row in items))),
        ("regenerations", str(sum(row["regenerations"] for row in items))),
        (
            "species accuracy (zero-shot top-1)",
            f"{statistics.fmean(accurate):.1%}" if accurate else "no verifier",
        ),
        (
            "reviewed",
            f"{len(reviewed)} queued: {sum(r['review'] == 'approved' for r in reviewed)} approved, "
            f"{sum(r['review'] == 'rejected' for r in reviewed)} rejected, "
            f"{sum(r['review'] == 'pending' for r in reviewed)} pending",
        ),
        (
            "highlighted species",
            f"{sum(bool(g.worse) for g in report.species)} (margin {report.margin:.0%} of the median)",
        ),
    ]
    lines += [(f"median {m} (over species)", f"{v:.3f}") for m, v in report.medians.items()]
    return lines


def _table(report: QaReport, groups: Sequence[Group], key: str) -> tuple[list[str], list[list[str]]]:
    header = [key, *GROUP_COLUMNS, "highlighted"]
    rows = [
        [g.name, *("" if (v := g.row()[c]) is None else str(v) for c in GROUP_COLUMNS), ", ".join(g.worse)]
        for g in groups
    ]
    return header, rows


def _markdown(report: QaReport, title: str, plots: Sequence[str]) -> str:
    def table(header: list[str], rows: list[list[str]]) -> list[str]:
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
            "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows
        ]

    highlighted = [g for g in report.species if g.worse]
    lines = [f"# {title}", "", *(f"- **{k}**: {v}" for k, v in _summary(report)), ""]
    lines += ["## Highlighted species", ""]
    lines += table(*_table(report, highlighted, "species")) if highlighted else ["None."]
    lines += ["", "## Families", "", *table(*_table(report, report.families, "family")), ""]
    lines += ["## Plots", "", *(f"![{name}]({name})" for name in plots), ""]
    lines += ["Every species: species.csv; every item: items.csv.", ""]
    return "\n".join(lines)


def _html(report: QaReport, title: str, plots: Sequence[str]) -> str:
    def table(header: list[str], rows: list[list[str]]) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join(
            f"<tr{' class=worse' if row[-1] else ''}>"
            + "".join(f"<td>{html.escape(c)}</td>" for c in row)
            + "</tr>"
            for row in rows
        )
        return f"<table><tr>{head}</tr>{body}</table>"

    summary = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in _summary(report))
    images = "".join(f'<img src="{html.escape(name)}" alt="{html.escape(name)}">' for name in plots)
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}"
        "tr.worse{background:#fdd}img{max-width:100%}"
        f"</style></head><body><h1>{html.escape(title)}</h1><ul>{summary}</ul>"
        f"<h2>Species</h2>{table(*_table(report, report.species, 'species'))}"
        f"<h2>Families</h2>{table(*_table(report, report.families, 'family'))}"
        f"<h2>Plots</h2>{images}</body></html>\n"
    )
