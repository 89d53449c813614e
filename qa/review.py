"""Human review: a sampled share of generated items, queued with picture, metadata and scores.

The queue is a folder (by default `<catalogue>/review/`): `queue.jsonl` (one entry per queued item,
the last line about an item wins), `images/<item id>.<ext>` (the picture judged, copied, so a later
run rewriting the catalogue file cannot change what a reviewer sees) and `decisions.jsonl`
(approvals and rejections of the picture with that seed, appended and fsynced; the last decision
about an item wins, earlier ones stay as history). A rejected picture is drawn again by the next
`pregenerate --qa` run, and its replacement is queued again. Sampling hashes the item id, so a
resumed or repeated run queues the same items. No torch here.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from birdgen.client.pregenerate import append_jsonl, read_jsonl, write_atomic

REVIEW_FOLDER = "review"  # inside the catalogue folder a pregenerate --qa run writes
QUEUE = "queue.jsonl"
DECISIONS = "decisions.jsonl"
IMAGES = "images"
Decision = Literal["approved", "rejected"]
DECISIONS_ALLOWED: tuple[Decision, ...] = ("approved", "rejected")


def sampled(item_id: str, share: float) -> bool:
    """Whether `item_id` falls in the reviewed `share`: a hash of the id, uniform in [0, 1)."""
    digest = hashlib.sha256(f"review:{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


@dataclass(frozen=True)
class ReviewEntry:
    """A queued item with its latest decision (None while pending)."""

    entry: dict[str, Any]
    decision: dict[str, Any] | None

    @property
    def id(self) -> str:
        return str(self.entry["id"])

    @property
    def status(self) -> str:
        return status(self.decision, picture_seed(self.entry))


def picture_seed(record: Mapping[str, Any]) -> int | None:
    """The seed of the picture a queue entry or manifest record keeps (None without QA verdicts)."""
    qa = record.get("qa") or {}
    return qa.get("seed")


def status(decision: Mapping[str, Any] | None, seed: int | None) -> str:
    """pending, approved or rejected: a decision counts for the picture of its seed only, so one
    about an earlier picture of the item (rejected and drawn again) leaves the new one pending."""
    if decision is None or decision.get("seed") != seed:
        return "pending"
    return str(decision["decision"])


class ReviewQueue:
    """The review folder: enqueue items, list them, record decisions."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def enqueue(self, entry: Mapping[str, Any], image: bytes, suffix: str) -> None:
        """Queue `entry` (it needs an `id`) with its picture; queuing an item again replaces it."""
        relative = f"{IMAGES}/{entry['id']}{suffix}"
        write_atomic(self.folder / relative, image)
        queued_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        append_jsonl(self.folder / QUEUE, {**entry, "image": relative, "queued_at": queued_at})

    def decisions(self) -> dict[str, dict[str, Any]]:
        """The latest decision per item id."""
        return read_jsonl(self.folder / DECISIONS)[0]

    def entries(self) -> list[ReviewEntry]:
        """Every queued item, in queue order, each with its latest decision."""
        queued, _ = read_jsonl(self.folder / QUEUE)
        decided = self.decisions()
        return [ReviewEntry(entry, decided.get(item_id)) for item_id, entry in queued.items()]

    def decide(self, item_id: str, decision: str, *, reviewer: str, note: str = "") -> dict[str, Any]:
        """Record `decision` on a queued item; raises ValueError naming what was wrong."""
        if decision not in DECISIONS_ALLOWED:
            raise ValueError(f"invalid 'decision': got {decision!r}; allowed: {', '.join(DECISIONS_ALLOWED)}")
        if not reviewer.strip():
            raise ValueError("missing 'reviewer': say who decided (--reviewer NAME)")
        queued, _ = read_jsonl(self.folder / QUEUE)
        matches = [known for known in queued if known.startswith(item_id)] if item_id else []
        if len(matches) != 1:
            what = "matches no queued item" if not matches else f"matches {len(matches)} queued items"
            raise ValueError(f"invalid 'id': {item_id!r} {what} in {self.folder / QUEUE}")
        record = {
            "id": matches[0],
            "seed": picture_seed(queued[matches[0]]),  # the picture decided on
            "decision": decision,
            "reviewer": reviewer.strip(),
            "note": note,
            "decided_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        append_jsonl(self.folder / DECISIONS, record)
        return record
