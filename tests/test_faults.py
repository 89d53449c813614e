"""Faults (issue 16), each injected into the real services, with the outcome birdgen promises.

A python-backend stub killed mid-request, the server restarted under a waiting client, Redis
stopped and restarted under the response cache, the batch jobs and the gateway, and a disk that
fills up during pre-generation. A model version swapped under traffic is the hot-swap test of
test_families.py. docs/reliability.md has the table: fault, promise, test, what the last run showed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import resource
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from prometheus_client import CollectorRegistry

from birdgen.client import (
    BirdClient,
    BirdgenError,
    DeadlineExceededError,
    GeneratedImage,
    GenerationError,
    ResponseCache,
    RetryPolicy,
    ServerUnavailableError,
)
from birdgen.client.pregenerate import MANIFEST, Manifest
from birdgen.gateway.app import error_status
from birdgen.gateway.jobs import BatchJobs
from birdgen.process_group import dead_stubs
from birdgen.schema import ImageRequest
from birdgen.server import TritonServer
from tests.conftest import IMAGE_MODELS, ROBIN
from tests.gateway_process import running_gateway
from tests.redis_fixture import running_redis
from tests.test_gateway import BODY

pytestmark = pytest.mark.triton
WAIT_S = 120.0  # bound of every wait on a condition: far above what a loaded machine needs


@pytest.fixture(scope="module")
def own_server(repository: Path) -> Iterator[TritonServer]:
    """A server these tests break and restart (a killed stub needs a restart): not the session's."""
    with TritonServer(repository, model_control="explicit", load_models=IMAGE_MODELS) as server:
        yield server


def stub_of(server: TritonServer, model: str) -> int:
    """The pid of `model`'s python-backend stub in this run of `server` (stages have one instance).

    A stub's arguments are its model.py and a shared-memory region named with the server's prefix."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            argv = cmdline.read_bytes().decode().split("\0")
            if argv[2].startswith(server._shm_prefix) and f"/{model}/" in argv[1]:
                found.append(int(cmdline.parent.name))
    assert len(found) == 1, f"{model}: stubs {found}"
    return found[0]


def http_status(server: TritonServer, path: str) -> int:
    """Triton's HTTP status for `path` (proxies bypassed: it is localhost)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{server.http_url}{path}", timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def check_stubs(server: TritonServer) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "birdgen.cli", "check-stubs", "--pid", str(server.pid)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> float:
    """Poll `condition` until it holds (seconds it took); fails naming `what` after `timeout`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"not within {timeout:.0f} s: {what}"
        time.sleep(0.05)
    return time.monotonic() - start


# -- a python-backend stub killed mid-request ------------------------------------------------------
@pytest.mark.timeout(400, func_only=True)
def test_a_killed_stub_fails_its_requests_clearly_until_a_restart_and_check_stubs_says_so(
    own_server: TritonServer,
) -> None:
    """Triton's python backend neither restarts a stub that died nor reports it: every request
    that needs it fails (a clear GenerationError) while every health endpoint says 200. `birdgen
    check-stubs` (the liveness check) sees it; a restart brings the server back."""
    server = own_server
    unet = stub_of(server, "unet")
    requests = [{**ROBIN, "seed": 100 + i, "steps": 4} for i in range(12)]
    outcomes: dict[int, GeneratedImage | BirdgenError] = {}
    answered = threading.Condition()

    def draw(request: dict[str, Any]) -> None:
        with BirdClient(server.grpc_url, deadline_s=WAIT_S) as client:
            try:
                outcome: GeneratedImage | BirdgenError = client.generate_image(**request)
            except BirdgenError as exc:
                outcome = exc
        with answered:
            outcomes[request["seed"]] = outcome
            answered.notify_all()

    callers = [threading.Thread(target=draw, args=(request,)) for request in requests]
    for caller in callers:
        caller.start()
    with answered:  # the first answer: the other 11 wait for one of the 3 entry instances or draw
        assert answered.wait_for(lambda: bool(outcomes), timeout=WAIT_S)
        os.kill(unet, signal.SIGKILL)
    for caller in callers:
        caller.join(timeout=WAIT_S)
    unhealthy = "stage 'unet' failed: Stub process 'unet_0_0' is not healthy"
    failed = [o for o in outcomes.values() if isinstance(o, BirdgenError)]
    assert len(outcomes) == len(requests) and len(failed) >= len(requests) - 3  # none hung
    assert all(isinstance(o, GenerationError) and unhealthy in str(o) for o in failed), failed

    request = {**ROBIN, "seed": 71}
    with BirdClient(server.grpc_url, deadline_s=WAIT_S) as client:
        with pytest.raises(GenerationError, match=unhealthy):  # not restarted: every later request
            client.generate_image(**request)
        # Triton's response cache keeps that failure as an answer without outputs and gives it to
        # the repeat: a GenerationError too, not a crash in the client.
        with pytest.raises(GenerationError, match="answered without image"):
            client.generate_image(**request)
    assert [http_status(server, p) for p in ("/v2/health/live", "/v2/health/ready")] == [200, 200]
    assert http_status(server, "/v2/models/unet/ready") == 200
    assert dead_stubs(server.pid) == [unet]
    check = check_stubs(server)
    assert check.returncode == 1 and f"stub(s) {unet} died" in check.stderr

    start = time.monotonic()
    # The model whose stub died never unloads: Triton waits out its exit timeout (30 s) for it, so
    # the test kills it after 5 s, as an orchestrator does after its grace period.
    code = server.stop(timeout=5.0)
    stopped = time.monotonic() - start
    server.start()
    restarted = time.monotonic() - start
    print(
        f"\n{len(failed)} of {len(requests)} in flight failed; stop with a dead stub: exit {code} after "
        f"{stopped:.1f} s; up again after {restarted:.1f} s"
    )
    assert dead_stubs(server.pid) == [] and check_stubs(server).returncode == 0
    with BirdClient(server.grpc_url, deadline_s=WAIT_S) as client:
        assert client.generate_image(**request).metadata["seed"] == 71  # the cache went with the server


# -- the server restarted ---------------------------------------------------------------------------
@dataclass(frozen=True)
class NotedRetries(RetryPolicy):
    """A RetryPolicy that notes its retries, so a test knows the call met the server down (and when
    it was last refused)."""

    retried: threading.Event = field(default_factory=threading.Event, compare=False)
    times: list[float] = field(default_factory=list, compare=False)

    def backoff(self, *args: Any, **kwargs: Any) -> float:
        self.times.append(time.monotonic())
        self.retried.set()
        return super().backoff(*args, **kwargs)


@pytest.mark.timeout(400, func_only=True)
def test_a_call_made_while_the_server_restarts_is_answered_after_it_and_gateway_health_follows(
    own_server: TritonServer, redis_url: str, tmp_path: Path
) -> None:
    """A stop and a start on the same ports: a call with the default retries fails fast with a
    typed error; one whose policy allows enough attempts, made while the server is down, is
    answered by the restarted server with the same bytes. The gateway's /health follows."""
    server = own_server
    request = {**ROBIN, "seed": 72}
    with BirdClient(server.grpc_url) as client:
        before = client.generate_image(**request)
    with running_gateway(server.grpc_url, redis_url, tmp_path) as gateway, gateway.client() as http:
        assert server.stop() == 0 and server.pid is None  # a clean stop: every model unloaded
        down = http.get("/health")
        assert down.status_code == 503 and down.json()["triton"]["ready"] is False
        with BirdClient(server.grpc_url, deadline_s=2.0) as client, pytest.raises(BirdgenError) as short:
            client.generate_image(**request)  # the default policy gives up within seconds
        assert isinstance(short.value, ServerUnavailableError | DeadlineExceededError)

        policy = NotedRetries(max_attempts=100_000, base_s=0.05, max_s=1.0)
        answers: list[GeneratedImage | BirdgenError] = []

        def call_across_the_restart() -> None:
            with BirdClient(server.grpc_url, deadline_s=300.0, retry=policy) as client:
                try:
                    answers.append(client.generate_image(**request))
                except BirdgenError as exc:
                    answers.append(exc)

        caller = threading.Thread(target=call_across_the_restart)
        caller.start()
        assert policy.retried.wait(timeout=WAIT_S)  # it was refused: the server is down
        server.start()
        ready = time.monotonic()
        caller.join(timeout=300)
        answered = time.monotonic() - ready
        assert [a.data if isinstance(a, GeneratedImage) else a for a in answers] == [before.data]
        healthy = wait_until(lambda: http.get("/health").status_code == 200, "gateway /health 200")
        refused = policy.times[-1] - ready
        print(
            f"\nserver ready again: the call last refused {refused:.1f} s later, answered {answered:.1f} s "
            f"later ({len(policy.times)} attempts refused in all); gateway /health 200 {healthy:.1f} s later"
        )


# -- Redis stopped and restarted --------------------------------------------------------------------
@pytest.mark.timeout(120, func_only=True)
def test_the_response_cache_serves_through_a_redis_restart_and_caches_again_after_it(
    server: TritonServer, tmp_path: Path
) -> None:
    registry = CollectorRegistry()
    first, second = ({**ROBIN, "seed": seed} for seed in (73, 74))

    def counts() -> list[float | None]:
        return [
            registry.get_sample_value(f"birdgen_cache_{w}_total", {"kind": "image"})
            for w in ("misses", "hits", "errors")
        ]

    with running_redis(tmp_path, appendonly=True) as redis_server:
        cache = ResponseCache(redis_server.url, registry=registry, socket_timeout_s=10.0)
        with BirdClient(server.grpc_url, cache=cache) as client:
            one = client.generate_image(first)
            redis_server.stop()
            assert client.generate_image(first) == one  # from Triton: no error reaches the caller
            two = client.generate_image(second)
            assert counts() == [1, None, 2]
            redis_server.start()
            assert client.generate_image(first) == one  # a hit: the append-only file kept it
            assert [client.generate_image(second) for _ in range(2)] == [two, two]  # stored, then a hit
        cache.close()
    assert counts() == [2, 2, 2]


@pytest.mark.timeout(120, func_only=True)
def test_a_batch_job_outlives_a_redis_restart_keeping_its_finished_items(tmp_path: Path) -> None:
    """Item 0 finishes before Redis stops, items 1 and 2 while it is down (their results cannot be
    stored): after the restart the job resumes and finishes, item 0 not drawn again."""
    requests = [ImageRequest(**{**ROBIN, "seed": 80 + i}) for i in range(3)]
    drawn: Counter[int] = Counter()

    async def main() -> tuple[dict[str, Any], list[bytes | None]]:
        gates = {request.seed: asyncio.Event() for request in requests}

        async def generate(request: ImageRequest) -> GeneratedImage:
            assert request.seed is not None
            drawn[request.seed] += 1
            await gates[request.seed].wait()
            return GeneratedImage(f"png {request.seed}".encode(), "png", {"seed": request.seed})

        async def until(condition: Callable[[], Any], what: str) -> None:
            start = time.monotonic()
            while not await condition():
                assert time.monotonic() - start < WAIT_S, what
                await asyncio.sleep(0.02)

        with running_redis(tmp_path, appendonly=True) as redis_server:
            store = redis.asyncio.Redis.from_url(redis_server.url, socket_timeout=5, socket_connect_timeout=5)
            jobs = BatchJobs(store, generate, error_status, ttl_s=3600, lease_s=1.0)
            gates[80].set()
            job_id = await jobs.submit(requests)

            async def first_done_and_the_others_drawing() -> bool:
                status = await jobs.status(job_id)
                return status is not None and status["done"] == 1 and drawn[81] == drawn[82] == 1

            await until(first_done_and_the_others_drawing, "item 0 done, 1 and 2 drawing")

            async def paused() -> bool:
                return not jobs.running

            redis_server.stop()
            gates[81].set()
            gates[82].set()
            await until(paused, "the job paused")
            redis_server.start()
            scan = asyncio.create_task(jobs.scan_forever(0.1))

            async def finished() -> bool:
                report = await jobs.status(job_id)
                return report is not None and report["status"] == "done"

            try:
                await until(finished, "the job done after the restart")
                report = await jobs.status(job_id)
                files = [await jobs.file(job_id, i) for i in range(3)]
            finally:
                scan.cancel()
                await jobs.close()
                await store.aclose()
        assert report is not None
        return report, [None if f is None else f[0] for f in files]

    report, files = asyncio.run(main())
    assert (report["status"], report["done"], report["failed"]) == ("done", 3, 0)
    assert files == [b"png 80", b"png 81", b"png 82"]
    assert drawn == Counter({80: 1, 81: 2, 82: 2})  # finished work kept; the interrupted redrawn


@pytest.mark.timeout(180, func_only=True)
def test_the_gateway_through_a_redis_restart_fails_open_and_refuses_batches_clearly(
    server: TritonServer, tmp_path: Path
) -> None:
    """During the outage: /health 503 naming Redis, generation served past the rate limit (the
    limiter fails open), a batch submission 503 (jobs live in Redis). After it: the limit window
    kept by the append-only file applies again."""
    limit = 3
    (tmp_path / "redis").mkdir()
    with (
        running_redis(tmp_path / "redis", appendonly=True) as redis_server,
        running_gateway(server.grpc_url, redis_server.url, tmp_path, rate_limit_per_minute=limit) as gateway,
        gateway.client(headers={"X-API-Key": secrets.token_hex(8)}) as http,
    ):
        image = {**BODY, "seed": 75}
        assert [_post(http, image) for _ in range(limit + 1)] == [200] * limit + [429]
        redis_server.stop()
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["redis"] == {"reachable": False}
        assert health.json()["triton"]["ready"] is True
        assert [_post(http, image) for _ in range(limit + 1)] == [200] * (limit + 1)  # fail open
        batch = http.post("/api/v1/batch/images", json={"items": [image]})
        assert batch.status_code == 503 and "Redis" in batch.json()["detail"], batch.text
        assert batch.headers["retry-after"]
        redis_server.start()
        wait_until(lambda: http.get("/health").status_code == 200, "gateway /health 200")
        assert _post(http, image) == 429  # the window outlived the restart


def _post(http: Any, body: dict[str, Any]) -> int:
    return int(http.post("/api/v1/generate/image", json=body).status_code)


# -- a full disk during pre-generation --------------------------------------------------------------
@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Callable[[], None] | None]:
    """A tmpfs of `size` at `path`, and how to grow it (free space); None where mounting is not
    allowed (not root, no CAP_SYS_ADMIN): the caller limits file sizes instead."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        yield None
        return
    try:
        yield lambda: subprocess.run(["mount", "-o", "remount,size=64m", str(path)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _limit_file_size(limit: int) -> Callable[[], None]:
    def limit_in_child() -> None:  # writes past `limit` fail with EFBIG instead of killing the child
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_in_child


@pytest.mark.timeout(300, func_only=True)
def test_a_full_disk_stops_pregeneration_with_the_manifest_intact_and_a_rerun_finishes(
    server: TritonServer, tmp_path: Path
) -> None:
    total = 6
    command = [sys.executable, "-m", "birdgen.cli", "pregenerate", "--url", server.grpc_url]
    command += ["--kinds", "image", "--limit", str(total), "--concurrency", "1"]
    command += ["--image=width=256", "--image=height=256", "--image=steps=1"]
    with small_disk(tmp_path / "disk", "512k") as grow:  # room for three ~150 kB images
        out = tmp_path / "disk" / "out"
        run = [*command, "--out", str(out)]
        if grow is None:  # no tmpfs: no file may grow past 2 kB, so not even the first image fits
            full = subprocess.run(
                run, capture_output=True, text=True, timeout=240, preexec_fn=_limit_file_size(2000)
            )
        else:
            full = subprocess.run(run, capture_output=True, text=True, timeout=240)
        assert full.returncode == 2, full.stderr
        problem = "No space left on device" if grow is not None else "File too large"
        assert f"{problem} writing image " in full.stderr and "free space and run it again" in full.stderr
        done = _check_manifest(out)
        assert 1 <= len(done) < total if grow is not None else done == {}
        assert not list(out.rglob("*.tmp"))
        kept = {species: (out / "image" / f"{species}.png").stat().st_mtime_ns for species in done}

        if grow is not None:
            grow()
        rerun = subprocess.run(run, capture_output=True, text=True, timeout=240)
        assert rerun.returncode == 0, rerun.stderr
        assert f"{total - len(done)} done, {len(done)} skipped" in rerun.stderr
        assert len(_check_manifest(out)) == total
        assert all((out / "image" / f"{s}.png").stat().st_mtime_ns == t for s, t in kept.items())
        error = full.stderr.strip().splitlines()[-1]
        print(f"\nfull disk: {len(done)} of {total} done before it, the rest after; {error}")


def _check_manifest(out: Path) -> dict[str, dict[str, Any]]:
    """The manifest's done records by species, once every line parses and each done file is
    whole (its recorded sha256); and no file is recorded twice."""
    lines = (out / MANIFEST).read_text().splitlines() if (out / MANIFEST).exists() else []
    records = [json.loads(line) for line in lines]
    done = {r["species_id"]: r for r in records if r["status"] == "done"}
    assert len(done) == len(records)
    for record in done.values():
        entry = record["files"]["image"]
        assert hashlib.sha256((out / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]
    return done


@pytest.mark.timeout(60)
def test_a_manifest_line_the_disk_cannot_take_is_cut_off_again(tmp_path: Path) -> None:
    """Half a line would not parse: a failed append leaves the manifest as it was."""
    out = tmp_path / "out"
    Manifest(out).append({"id": "first", "status": "done"})
    size = (out / MANIFEST).stat().st_size
    script = "import sys, pathlib; from birdgen.client.pregenerate import Manifest; "
    script += "Manifest(pathlib.Path(sys.argv[1])).append({'id': 'second', 'padding': 'x' * 500})"
    appended = subprocess.run(
        [sys.executable, "-c", script, str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_limit_file_size(size + 100),  # room for 100 bytes of the ~530 of the line
    )
    assert appended.returncode == 1 and "File too large" in appended.stderr
    assert (out / MANIFEST).read_text() == '{"id": "first", "status": "done"}\n'
