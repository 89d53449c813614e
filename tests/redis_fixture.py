"""A real redis-server per test on a free localhost port (Debian's package; `make setup` installs it).

Per test, not per session: tests kill, pause and flush it, and a fresh one starts in milliseconds.
Import the fixture into a test module: `from tests.redis_fixture import redis_server  # noqa: F401`.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from birdgen.server import free_port
from tests.processes import stop


@dataclass
class RedisServer:
    url: str
    process: subprocess.Popen[bytes]
    command: list[str]  # how it was started: start() runs it again, same port and files
    log: Path

    def kill(self) -> None:
        """SIGKILL, as an outage would: no goodbye to connected clients."""
        self.process.kill()
        self.process.wait(timeout=5)

    def stop(self) -> None:
        """SIGTERM, as `docker restart` or Kubernetes would: Redis writes its append-only file first."""
        stop(self.process)

    def start(self) -> None:
        """The same redis-server again, on its port and with its files, once it answers PING."""
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL)
        _wait_for_ping(self.url, self.process, self.log)


@contextlib.contextmanager
def running_redis(directory: Path, *, appendonly: bool = False) -> Iterator[RedisServer]:
    """redis-server on a free localhost port, its files in `directory`; stopped on exit.

    `appendonly`: with the deployment's persistence (docker/compose.yaml: the append-only file,
    fsynced every second), so data outlives a restart; else nothing is kept."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip(
            "redis-server is not installed (`make setup` installs it: apt-get install -y redis-server)"
        )
    port = free_port()
    log = directory / "redis.log"
    persistence = (
        ["--appendonly", "yes", "--appendfsync", "everysec"] if appendonly else ["--appendonly", "no"]
    )
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *persistence]
    command += ["--dir", str(directory), "--logfile", str(log)]
    server = RedisServer(
        f"redis://127.0.0.1:{port}/0", subprocess.Popen(command, stdin=subprocess.DEVNULL), command, log
    )
    try:
        _wait_for_ping(server.url, server.process, log)
        yield server
    finally:
        stop(server.process)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path) as server:
        yield server


def _wait_for_ping(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 10.0) -> None:
    client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {process.returncode}: {log.read_text()}")
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.02)
    finally:
        client.close()
