"""Catalogue pre-generation: every species × kind generated once, resumable after a kill.

The platform shows a picture next to each identification; generating the whole catalogue ahead of
time keeps first views fast. A run reads a catalogue CSV (validated row by row with the request
schema), expands it into work items (species × kinds), generates them with bounded concurrency and
writes each result atomically (temp file + rename) under `<out>/<kind>/`, and/or stores it in the
Redis cache through the client, so the cache key is the one every later client computes.

Every finished item appends one JSON line to `<out>/manifest.jsonl`, flushed and fsynced, so a run
killed at any point loses at most the items in flight: a re-run skips items recorded `done` (files
still there with the recorded sha256, in the cache when it asks for the cache) and redoes the rest.
No torch here.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from birdgen.client.calls import GeneratedAnimation, GeneratedEink, GeneratedImage, RetryPolicy
from birdgen.client.errors import (
    BirdgenError,
    DeadlineExceededError,
    GenerationError,
    ServerUnavailableError,
)
from birdgen.contracts import EINK_BUFFER, IMAGE
from birdgen.prompts import DATA_DIR
from birdgen.schema import (
    LIMITS,
    AnimationRequest,
    ImageRequest,
    RequestError,
    parse_animation_request,
    parse_image_request,
)

SAMPLE_CATALOGUE = DATA_DIR / "sample_catalogue.csv"
MANIFEST = "manifest.jsonl"
KINDS = ("image", "animation")
COLUMNS = ("species_id", "species", "scientific_name", "family")
REQUIRED_COLUMNS = ("species_id", "species", "scientific_name")
# "Not now" failures: the same request may succeed later. An InvalidRequestError never will.
RETRYABLE = (ServerUnavailableError, DeadlineExceededError, GenerationError)
# Between attempts at one item: seconds apart (full jitter, doubling from 1 s), where the client's own
# retries inside one call are sub-second; a server that is briefly overloaded gets time to drain.
RETRY = RetryPolicy(max_attempts=4, base_s=1.0, max_s=30.0)
_PARSE = {"image": parse_image_request, "animation": parse_animation_request}
# File name suffix of each output file: <species_id><suffix>.
_SUFFIXES = {"png": ".png", "webp": ".webp", "jpeg": ".jpg", "gif": ".gif", "poster": ".poster.png"}

Request = ImageRequest | AnimationRequest


class BirdGenerator(Protocol):
    """What a run needs of a client: AsyncBirdClient's two generate methods."""

    async def generate_image(self, request: ImageRequest) -> GeneratedImage: ...

    async def generate_animation(self, request: AnimationRequest) -> GeneratedAnimation: ...


class QualityGate(Protocol):
    """What `--qa` adds to a run (birdgen.qa.gate.QaGate): a verdict per drawn result, how many
    redraws a failing item gets, and the human-review queue."""

    max_regenerations: int

    async def judge(self, request: Request, result: GeneratedImage | GeneratedAnimation) -> dict[str, Any]:
        """A JSON-able verdict with at least `passed` (bool) and `failures` (a list of reasons)."""
        ...

    def review(
        self, item: WorkItem, record: Mapping[str, Any], result: GeneratedImage | GeneratedAnimation
    ) -> bool:
        """Queue the finished item for human review when it is sampled or flagged; whether it was."""
        ...

    def rejected(self, records: Mapping[str, Mapping[str, Any]]) -> set[str]:
        """The ids of the manifest records (by id) whose kept picture a reviewer rejected: redrawn."""
        ...


@dataclass(frozen=True)
class RowError:
    """A catalogue row that was skipped: its line in the CSV and why."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass(frozen=True)
class WorkItem:
    """One output to generate: a species in one kind, with the full request."""

    kind: str
    species_id: str
    request: Request

    @property
    def id(self) -> str:
        """Stable across runs and processes: the kind and the canonical request decide it, so a
        changed option (size, steps, ...) makes a new item rather than reusing an old result."""
        text = f"{self.kind}:{self.request.canonical_json()}"
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Plan:
    items: list[WorkItem]
    row_errors: list[RowError]


def read_catalogue(
    path: Path,
    kinds: Sequence[str] = KINDS,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    limit: int | None = None,
) -> Plan:
    """The work items of the catalogue CSV at `path`: its rows × `kinds`, in file order.

    Each item's request is the row's species fields, then `options[kind]` (e.g. width, steps,
    behaviour), then the schema's defaults. A row the schema rejects, or that repeats a species id
    (its files would collide), is skipped and reported with its line number; a file without the
    required columns, or an invalid option, raises ValueError (no row could be right). `limit` keeps
    the first that many valid rows.
    """
    options = options or {}
    kinds = list(dict.fromkeys(kinds))  # "image,image" is one kind
    unknown = [kind for kind in (*kinds, *options) if kind not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"invalid kinds: got {', '.join(unknown) or 'none'}; allowed: {', '.join(KINDS)}")
    for kind in kinds:
        _check_options(kind, options.get(kind, {}))
    items: list[WorkItem] = []
    errors: list[RowError] = []
    seen: dict[str, int] = {}
    with path.open(newline="", encoding="utf-8-sig") as file:  # -sig: spreadsheets write a BOM
        reader = csv.DictReader(file)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {', '.join(missing)}; the header must name "
                f"{', '.join(REQUIRED_COLUMNS)} (and optionally family)"
            )
        for row in reader:
            line = reader.line_num
            if limit is not None and len(seen) >= limit:
                break
            if None in row:  # csv puts values past the header's columns under None
                errors.append(RowError(line, f"{len(row[None])} value(s) more than the header has columns"))
                continue
            fields = {c: (row.get(c) or "").strip() for c in COLUMNS}
            try:
                requests = [(kind, _request(kind, fields, options.get(kind, {}))) for kind in kinds]
            except RequestError as exc:
                errors.append(RowError(line, str(exc)))
                continue
            species_id = requests[0][1].species_id
            if species_id is None:
                errors.append(
                    RowError(line, "missing 'species_id'; every row needs one (it names the files)")
                )
                continue
            if species_id in seen:
                errors.append(RowError(line, f"species_id {species_id!r} repeats line {seen[species_id]}"))
                continue
            seen[species_id] = line
            items += [WorkItem(kind, species_id, request) for kind, request in requests]
    return Plan(items, errors)


def _request(kind: str, fields: Mapping[str, str], options: Mapping[str, Any]) -> Request:
    return _PARSE[kind]({**{k: v for k, v in fields.items() if v}, **options})


def _check_options(kind: str, options: Mapping[str, Any]) -> None:
    """Options are checked once, with a stand-in species, so one bad option is one error."""
    clash = sorted(set(options) & set(COLUMNS))
    if clash:
        raise ValueError(f"{kind} options may not set {', '.join(clash)}: those come from the catalogue")
    try:
        _request(kind, {"species": "Bird"}, options)
    except RequestError as exc:
        raise ValueError(f"invalid {kind} option: {exc}") from None


@dataclass
class Outcome:
    """One item's manifest record."""

    item: WorkItem
    status: str  # "done" or "failed"
    attempts: int
    reasons: list[str]  # why each failed attempt failed, in order
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    model_version: str | None = None
    cached: bool = False  # stored in the Redis cache by the client
    qa: dict[str, Any] | None = None  # the quality gate's verdicts (pregenerate --qa)

    def record(self) -> dict[str, Any]:
        return {
            "id": self.item.id,
            "kind": self.item.kind,
            "species_id": self.item.species_id,
            "species": self.item.request.species,
            "status": self.status,
            "attempts": self.attempts,
            "reason": self.reasons[-1] if self.status == "failed" else None,
            "reasons": self.reasons,
            "files": self.files,
            "seconds": round(self.seconds, 3),
            "model_version": self.model_version,
            "request": json.loads(self.item.request.canonical_json()),  # control images as digests
            "cached": self.cached,
            **({"qa": self.qa} if self.qa is not None else {}),
        }


class Manifest:
    """The append-only JSONL record of finished items; the last line about an item wins."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out / MANIFEST

    def read(self) -> tuple[dict[str, dict[str, Any]], int]:
        """The latest record per item id, and how many lines could not be read."""
        return read_jsonl(self.path)

    def is_done(
        self, record: Mapping[str, Any] | None, *, files: bool, cached: bool, qa: bool = False
    ) -> bool:
        """Done, into every destination this run wants (`files`, the cache, QA verdicts), with every
        file it wrote still there with its recorded content: a run with files after a cache-only one,
        a cache run after a files-only one, or a `--qa` run after one without, redoes those items."""
        if record is None or record.get("status") != "done" or (cached and not record.get("cached")):
            return False
        if qa and "qa" not in record:
            return False
        written = record.get("files", {}).values()
        if files and not written:
            return False
        return all(_sha256(self.out / entry["path"]) == entry["sha256"] for entry in written)

    def append(self, record: Mapping[str, Any]) -> None:
        append_jsonl(self.path, record)


def read_jsonl(path: Path, key: str = "id") -> tuple[dict[str, dict[str, Any]], int]:
    """The latest record per `key` in the JSONL file at `path` (none when it is missing), and how many
    lines could not be read (a line cut short by a kill mid-write is the only way to get one)."""
    latest: dict[str, dict[str, Any]] = {}
    unreadable = 0
    if not path.exists():
        return latest, unreadable
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            latest[record[key]] = record
        except (ValueError, KeyError, TypeError):
            unreadable += bool(line.strip())
    return latest, unreadable


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    """One line, on disk before returning: a kill after this never loses the record. A write that
    fails (a full disk) is cut off again, so a failure never leaves half a line behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n"
    with path.open("ab", buffering=0) as file:
        end = file.seek(0, os.SEEK_END)
        if end and not _ends_with_newline(path):
            line = b"\n" + line  # end a line cut short by a kill, so this one stays readable
        try:
            written = 0
            while written < len(line):  # unbuffered: a short write is ours to continue
                written += file.write(line[written:]) or 0
            os.fsync(file.fileno())
        except OSError:
            with contextlib.suppress(OSError):
                file.truncate(end)
            raise


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) == b"\n"


def _sha256(path: Path) -> str | None:
    try:
        with path.open("rb") as file:
            return hashlib.file_digest(file, "sha256").hexdigest()
    except FileNotFoundError:
        return None


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete the temp files (`write_atomic`'s) that a killed run left under `out`: those whose
    writer process is gone. The ones removed."""
    removed = []
    for temp in out.rglob(".*.tmp") if out.exists() else ():
        pid = temp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not _running(int(pid)):
            temp.unlink(missing_ok=True)
            removed.append(temp)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def write_atomic(path: Path, data: bytes) -> None:
    """Temp file + fsync + rename: a reader (or a resumed run) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temp.open("wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)  # a full disk must not keep the part written (nor its space)
        raise


def output_files(item: WorkItem, result: GeneratedImage | GeneratedAnimation) -> dict[str, tuple[str, bytes]]:
    """Name -> (path relative to the output folder, bytes): `<kind>/<species_id><suffix>`."""
    if isinstance(result, GeneratedImage):
        files = {IMAGE: (_SUFFIXES[result.format], result.data)}
        if isinstance(result, GeneratedEink):  # format=eink: the panel buffer beside its preview
            files[EINK_BUFFER] = (".bin", result.buffer)
    else:
        files = {name: (_SUFFIXES[name], data) for name, data in result.files.items()}
    return {name: (f"{item.kind}/{item.species_id}{suffix}", data) for name, (suffix, data) in files.items()}


@dataclass
class Summary:
    """What a run did; `exit_code` is 0 only when every item is done and every row was usable."""

    done: int = 0
    skipped: int = 0
    failed: list[Outcome] = field(default_factory=list)
    row_errors: list[RowError] = field(default_factory=list)
    seconds: float = 0.0
    quality: Counter[str] = field(default_factory=Counter)  # --qa: passed, flagged, redraws, queued

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.row_errors else 0

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed or 0:.2f} items/s", style="progress.data.speed")


async def pregenerate(
    plan: Plan,
    client: BirdGenerator,
    out: Path,
    *,
    concurrency: int = 4,
    retry: RetryPolicy | None = None,
    write_files: bool = True,
    to_cache: bool = False,
    gate: QualityGate | None = None,
    console: Console | None = None,
) -> Summary:
    """Generate every item of `plan` not already done in `out`'s manifest; see the module docstring.

    `retry.max_attempts` bounds the attempts per item; a retryable failure (RETRYABLE) waits
    `retry.backoff(n)` before attempt n + 2, an InvalidRequestError fails the item at once. Any other
    exception (a bug, a full disk) stops the run: the manifest keeps what finished. `to_cache` says
    the client stores results in the Redis cache (recorded, so resuming knows which items went there).
    A `gate` (pregenerate --qa) judges every result, redraws failing ones and queues items for human
    review (see `_attempt`); its verdicts go into the manifest record's `qa`.
    """
    if concurrency < 1:
        raise ValueError(f"invalid 'concurrency': got {concurrency}; allowed: an integer >= 1")
    retry = retry or RETRY
    console = console or Console(stderr=True)
    manifest = Manifest(out)
    start = time.monotonic()
    remove_stale_temporaries(out)
    records, unreadable = manifest.read()
    if unreadable:
        note = f"{manifest.path}: {unreadable} unreadable line(s) ignored"
        console.print(note, style="yellow", markup=False, soft_wrap=True)
    # A picture a reviewer rejected is drawn again, from the first seed not yet tried (`first_draw`).
    rejected_ids = gate.rejected(records) if gate is not None else set()
    rejected = {item.id: records[item.id]["qa"] for item in plan.items if item.id in rejected_ids}
    todo = [
        item
        for item in plan.items
        if item.id in rejected
        or not manifest.is_done(records.get(item.id), files=write_files, cached=to_cache, qa=gate is not None)
    ]
    summary = Summary(skipped=len(plan.items) - len(todo), row_errors=list(plan.row_errors))
    for error in plan.row_errors:
        console.print(f"catalogue {error}: row skipped", style="yellow", markup=False, soft_wrap=True)
    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[green]done {task.fields[done]}[/] [red]failed {task.fields[failed]}[/]"),
        _RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    )
    queue: Iterator[WorkItem] = iter(todo)

    async def worker() -> None:
        for item in queue:  # one shared iterator: each item goes to exactly one worker
            outcome, result = await _attempt(item, client, retry, gate, rejected.get(item.id))
            try:
                if result is not None:
                    outcome.files = _write(out, item, result) if write_files else {}
                    outcome.cached = to_cache
                if result is not None and gate is not None and outcome.qa is not None:
                    outcome.qa["review"] = gate.review(item, outcome.record(), result)
                manifest.append(outcome.record())
            except OSError as exc:  # a full disk, say: stop, naming it and what is kept
                finished = summary.skipped + summary.done
                raise OSError(
                    exc.errno,
                    f"{exc.strerror or exc} writing {item.kind} {item.species_id} into {out}; "
                    f"pre-generation stopped, the {finished} item(s) done are in {manifest.path}: "
                    "free space and run it again to resume",
                ) from exc
            if outcome.qa is not None:
                summary.quality.update(
                    passed=outcome.qa["passed"],
                    flagged=outcome.qa["flagged"],
                    redraws=outcome.qa["regenerations"],
                    queued=outcome.qa.get("review", False),
                )
            if outcome.status == "done":
                summary.done += 1
            else:
                summary.failed.append(outcome)
            progress.update(task, advance=1, done=summary.done, failed=len(summary.failed))

    with progress:
        task = progress.add_task("pre-generating", total=len(todo), done=0, failed=0)
        workers = [asyncio.create_task(worker()) for _ in range(min(concurrency, len(todo)))]
        try:
            await asyncio.gather(*workers)
        finally:
            for running in workers:
                running.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
    summary.seconds = time.monotonic() - start
    print_summary(summary, console)
    return summary


async def _attempt(
    item: WorkItem,
    client: BirdGenerator,
    retry: RetryPolicy,
    gate: QualityGate | None = None,
    rejected: Mapping[str, Any] | None = None,
) -> tuple[Outcome, GeneratedImage | GeneratedAnimation | None]:
    """Generate `item`: its record, and the result when there is one.

    With a `gate`, a result it fails is drawn again with the next seed (`redraw`), at most
    `gate.max_regenerations` times; the best draw (fewest failures, earliest first) is kept, flagged
    when none passed. A redraw that fails for good ends the redrawing and keeps the best draw so far.
    `rejected`: the QA record of a picture a reviewer rejected; drawing starts past every seed it tried.
    """
    reasons: list[str] = []
    started = time.monotonic()
    attempts = 0
    draws: list[tuple[dict[str, Any], GeneratedImage | GeneratedAnimation]] = []
    first = rejected["first_draw"] + len(rejected["draws"]) if rejected else 0
    request = redraw(item.request, first) if first else item.request
    while True:
        result, used = await _generate(request, client, retry, reasons)
        attempts += used
        if result is None or gate is None:
            break
        verdict = await gate.judge(request, result)
        draws.append(({**verdict, "seed": request.resolved_seed()}, result))
        if verdict["passed"] or len(draws) > gate.max_regenerations:
            break
        request = redraw(item.request, first + len(draws))
    seconds = time.monotonic() - started
    if draws:
        chosen = min(range(len(draws)), key=lambda i: (len(draws[i][0]["failures"]), i))
        verdict, result = draws[chosen]
        qa = {
            "passed": verdict["passed"],
            "flagged": not verdict["passed"],
            "seed": verdict["seed"],
            "regenerations": len(draws) - 1,
            "first_draw": first,
            "replaces": rejected["seed"] if rejected else None,  # the rejected picture's seed
            "chosen": chosen,
            "draws": [draw for draw, _ in draws],
        }
    else:
        qa = None
    if result is None:
        return Outcome(item, "failed", attempts, reasons, seconds=seconds), None
    version = result.metadata.get("model_version")
    return Outcome(item, "done", attempts, reasons, seconds=seconds, model_version=version, qa=qa), result


async def _generate(
    request: Request, client: BirdGenerator, retry: RetryPolicy, reasons: list[str]
) -> tuple[GeneratedImage | GeneratedAnimation | None, int]:
    """One request, retrying retryable failures (each reason appended to `reasons`): the result, or
    None when it failed for good, and the attempts it took."""
    attempt = 0
    while True:
        attempt += 1
        try:
            if isinstance(request, ImageRequest):
                return await client.generate_image(request), attempt
            return await client.generate_animation(request), attempt
        except BirdgenError as exc:
            reasons.append(f"{type(exc).__name__}: {exc}")
            if not isinstance(exc, RETRYABLE) or attempt >= retry.max_attempts:
                return None, attempt
            await asyncio.sleep(retry.backoff(attempt - 1))


def redraw(request: Request, draw: int) -> Request:
    """The request of draw number `draw` (1, 2, ...; 0 is the request itself): the same request with
    its seed advanced by `draw`, wrapping within the seed range, so redraws are the same in every run."""
    seed = (request.resolved_seed() + draw) % (LIMITS.seed.max + 1)
    return request.model_copy(update={"seed": seed})


def _write(
    out: Path, item: WorkItem, result: GeneratedImage | GeneratedAnimation
) -> dict[str, dict[str, Any]]:
    """Write the item's files atomically; their manifest entries (path, sha256, bytes)."""
    written = {}
    for name, (relative, data) in output_files(item, result).items():
        write_atomic(out / relative, data)
        written[name] = {"path": relative, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    return written


def print_summary(summary: Summary, console: Console) -> None:
    """One line per fact, never wrapped, so a log of the run can be grepped."""
    lines = [
        f"pre-generation: {summary.done} done, {summary.skipped} skipped (already done), "
        f"{len(summary.failed)} failed, {len(summary.row_errors)} catalogue row(s) skipped; "
        f"{summary.seconds:.1f} s, {summary.rate:.2f} done/s"
    ]
    if summary.quality:
        q = summary.quality
        lines.append(
            f"quality: {q['passed']} passed, {q['flagged']} flagged (best draw kept), "
            f"{q['redraws']} redraw(s), {q['queued']} queued for review"
        )
    lines += [
        f"  failed {o.item.kind} {o.item.species_id} after {o.attempts} attempt(s): {o.reasons[-1]}"
        for o in summary.failed
    ]
    lines += [f"  catalogue {error}" for error in summary.row_errors]
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def parse_option(text: str) -> tuple[str, Any]:
    """A `KEY=VALUE` request option; VALUE as JSON when it parses (256, 2.5, null), else text, so
    the schema's strict types are met without a second copy of the fields."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"options take KEY=VALUE (e.g. width=256), got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def pregenerate_catalogue(
    catalogue: Path | None,
    out: Path,
    *,
    url: str,
    kinds: Sequence[str],
    options: Mapping[str, Mapping[str, Any]],
    limit: int | None,
    concurrency: int,
    retries: int,
    deadline_s: float,
    redis_url: str | None,
    write_files: bool,
    gate: QualityGate | None = None,
) -> Summary:
    """`birdgen pregenerate` (its flags hold the defaults): read the catalogue (None: the bundled
    sample), then generate through an AsyncBirdClient at `url`; with `redis_url`, through a
    ResponseCache as well, so results land under the keys every later client computes. `gate`:
    `--qa` (birdgen.qa.gate.QaGate)."""
    from birdgen.client import AsyncBirdClient, ResponseCache

    if retries < 0:
        raise ValueError(f"invalid 'retries': got {retries}; allowed: an integer >= 0")
    if not write_files and redis_url is None:
        raise ValueError("nothing would be kept: without files, pre-generate into the cache (--to-cache)")
    plan = read_catalogue(catalogue or SAMPLE_CATALOGUE, kinds, options, limit)
    cache = ResponseCache(redis_url) if redis_url is not None else None

    async def run() -> Summary:
        try:
            async with AsyncBirdClient(url, deadline_s=deadline_s, cache=cache) as client:
                return await pregenerate(
                    plan,
                    client,
                    out,
                    concurrency=concurrency,
                    retry=dataclasses.replace(RETRY, max_attempts=retries + 1),
                    write_files=write_files,
                    to_cache=cache is not None,
                    gate=gate,
                )
        finally:
            if cache is not None:
                await cache.aclose()

    try:
        return asyncio.run(run())
    finally:
        if cache is not None:
            cache.close()
