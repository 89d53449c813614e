"""Pre-generation's `--qa`: a picture failing a gate is drawn again with the next seed, at most N
times, then flagged; seeds advance the same way in every run; sampled and flagged items are queued
for review, and decisions persist. Ends with a real served run through the CLI."""

from __future__ import annotations

import asyncio
import json
from io import BytesIO, StringIO
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageFilter
from rich.console import Console

from birdgen.cli import main
from birdgen.client import GeneratedAnimation, GeneratedImage
from birdgen.client.pregenerate import MANIFEST, RetryPolicy, pregenerate, read_catalogue, redraw
from birdgen.media import read_metadata
from birdgen.qa.gate import QaGate, QualityChecker, judged_picture
from birdgen.qa.review import REVIEW_FOLDER, ReviewQueue, sampled
from birdgen.qa_config import SPECIES_VERIFIER_FOLDER, QaConfig
from birdgen.schema import LIMITS, ImageRequest
from tests.test_pregenerate import SMALL, catalogue

skimage_data = pytest.importorskip("skimage.data")
NO_WAIT = RetryPolicy(max_attempts=2, base_s=0.0, max_s=0.0)
PHOTO = Image.fromarray(skimage_data.chelsea()).resize((256, 192))


def png(image: Image.Image) -> bytes:
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


SHARP = png(PHOTO)
BLURRED = png(PHOTO.filter(ImageFilter.GaussianBlur(3)))


class PhotoClient:
    """Answers with a real photograph: sharp on the draws `good(species_id, draw)` says, blurred
    (failing both quality gates) otherwise. It records every seed it was asked for."""

    def __init__(self, good: dict[str, set[int]]) -> None:
        self.good = good
        self.seeds: dict[str, list[int]] = {}

    async def generate_image(self, request: ImageRequest) -> GeneratedImage:
        await asyncio.sleep(0)
        seeds = self.seeds.setdefault(str(request.species_id), [])
        seeds.append(request.resolved_seed())
        draw = len(seeds) - 1
        data = SHARP if draw in self.good.get(str(request.species_id), set()) else BLURRED
        return GeneratedImage(data, "png", {"seed": request.resolved_seed(), "family": "Passeriformes"})


def gate(out: Path, share: float | None = None, **gates: Any) -> QaGate:
    config = QaConfig.load()
    config = config.model_copy(update={"gates": config.gates.model_copy(update=gates)})
    if share is not None:
        config = config.model_copy(update={"review": config.review.model_copy(update={"share": share})})
    return QaGate(QualityChecker(config), out / REVIEW_FOLDER)


def run(
    tmp_path: Path, out: Path, client: PhotoClient, qa: QaGate | None
) -> tuple[dict[str, dict[str, Any]], str]:
    """The run's manifest records by species id, and what it printed."""
    plan = read_catalogue(catalogue(tmp_path, ["amerob", "blujay", "mallar3"]), kinds=["image"])
    console = Console(file=StringIO(), width=200)
    summary = asyncio.run(
        pregenerate(plan, client, out, concurrency=2, retry=NO_WAIT, gate=qa, console=console)
    )
    assert summary.exit_code == 0 and not summary.failed
    records = {r["species_id"]: r for r in map(json.loads, (out / MANIFEST).read_text().splitlines())}
    return records, console.file.getvalue()  # type: ignore[attr-defined]


def test_a_failing_picture_is_redrawn_with_the_next_seeds_up_to_n_then_flagged(tmp_path: Path) -> None:
    out = tmp_path / "out"
    client = PhotoClient({"amerob": {2}, "mallar3": {0}})  # blujay never passes
    records, said = run(tmp_path, out, client, gate(out, max_regenerations=3))
    plan = {
        i.species_id: i.request
        for i in read_catalogue(catalogue(tmp_path, ["amerob", "blujay", "mallar3"]), ["image"]).items
    }
    for species_id, draws in (("amerob", 3), ("blujay", 4), ("mallar3", 1)):
        first = plan[species_id].resolved_seed()
        assert client.seeds[species_id] == [first + k for k in range(draws)], species_id
        qa = records[species_id]["qa"]
        assert [d["seed"] for d in qa["draws"]] == client.seeds[species_id]
        assert qa["regenerations"] == draws - 1

    robin = records["amerob"]["qa"]
    assert (robin["passed"], robin["flagged"], robin["chosen"], robin["seed"]) == (
        True,
        False,
        2,
        plan["amerob"].resolved_seed() + 2,
    )
    assert [d["passed"] for d in robin["draws"]] == [False, False, True]
    assert (
        robin["draws"][0]["failures"][0].startswith("brisque")
        and "sharpness" in robin["draws"][0]["failures"][1]
    )
    assert (out / "image" / "amerob.png").read_bytes() == SHARP  # the passing draw is the one kept

    jay = records["blujay"]["qa"]
    assert (jay["passed"], jay["flagged"], jay["chosen"]) == (
        False,
        True,
        0,
    )  # none passed: the earliest of the best
    assert (out / "image" / "blujay.png").read_bytes() == BLURRED
    assert jay["review"] is True  # flagged items are always queued
    queued = {e.entry["species_id"]: e for e in ReviewQueue(out / REVIEW_FOLDER).entries()}
    assert queued["blujay"].entry["reason"] == "flagged" and queued["blujay"].status == "pending"
    assert (out / REVIEW_FOLDER / queued["blujay"].entry["image"]).read_bytes() == BLURRED
    queued_count = sum(r["qa"]["review"] for r in records.values())
    assert f"quality: 2 passed, 1 flagged (best draw kept), 5 redraw(s), {queued_count} queued" in said

    # The same run elsewhere draws the same seeds and keeps the same verdicts.
    again = PhotoClient({"amerob": {2}, "mallar3": {0}})
    records_again, _ = run(tmp_path, tmp_path / "again", again, gate(tmp_path / "again", max_regenerations=3))
    assert again.seeds == client.seeds
    assert {k: r["qa"]["draws"] for k, r in records_again.items()} == {
        k: r["qa"]["draws"] for k, r in records.items()
    }


def test_max_regenerations_zero_keeps_the_first_draw_and_flags_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    client = PhotoClient({})
    records, _ = run(tmp_path, out, client, gate(out, max_regenerations=0))
    assert {len(seeds) for seeds in client.seeds.values()} == {1}
    assert all(r["qa"]["flagged"] and r["qa"]["regenerations"] == 0 for r in records.values())


def test_a_qa_run_redoes_items_done_without_qa_and_then_resumes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(tmp_path, out, PhotoClient({"amerob": {0}, "blujay": {0}, "mallar3": {0}}), None)
    client = PhotoClient({"amerob": {0}, "blujay": {0}, "mallar3": {0}})
    records, _ = run(tmp_path, out, client, gate(out))
    assert set(client.seeds) == {"amerob", "blujay", "mallar3"} and all("qa" in r for r in records.values())
    idle = PhotoClient({})
    run(tmp_path, out, idle, gate(out))
    assert idle.seeds == {}  # everything done with verdicts: nothing drawn again


def test_a_rejected_picture_is_drawn_again_past_every_seed_tried_and_queued_again(tmp_path: Path) -> None:
    out = tmp_path / "out"
    every_draw_good = {name: set(range(10)) for name in ("amerob", "blujay", "mallar3")}
    first, _ = run(tmp_path, out, PhotoClient(every_draw_good), gate(out, share=1.0))
    queue = ReviewQueue(out / REVIEW_FOLDER)
    assert {e.entry["species_id"]: e.status for e in queue.entries()} == dict.fromkeys(first, "pending")
    duck = first["mallar3"]
    queue.decide(duck["id"], "rejected", reviewer="ana", note="a goose")
    queue.decide(first["amerob"]["id"], "approved", reviewer="ana")

    client = PhotoClient(every_draw_good)
    second, said = run(tmp_path, out, client, gate(out, share=0.0))
    assert list(client.seeds) == ["mallar3"] and "1 done, 2 skipped" in said  # only the rejected one
    assert client.seeds["mallar3"] == [duck["qa"]["seed"] + 1]  # past the seed that was rejected
    redone = second["mallar3"]["qa"]
    assert (redone["first_draw"], redone["replaces"], redone["seed"]) == (
        1,
        duck["qa"]["seed"],
        duck["qa"]["seed"] + 1,
    )
    entries = {e.entry["species_id"]: e for e in ReviewQueue(out / REVIEW_FOLDER).entries()}
    assert entries["mallar3"].entry["reason"] == "replaces a rejected picture"  # queued though share is 0
    assert entries["mallar3"].status == "pending" and entries["amerob"].status == "approved"

    idle = PhotoClient(every_draw_good)
    run(tmp_path, out, idle, gate(out))
    assert idle.seeds == {}  # the replacement was not rejected: nothing to redo
    queue.decide(duck["id"], "rejected", reviewer="ana")
    again = PhotoClient(every_draw_good)
    run(tmp_path, out, again, gate(out))
    assert again.seeds == {"mallar3": [duck["qa"]["seed"] + 2]}


def test_redraw_seeds_wrap_within_the_seed_range() -> None:
    request = ImageRequest(species="Blue Jay", seed=LIMITS.seed.max)
    assert redraw(request, 1).seed == 0 and redraw(request, 2).seed == 1
    derived = ImageRequest(species="Blue Jay")
    assert redraw(derived, 3).seed == derived.resolved_seed() + 3
    assert redraw(derived, 3).canonical_json() != derived.canonical_json()


def test_an_animation_is_judged_by_its_poster_or_else_its_first_frame() -> None:
    frames = [PHOTO, PHOTO.filter(ImageFilter.GaussianBlur(3))]
    buffer = BytesIO()
    frames[0].save(buffer, format="WEBP", save_all=True, append_images=frames[1:], lossless=True)
    with_poster = GeneratedAnimation({"webp": buffer.getvalue(), "poster": BLURRED}, {})
    assert judged_picture(with_poster) == (BLURRED, ".png")
    data, suffix = judged_picture(GeneratedAnimation({"webp": buffer.getvalue()}, {}))
    assert suffix == ".png" and Image.open(BytesIO(data)).tobytes() == PHOTO.tobytes()


def test_review_sampling_hits_the_configured_share_and_picks_the_same_items_every_time() -> None:
    ids = [f"{n:016x}" for n in range(20_000)]
    for share in (0.1, 0.25):
        picked = [i for i in ids if sampled(i, share)]
        assert abs(len(picked) / len(ids) - share) < 0.01, share
        assert picked == [i for i in ids if sampled(i, share)]
    assert not any(sampled(i, 0.0) for i in ids) and all(sampled(i, 1.0) for i in ids)
    assert QaConfig.load().review.share == 0.10


def test_review_decisions_persist_and_the_cli_lists_approves_and_rejects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    queue = ReviewQueue(out / REVIEW_FOLDER)
    for item_id, species in (("aaa111", "Blue Jay"), ("bbb222", "Mallard"), ("bbc333", "Killdeer")):
        queue.enqueue(
            {"id": item_id, "kind": "image", "species": species, "reason": "sampled"}, SHARP, ".png"
        )
    assert main(["qa", "review", "approve", "aaa", "--out", str(out), "--reviewer", "ana"]) == 0
    assert (
        main(["qa", "review", "reject", "bbb2", "--out", str(out), "--reviewer", "bo", "--note", "two heads"])
        == 0
    )
    assert "aaa111: approved by ana" in capsys.readouterr().out

    reread = {e.id: e for e in ReviewQueue(out / REVIEW_FOLDER).entries()}  # a new reader: from disk
    assert {k: e.status for k, e in reread.items()} == {
        "aaa111": "approved",
        "bbb222": "rejected",
        "bbc333": "pending",
    }
    assert reread["bbb222"].decision["note"] == "two heads" and reread["bbb222"].decision["reviewer"] == "bo"

    assert main(["qa", "review", "list", "--out", str(out)]) == 0
    listed = capsys.readouterr().out
    assert "bbc333" in listed and "aaa111" not in listed and "1 item(s)" in listed
    assert main(["qa", "review", "list", "--out", str(out), "--all"]) == 0
    assert "3 item(s)" in capsys.readouterr().out

    assert main(["qa", "review", "approve", "bb", "--out", str(out), "--reviewer", "ana"]) == 2
    assert "invalid 'id': 'bb' matches 2 queued items" in capsys.readouterr().err
    assert main(["qa", "review", "approve", "zzz", "--out", str(out), "--reviewer", "ana"]) == 2
    assert "'zzz' matches no queued item" in capsys.readouterr().err
    with pytest.raises(ValueError, match="invalid 'decision': got 'maybe'; allowed: approved, rejected"):
        queue.decide("aaa111", "maybe", reviewer="ana")

    queue.decide("aaa111", "rejected", reviewer="cy")  # changed mind: the last decision wins, history stays
    assert {e.id: e.status for e in queue.entries()}["aaa111"] == "rejected"
    assert len((out / REVIEW_FOLDER / "decisions.jsonl").read_text().splitlines()) == 3


@pytest.mark.triton
def test_a_served_qa_run_verifies_gates_queues_and_reports_through_the_cli(
    server, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The tiny model's random-weight pictures fail the gates: each item is drawn twice (one
    redraw in this config), flagged, queued; the report lists both species once."""
    config = tmp_path / "qa.yaml"
    text = (Path(__file__).parent.parent / "birdgen" / "data" / "qa.yaml").read_text()
    config.write_text(text.replace("max_regenerations: 3", "max_regenerations: 1"))
    out = tmp_path / "out"
    species = catalogue(tmp_path, ["amerob", "blujay"])
    args = [
        "pregenerate",
        "--catalog",
        str(species),
        "--kinds",
        "image",
        "--out",
        str(out),
        "--url",
        server.grpc_url,
    ]
    args += [f"--image={k}={v}" for k, v in SMALL.items()]
    args += ["--qa", "--verifier", str(tiny_model / SPECIES_VERIFIER_FOLDER), "--qa-config", str(config)]
    assert main(args) == 0
    records = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
    assert len(records) == 2
    for record in records:
        qa = record["qa"]
        assert len(qa["draws"]) == 2 and qa["flagged"] and qa["review"] is True
        assert qa["draws"][1]["seed"] == qa["draws"][0]["seed"] + 1
        for draw in qa["draws"]:
            assert draw["brisque"] > 35 or draw["sharpness"] < 100 or not draw["zero_shot"]["passed"]
            assert 0 < draw["zero_shot"]["score"] < 1 and draw["zero_shot"]["rank"] >= 1
        kept = qa["draws"][qa["chosen"]]
        data = (out / record["files"]["image"]["path"]).read_bytes()
        assert Image.open(BytesIO(data)).size == (256, 256)
        assert read_metadata(data)["seed"] == kept["seed"]  # the served PNG of the kept draw
    assert {e.status for e in ReviewQueue(out / REVIEW_FOLDER).entries()} == {"pending"}

    assert main(["qa", "report", "--out", str(out)]) == 0
    assert "2 items, 2 species" in capsys.readouterr().out
    rows = (out / "qa-report" / "species.csv").read_text().splitlines()
    assert len(rows) == 3 and {row.split(",")[0] for row in rows[1:]} == {"amerob", "blujay"}


def test_qa_options_are_refused_where_they_cannot_apply(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["pregenerate", "--out", str(tmp_path / "out"), "--url", "127.0.0.1:1", "--kinds", "image"]
    assert main([*base, "--verifier", str(tmp_path)]) == 2
    assert "--verifier, --classifier and --qa-config need --qa" in capsys.readouterr().err
    assert main([*base, "--qa", "--image", "format=eink", "--image", "eink_panel=296x128"]) == 2
    assert "--qa judges photos, not e-ink previews" in capsys.readouterr().err
    assert main([*base, "--qa", "--verifier", str(tmp_path)]) == 2
    assert f"zero-shot verifier folder {tmp_path} has no config.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was generated


def test_qa_check_judges_picture_files_and_exits_1_when_one_fails(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sharp, soft = tmp_path / "sharp.png", tmp_path / "soft.png"
    sharp.write_bytes(SHARP)
    soft.write_bytes(BLURRED)
    verifier = str(tiny_model / SPECIES_VERIFIER_FOLDER)
    assert main(["qa", "check", str(sharp), "--species", "amerob"]) == 0
    assert (
        main(["qa", "check", str(sharp), str(soft), "--species", "American Robin", "--verifier", verifier])
        == 1
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    first, with_verifier, blurred_line = lines
    assert [line["image"] for line in lines] == [str(sharp), str(sharp), str(soft)]
    assert first["passed"] and "zero_shot" not in first
    assert 0 < with_verifier["zero_shot"]["score"] < 1 and with_verifier["zero_shot"]["rank"] >= 1
    assert not blurred_line["passed"] and blurred_line["failures"][0].startswith("brisque")
    assert main(["qa", "check", str(tmp_path / "missing.png"), "--species", "amerob"]) == 2
