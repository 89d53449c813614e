"""`birdgen qa ...` and `birdgen pregenerate --qa` options: light to import (torch, OpenCV and the
verifier's model load only when a command runs)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from birdgen.qa.review import DECISIONS_ALLOWED, REVIEW_FOLDER, ReviewQueue

if TYPE_CHECKING:
    from birdgen.qa.gate import QaGate

DEFAULT_OUT = Path("outputs/pregenerated")


def add_gate_arguments(parser: argparse.ArgumentParser) -> None:
    """`birdgen pregenerate`'s QA options."""
    group = parser.add_argument_group("quality assurance (docs/qa.md)")
    group.add_argument(
        "--qa", action="store_true", help="judge every item, redraw failing ones, queue a share for review"
    )
    group.add_argument("--verifier", type=Path, help="zero-shot species verifier: a local CLIP model folder")
    group.add_argument("--classifier", type=Path, help="optional bird classifier: a local model folder")
    group.add_argument("--qa-config", type=Path, help="thresholds (default: the bundled data/qa.yaml)")


def gate_from_args(args: argparse.Namespace, image_options: dict[str, Any]) -> QaGate | None:
    """The `--qa` gate of a pregenerate run into `args.out`, or None without --qa."""
    if not args.qa:
        if args.verifier or args.classifier or args.qa_config:
            raise ValueError("--verifier, --classifier and --qa-config need --qa")
        return None
    if str(image_options.get("format", "")).lower() == "eink":
        raise ValueError("--qa judges photos, not e-ink previews: pre-generate the png catalogue with --qa")
    from birdgen.qa.gate import QaGate, QualityChecker, load_judges
    from birdgen.qa_config import QaConfig

    config = QaConfig.load(args.qa_config)
    if args.verifier is None:
        print(
            "birdgen pregenerate: --qa without --verifier: quality gates only, species unverified",
            file=sys.stderr,
        )
    judges = load_judges(config, args.verifier, args.classifier)
    return QaGate(QualityChecker(config, judges), args.out / REVIEW_FOLDER)


def add_parser(commands: Any) -> None:
    """`birdgen qa check | report | review list | review approve | review reject`."""
    qa = commands.add_parser(
        "qa", help="quality report and human review of a pre-generated catalogue"
    ).add_subparsers(dest="qa_command", required=True)
    p = qa.add_parser("check", help="judge picture files as pregenerate --qa would (JSON verdict per file)")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument(
        "--species", required=True, help="the species the pictures should show (a catalogue name or id)"
    )
    p.add_argument("--verifier", type=Path, help="zero-shot species verifier: a local CLIP model folder")
    p.add_argument("--classifier", type=Path, help="optional bird classifier: a local model folder")
    p.add_argument("--qa-config", type=Path, help="thresholds (default: the bundled data/qa.yaml)")
    p.set_defaults(run=check)
    p = qa.add_parser("report", help="per-species and per-family quality: CSV, markdown, HTML, plots")
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="the catalogue folder pregenerate --qa wrote"
    )
    p.add_argument("--report-dir", type=Path, help="where to write it (default: OUT/qa-report)")
    p.add_argument("--qa-config", type=Path, help="thresholds (default: the bundled data/qa.yaml)")
    p.set_defaults(run=report)
    review = qa.add_parser("review", help="list queued items, approve or reject them").add_subparsers(
        dest="review_command", required=True
    )
    p = review.add_parser("list", help="the queued items (pending ones unless --all)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--all", action="store_true", help="decided items too")
    p.set_defaults(run=review_list)
    for decision, verb in zip(DECISIONS_ALLOWED, ("approve", "reject"), strict=True):
        p = review.add_parser(verb, help=f"record items as {decision}")
        p.add_argument("ids", nargs="+", metavar="ID", help="item ids (a unique prefix is enough)")
        p.add_argument("--out", type=Path, default=DEFAULT_OUT)
        p.add_argument("--reviewer", required=True, help="who decided")
        p.add_argument("--note", default="", help="why (kept with the decision)")
        p.set_defaults(run=review_decide, decision=decision)


def check(args: argparse.Namespace) -> int:
    """One JSON line per picture (its verdict); exit 0 when every picture passed, 1 otherwise."""
    import json

    from PIL import Image

    from birdgen.catalogue import Catalogue
    from birdgen.qa.gate import QualityChecker, load_judges
    from birdgen.qa_config import QaConfig
    from birdgen.schema import parse_image_request

    catalogue = Catalogue.load()
    known = catalogue.lookup(species_id=args.species, scientific_name=args.species, common_name=args.species)
    fields = (
        {"species": known.common_name, "species_id": known.species_id} if known else {"species": args.species}
    )
    request = parse_image_request(fields)
    config = QaConfig.load(args.qa_config)
    checker = QualityChecker(
        config, load_judges(config, args.verifier, args.classifier, catalogue), catalogue
    )
    passed = True
    for path in args.images:
        with Image.open(path) as image:
            image.load()
            verdict = checker.check(image, request)
        passed &= verdict.passed
        print(json.dumps({"image": str(path), **verdict.record()}))
    return 0 if passed else 1


def report(args: argparse.Namespace) -> int:
    from birdgen.qa.report import REPORT_FOLDER, build_report, write_report
    from birdgen.qa_config import QaConfig

    if not (args.out / "manifest.jsonl").is_file():
        raise ValueError(f"{args.out} has no manifest.jsonl: point --out at a pregenerate --qa output folder")
    built = build_report(args.out, QaConfig.load(args.qa_config))
    folder = args.report_dir or args.out / REPORT_FOLDER
    written = write_report(built, folder)
    highlighted = [g.name for g in built.species if g.worse]
    print(
        f"qa report: {len(built.items)} items, {len(built.species)} species, {len(highlighted)} highlighted "
        f"({', '.join(highlighted) or 'none'}); {len(written)} files in {folder}"
    )
    return 0


def review_list(args: argparse.Namespace) -> int:
    entries = [
        e for e in ReviewQueue(args.out / REVIEW_FOLDER).entries() if args.all or e.status == "pending"
    ]
    table = Table("id", "kind", "species", "reason", "failures", "status", "image")
    for entry in entries:
        qa = entry.entry.get("qa", {})
        failures = qa.get("draws", [{}])[qa.get("chosen", 0)].get("failures", []) if qa else []
        table.add_row(
            entry.id,
            entry.entry.get("kind", ""),
            entry.entry.get("species", ""),
            entry.entry.get("reason", ""),
            "; ".join(failures),
            entry.status,
            str(args.out / REVIEW_FOLDER / entry.entry["image"]),
        )
    Console(width=200).print(table)
    print(f"{len(entries)} item(s)")
    return 0


def review_decide(args: argparse.Namespace) -> int:
    queue = ReviewQueue(args.out / REVIEW_FOLDER)
    for item_id in args.ids:
        record = queue.decide(item_id, args.decision, reviewer=args.reviewer, note=args.note)
        print(f"{record['id']}: {record['decision']} by {record['reviewer']}")
    return 0
