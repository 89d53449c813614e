"""`birdgen gateway` as a real process on a free localhost port, for the gateway's end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from birdgen.server import free_port
from tests.processes import stop


class Gateway:
    def __init__(self, process: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.process, self.url, self.log = process, url, log

    def client(self, **options: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **options)  # type: ignore[arg-type]

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would: no shutdown hook runs."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)


@contextmanager
def running_gateway(
    triton_url: str, redis_url: str, log_dir: Path, *, healthy: bool = True, **settings: object
) -> Iterator[Gateway]:
    """The gateway with BIRDGEN_<SETTING> = value for each of `settings`, ready once /health says ok
    (`healthy=False`: once it answers at all, for a gateway whose Triton is meant to be down)."""
    port = free_port()
    env = os.environ | {f"BIRDGEN_{k.upper()}": str(v) for k, v in settings.items()}
    env |= {"BIRDGEN_TRITON_URL": triton_url, "BIRDGEN_REDIS_URL": redis_url}
    log = log_dir / f"gateway-{port}.log"
    command = [sys.executable, "-m", "birdgen.cli", "gateway", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    gateway = Gateway(process, f"http://127.0.0.1:{port}", log)
    try:
        _wait_answering(gateway, 200 if healthy else None)
        yield gateway
    finally:
        stop(process, grace_s=15)


def _wait_answering(gateway: Gateway, status: int | None, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if gateway.process.poll() is not None:
            raise RuntimeError(f"gateway exited with {gateway.process.returncode}: {gateway.log.read_text()}")
        try:
            answer = httpx.get(gateway.url + "/health", timeout=10).status_code
            if status is None or answer == status:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"gateway not healthy after {timeout} s: {gateway.log.read_text()}")
        time.sleep(0.1)
