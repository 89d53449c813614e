"""Catalogue pre-generation: resume after an interruption (in-process and a SIGKILLed subprocess),
retries and their reasons, catalogue validation, and a real run into files and the Redis cache."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from rich.console import Console

from birdgen.catalogue import Catalogue
from birdgen.client import (
    BirdClient,
    BirdgenError,
    GeneratedAnimation,
    GeneratedEink,
    GeneratedImage,
    GenerationError,
    InvalidRequestError,
    ResponseCache,
    RetryPolicy,
    ServerUnavailableError,
)
from birdgen.client.pregenerate import (
    MANIFEST,
    SAMPLE_CATALOGUE,
    Plan,
    Summary,
    WorkItem,
    output_files,
    pregenerate,
    pregenerate_catalogue,
    read_catalogue,
)
from birdgen.media import read_metadata
from birdgen.schema import AnimationRequest, ImageRequest
from birdgen.server import free_port
from tests.redis_fixture import RedisServer, redis_server  # noqa: F401
from tests.triton_stats import requests_served

NO_WAIT = RetryPolicy(max_attempts=3, base_s=0.0, max_s=0.0)
SMALL = {"width": 256, "height": 256, "steps": 1}
HEADER = "species_id,species,scientific_name,family\n"
TORN = '{"id": "cut short by a kill'  # a manifest line a kill interrupted mid-write


class Killed(Exception):
    """Stands in for a kill: not a BirdgenError, so it stops the whole run."""


class FakeClient:
    """AsyncBirdClient's generate methods: answers at once, unless a species fails first (those
    errors, in order) or always, or the run is stopped after `stop_after` successes."""

    def __init__(
        self,
        fail_first: dict[str, list[BirdgenError]] | None = None,
        fail_always: dict[str, BirdgenError] | None = None,
        stop_after: int | None = None,
    ) -> None:
        self.fail_first = fail_first or {}
        self.fail_always = fail_always or {}
        self.stop_after = stop_after
        self.generated: Counter[tuple[str, str]] = Counter()  # (kind, species_id) -> successes

    def _answer(self, kind: str, request: ImageRequest | AnimationRequest) -> dict[str, Any]:
        if self.stop_after is not None and sum(self.generated.values()) >= self.stop_after:
            raise Killed
        species_id = str(request.species_id)
        if species_id in self.fail_always:
            raise self.fail_always[species_id]
        if self.fail_first.get(species_id):
            raise self.fail_first[species_id].pop(0)
        self.generated[kind, str(request.species_id)] += 1
        return {"model_version": f"bird_{kind}/1", "ai_generated": True, "species": request.species}

    async def generate_image(self, request: ImageRequest) -> GeneratedImage:
        await asyncio.sleep(0)  # let the other workers interleave
        metadata = self._answer("image", request)
        return GeneratedImage(f"png of {request.canonical_json()}".encode(), request.format, metadata)

    async def generate_animation(self, request: AnimationRequest) -> GeneratedAnimation:
        await asyncio.sleep(0)
        metadata = self._answer("animation", request)
        files = {name: f"{name} of {request.canonical_json()}".encode() for name in ("webp", "gif", "poster")}
        return GeneratedAnimation(files, metadata)


def catalogue(tmp_path: Path, species_ids: list[str], extra_rows: str = "") -> Path:
    """A CSV of these catalogue species (names and families from catalogue.yaml), then `extra_rows`."""
    species = {s.species_id: s for s in Catalogue.load().species}
    rows = [
        f"{i},{species[i].common_name},{species[i].scientific_name},{species[i].family}\n"
        for i in species_ids
    ]
    path = tmp_path / "species.csv"
    path.write_text(HEADER + "".join(rows) + extra_rows)
    return path


def manifest(out: Path) -> list[dict[str, Any]]:
    """Every record; a line written after TORN must start a line of its own to parse here."""
    return [json.loads(line) for line in (out / MANIFEST).read_text().splitlines() if line != TORN]


def run(plan: Plan, client: FakeClient, out: Path, **options: Any) -> tuple[Summary, str]:
    """`pregenerate` with 3 workers and no backoff; the summary and what it printed."""
    console = Console(file=StringIO(), width=200)
    summary = asyncio.run(
        pregenerate(plan, client, out, concurrency=3, retry=NO_WAIT, console=console, **options)
    )
    return summary, console.file.getvalue()  # type: ignore[attr-defined]


def test_an_interrupted_run_resumes_and_every_item_is_generated_and_recorded_once(tmp_path: Path) -> None:
    out = tmp_path / "out"
    plan = read_catalogue(catalogue(tmp_path, ["amerob", "norcar", "blujay", "mallar3", "grhowl"]))
    assert len(plan.items) == 10 and not plan.row_errors
    first = FakeClient(stop_after=4)
    with pytest.raises(Killed):
        run(plan, first, out)
    assert len(manifest(out)) == 4
    with (out / MANIFEST).open("a") as file:
        file.write(TORN)

    second = FakeClient()
    summary, text = run(plan, second, out)
    assert (summary.done, summary.skipped, summary.failed, summary.exit_code) == (6, 4, [], 0)
    assert "1 unreadable line(s) ignored" in text and "6 done, 4 skipped" in text
    generated = first.generated + second.generated
    assert sorted(generated) == sorted((item.kind, item.species_id) for item in plan.items)
    assert set(generated.values()) == {1}  # nothing generated twice
    done = [record for record in manifest(out) if record.get("status") == "done"]
    assert sorted(record["id"] for record in done) == sorted(item.id for item in plan.items)
    for record in done:
        assert record["attempts"] == 1 and record["model_version"] == f"bird_{record['kind']}/1"
        names = {"image"} if record["kind"] == "image" else {"webp", "gif", "poster"}
        assert set(record["files"]) == names
        for entry in record["files"].values():
            assert hashlib.sha256((out / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]
    assert (out / "image" / "amerob.png").is_file() and (out / "animation" / "grhowl.poster.png").is_file()
    assert not list(out.rglob("*.tmp"))

    # A third run has nothing to do, unless a file went missing or changed since.
    (out / "animation" / "blujay.gif").write_bytes(b"edited")
    third = FakeClient()
    summary, _ = run(plan, third, out)
    assert (summary.done, summary.skipped) == (1, 9)
    assert third.generated == Counter({("animation", "blujay"): 1})


def test_resuming_redoes_items_missing_from_a_destination_this_run_wants(tmp_path: Path) -> None:
    plan = read_catalogue(catalogue(tmp_path, ["amerob"]), kinds=["image"])
    generated = []
    for write_files, to_cache in ((False, True), (True, False), (True, True), (True, True), (False, True)):
        client = FakeClient()
        run(plan, client, tmp_path / "out", write_files=write_files, to_cache=to_cache)
        generated.append(client.generated.total())
    # cache only; files (none yet); both (not cached yet); then both were done.
    assert generated == [1, 1, 1, 0, 0]


@pytest.mark.triton
def test_a_sigkilled_cli_run_resumes_without_redoing_or_losing_items(server, tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "birdgen.cli",
        "pregenerate",
        "--url",
        server.grpc_url,
        "--out",
        str(out),
    ]
    command += ["--kinds", "image", "--limit", "12", "--concurrency", "1"]
    command += [f"--image={key}={value}" for key, value in SMALL.items()]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / MANIFEST).exists() or not (out / MANIFEST).read_text().strip():
            assert process.poll() is None and time.monotonic() < deadline, "no item finished"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=10)
    killed_with = len(manifest(out))
    assert 1 <= killed_with < 12  # killed mid-way

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{12 - killed_with} done, {killed_with} skipped" in rerun.stderr
    records = manifest(out)
    assert len(records) == 12 and {r["status"] for r in records} == {"done"}
    assert len({r["id"] for r in records}) == len({r["species_id"] for r in records}) == 12
    assert len(list((out / "image").iterdir())) == 12  # a temp file the kill left is gone too


def test_a_resumed_run_removes_the_temp_files_of_killed_writers_only(tmp_path: Path) -> None:
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / "image" / f".amerob.png.{dead.pid}.tmp"  # write_atomic's name, its writer gone
    live = out / "image" / f".norcar.png.{os.getpid()}.tmp"
    for path in (stale, live):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a file")
    run(read_catalogue(catalogue(tmp_path, ["amerob"]), kinds=["image"]), FakeClient(), out)
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in (out / "image").iterdir()) == [live.name, "amerob.png"]


def test_retryable_failures_are_retried_with_their_reasons_and_the_rest_fail_with_theirs(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    plan = read_catalogue(catalogue(tmp_path, ["amerob", "norcar", "blujay", "mallar3"]), kinds=["image"])
    client = FakeClient(
        fail_first={"amerob": [ServerUnavailableError("fake:1", "overloaded")] * 2},
        fail_always={
            "norcar": GenerationError("INTERNAL: out of memory"),
            "blujay": InvalidRequestError("invalid 'width': got 100"),
        },
    )
    summary, text = run(plan, client, out)
    records = {r["species_id"]: r for r in manifest(out)}
    assert records["amerob"]["status"] == "done" and records["amerob"]["attempts"] == 3
    unavailable = "ServerUnavailableError: birdgen server at fake:1 is unavailable: overloaded"
    assert records["amerob"]["reasons"] == [unavailable, unavailable]
    assert records["norcar"]["status"] == "failed" and records["norcar"]["attempts"] == 3
    assert records["norcar"]["reason"] == "GenerationError: INTERNAL: out of memory"
    assert records["blujay"]["status"] == "failed" and records["blujay"]["attempts"] == 1
    assert records["blujay"]["reason"] == "InvalidRequestError: invalid 'width': got 100"
    assert records["mallar3"]["status"] == "done"
    assert summary.exit_code == 1 and (summary.done, len(summary.failed)) == (2, 2)
    assert "2 done, 0 skipped (already done), 2 failed" in text
    assert "failed image norcar after 3 attempt(s): GenerationError: INTERNAL: out of memory" in text
    assert "failed image blujay after 1 attempt(s): InvalidRequestError" in text


def test_a_run_that_cannot_reach_a_server_fails_its_items_with_the_reason_and_exits_1(tmp_path: Path) -> None:
    out = tmp_path / "out"
    url = f"127.0.0.1:{free_port()}"  # nothing listens here
    command = [sys.executable, "-m", "birdgen.cli", "pregenerate", "--url", url, "--out", str(out)]
    command += ["--kinds", "image", "--limit", "1", "--retries", "1", "--timeout", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    (record,) = manifest(out)
    assert (record["species_id"], record["status"], record["attempts"]) == ("amerob", "failed", 2)
    assert all(reason.startswith("ServerUnavailableError: ") for reason in record["reasons"])
    assert "0 done, 0 skipped (already done), 1 failed" in result.stderr
    assert "failed image amerob after 2 attempt(s): ServerUnavailableError" in result.stderr


def test_bad_catalogue_rows_are_reported_with_their_line_and_skipped(tmp_path: Path) -> None:
    bad = (
        "norcar,Northern Cardinal,Cardinalis cardinalis,Notaformes\n"  # line 3
        ",,Turdus merula,\n"  # line 4: no species
        "amerob,American Robin again,Turdus migratorius,\n"  # line 5: the id repeats line 2
        ",Blue Jay,Cyanocitta cristata,\n"  # line 6: no id to name the files
        "blujay,Blue Jay,Cyanocitta cristata,Passeriformes,extra\n"  # line 7: a value too many
        "mallar3,Mallard,Anas platyrhynchos,\n"  # line 8: fine, family looked up by the server
    )
    plan = read_catalogue(catalogue(tmp_path, ["amerob"], bad))
    assert [(e.line, e.message.split(";")[0]) for e in plan.row_errors] == [
        (3, "invalid 'family': got 'Notaformes'"),
        (4, "missing 'species'"),
        (5, "species_id 'amerob' repeats line 2"),
        (6, "missing 'species_id'"),
        (7, "1 value(s) more than the header has columns"),
    ]
    assert [(item.kind, item.species_id) for item in plan.items] == [
        ("image", "amerob"),
        ("animation", "amerob"),
        ("image", "mallar3"),
        ("animation", "mallar3"),
    ]
    summary, text = run(plan, FakeClient(), tmp_path / "out")
    assert summary.done == 4 and summary.exit_code == 1  # the catalogue was not all usable
    assert "catalogue line 3: invalid 'family': got 'Notaformes'" in text

    headless = tmp_path / "headless.csv"
    headless.write_text("id,name\namerob,American Robin\n")
    with pytest.raises(ValueError, match="missing column"):
        read_catalogue(headless)
    spreadsheet = tmp_path / "spreadsheet.csv"  # saved with a byte-order mark before the header
    spreadsheet.write_text(HEADER + "amerob,American Robin,Turdus migratorius,\n", encoding="utf-8-sig")
    assert len(read_catalogue(spreadsheet).items) == 2
    with pytest.raises(ValueError, match="invalid image option: invalid 'width': got 100"):
        read_catalogue(catalogue(tmp_path, ["amerob"]), options={"image": {"width": 100}})


def test_the_sample_catalogue_validates_and_names_catalogue_species() -> None:
    plan = read_catalogue(SAMPLE_CATALOGUE)
    assert not plan.row_errors and 20 <= len(plan.items) // 2 <= 40
    known = Catalogue.load()
    for item in plan.items:
        species = known.lookup(species_id=item.species_id)
        assert species is not None, item.species_id
        request = item.request
        assert (request.species, request.scientific_name, request.family) == (
            species.common_name,
            species.scientific_name,
            species.family,
        )
    assert {item.request.pose for item in plan.items if item.kind == "image"} == {"perched"}


@pytest.mark.triton
def test_a_real_run_writes_labelled_files_and_warms_the_cache_the_client_reads(
    server,
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    start = requests_served(server.grpc_url, "bird_image")
    summary = pregenerate_catalogue(
        catalogue(tmp_path, ["amerob", "eurrob1"]),
        out,
        url=server.grpc_url,
        kinds=["image", "animation"],
        options={"image": SMALL, "animation": SMALL},
        limit=None,
        concurrency=2,
        retries=0,
        deadline_s=60,
        redis_url=redis_server.url,
        write_files=True,
    )
    assert (summary.done, summary.failed, summary.exit_code) == (4, [], 0)
    for species_id, name in (("amerob", "American Robin"), ("eurrob1", "European Robin")):
        for path in (
            f"image/{species_id}.png",
            *(f"animation/{species_id}{s}" for s in (".webp", ".gif", ".poster.png")),
        ):
            metadata = read_metadata((out / path).read_bytes())
            assert metadata["ai_generated"] is True and metadata["species"] == name, path
    assert {r["cached"] for r in manifest(out)} == {True}

    registry = CollectorRegistry()
    cache = ResponseCache(redis_server.url, registry=registry)
    served = requests_served(server.grpc_url, "bird_image", at_least=start + 2)  # the two images
    with BirdClient(server.grpc_url, cache=cache) as client:
        image = client.generate_image(
            species="American Robin",
            scientific_name="Turdus migratorius",
            species_id="amerob",
            family="Passeriformes",
            **SMALL,
        )
    cache.close()
    assert requests_served(server.grpc_url, "bird_image") == served  # Triton was not asked
    assert registry.get_sample_value("birdgen_cache_hits_total", {"kind": "image"}) == 1
    assert image.data == (out / "image" / "amerob.png").read_bytes()


def test_an_eink_item_writes_its_buffer_beside_the_preview() -> None:
    request = ImageRequest(species="Blue Tit", format="eink", eink_panel="296x128")
    result = GeneratedEink(b"preview", "png", {}, b"buffer", 296, 128, 1, "296x128", "bw")
    assert output_files(WorkItem("image", "blutit", request), result) == {
        "image": ("image/blutit.png", b"preview"),
        "eink_buffer": ("image/blutit.bin", b"buffer"),
    }
