"""Run the real ``tritonserver`` from the ``nvidia-pytriton`` wheel as a managed child process.

Why: tests and ``birdgen serve`` need a genuine Triton (gRPC, HTTP, metrics, python backend, response
cache) without the NGC container. ``birdgen.triton_install`` makes the wheel's server runnable; this
module starts it on free ports in its own process group, waits for readiness, quotes its log on
failure, and stops it (``birdgen.process_group``) without leaving stubs or shared memory behind.

Kept import-cheap on purpose (stdlib only, no torch, no tritonclient): the CLI imports it eagerly.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO

from birdgen.contracts import ADMIN_KEY_HEADER, ADMIN_PROTOCOLS
from birdgen.process_group import exit_status, wait_exit_unreaped, wait_group_gone
from birdgen.triton_install import TritonServerError, check_stub_libraries, server_environment, triton_install

__all__ = ["TritonServer", "free_port", "serve_forever", "serving_flags"]

_LOG_ERROR_LINE = re.compile(r"^E\d{4} |^error: |failed to load", re.IGNORECASE)
_LOG_NOISE = re.compile(r"CudaDriverHelper has not been initialized")  # every start on a CPU-only host


def free_port() -> int:
    """Return a TCP port that is free on all interfaces now (never the same one twice per process)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        if port not in _issued_ports:
            _issued_ports.add(port)
            return port
    raise TritonServerError("could not find a free TCP port")


_issued_ports: set[int] = set()
_running: set[TritonServer] = set()


@atexit.register
def _stop_leftovers() -> None:
    """Servers run in their own session, so nothing else would stop them if the caller forgot to."""
    for server in list(_running):
        with contextlib.suppress(Exception):
            server.stop(timeout=5.0)


def admin_key_from_env() -> str | None:
    """BIRDGEN_ADMIN_KEY: a secret, so read from the environment only, never a flag (docs/security.md)."""
    return os.environ.get("BIRDGEN_ADMIN_KEY") or None


def serving_flags(
    repository: Path,
    *,
    grpc_port: int,
    http_port: int,
    metrics_port: int,
    model_control: str,
    load_models: Sequence[str],
    cache_size_bytes: int,
    admin_key: str | None = None,
) -> list[str]:
    """The tritonserver flags every birdgen server runs with, here (TritonServer) and in the image
    (birdgen.entrypoint): repository, ports, model control, fail-fast loading, the response cache.

    With `admin_key`, Triton's admin protocols (contracts.ADMIN_PROTOCOLS: loading and unloading
    models, the repository index, configs, shared memory, trace and log settings) answer only calls
    carrying the header contracts.ADMIN_KEY_HEADER with that value, on gRPC and HTTP alike; inference,
    metadata, health and statistics stay open. Triton takes the key only on its command line.

    No flag here bounds a request: Triton 2.51 (and the image's 2.53) has none for the gRPC message
    or the HTTP body (gRPC's receive limit is compiled in at INT32_MAX; 300 MiB was accepted on both),
    so limits.yaml's serving.max_request_bytes is enforced in front, by the gateway; the queue bounds
    are per model, in the entry configs (triton_config.bound_queue). docs/reliability.md, "Limits"."""
    flags = [
        f"--model-repository={Path(repository).resolve()}",
        f"--grpc-port={grpc_port}",
        f"--http-port={http_port}",
        f"--metrics-port={metrics_port}",
        f"--model-control-mode={model_control}",
        *(f"--load-model={name}" for name in load_models),
        # A model that fails to load must fail the start loudly rather than serve a partial repository.
        "--exit-on-error=true",
        "--strict-readiness=true",
    ]
    if cache_size_bytes > 0:
        flags.append(f"--cache-config=local,size={cache_size_bytes}")
    if admin_key:
        restricted = f"{','.join(ADMIN_PROTOCOLS)}:{ADMIN_KEY_HEADER}={admin_key}"
        flags += [f"--grpc-restricted-protocol={restricted}", f"--http-restricted-api={restricted}"]
    return flags


class TritonServer:
    """One tritonserver process on its own ports, in its own session, logging to a file.

    ``grpc_url`` and ``http_url`` are ``host:port`` (what ``tritonclient`` expects); ``metrics_url`` is
    the full Prometheus URL. Ports left as ``None`` are picked free at construction and kept across
    restarts, so clients built before ``start()`` stay valid.
    """

    def __init__(
        self,
        model_repository: Path,
        *,
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        model_control: str = "none",
        load_models: Sequence[str] = (),
        log_verbose: int = 0,
        log_file: Path | None = None,
        cache_size_bytes: int = 256 * 2**20,
        admin_key: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        if model_control not in ("none", "explicit", "poll"):
            raise ValueError(f"model_control must be 'none', 'explicit' or 'poll', not {model_control!r}")
        if load_models and model_control != "explicit":
            raise ValueError("load_models needs model_control='explicit' (Triton rejects --load-model else)")
        self.model_repository = Path(model_repository).resolve()
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.model_control = model_control
        self.load_models = tuple(load_models)
        self.log_verbose = log_verbose
        self.log_file = Path(log_file) if log_file is not None else None
        self.cache_size_bytes = cache_size_bytes
        self.admin_key = admin_key
        self.extra_args = tuple(extra_args)
        self.returncode: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_offset = 0
        self._shm_prefix = ""
        self._temp_log = False  # log_file was made by us: removed after a clean exit
        self._lock = threading.RLock()

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs (also its process-group id), else None."""
        proc = self._process
        if proc is None or proc.returncode is not None or exit_status(proc.pid) is not None:
            return None
        return proc.pid

    def command(self) -> list[str]:
        """The full tritonserver command line (also handy to print for debugging)."""
        install = triton_install()
        cmd = [
            str(install.binary),
            f"--backend-directory={install.backend_dir}",
            f"--cache-directory={install.cache_dir}",
            f"--log-verbose={self.log_verbose}",
            *serving_flags(
                self.model_repository,
                grpc_port=self.grpc_port,
                http_port=self.http_port,
                metrics_port=self.metrics_port,
                model_control=self.model_control,
                load_models=self.load_models,
                cache_size_bytes=self.cache_size_bytes,
                admin_key=self.admin_key,
            ),
        ]
        if self._shm_prefix:
            # Unique per start, so stop() can remove what a killed server left in /dev/shm.
            cmd.append(f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}")
        return [*cmd, *self.extra_args]

    def start(self, timeout: float = 180.0) -> TritonServer:
        """Spawn tritonserver and block until ``/v2/health/ready`` answers 200 (all models loaded)."""
        with self._lock:
            if self.pid is not None:
                return self
            if not self.model_repository.is_dir():
                raise TritonServerError(f"model repository {self.model_repository} is not a directory")
            install = triton_install()
            check_stub_libraries(install)
            if self.log_file is None or self._temp_log:
                fd, name = tempfile.mkstemp(prefix="birdgen-triton-", suffix=".log")
                os.close(fd)
                self.log_file, self._temp_log = Path(name), True
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log = self.log_file.open("ab")
            self._log_offset = self._log.tell()  # error tails show this run only
            self._shm_prefix = f"birdgen_{uuid.uuid4().hex[:12]}_"
            self.returncode = None
            try:
                self._process = subprocess.Popen(
                    self.command(),
                    stdin=subprocess.DEVNULL,
                    stdout=self._log,
                    stderr=subprocess.STDOUT,
                    env=server_environment(),
                    start_new_session=True,  # own process group: stop() signals it alone, Ctrl-C does not
                )
            except OSError as exc:
                self._log.close()
                self._log = None
                raise TritonServerError(f"could not run {install.binary}: {exc}") from exc
            _running.add(self)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop(timeout=5.0)
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        proc = self._process
        assert proc is not None
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            code = exit_status(proc.pid)
            if code is not None:  # left unreaped: stop() (below, in start) still sweeps its stubs
                raise TritonServerError(self._failure(f"exited with code {code} before becoming ready"))
            if self.is_ready():
                return
            if time.monotonic() > deadline:
                raise TritonServerError(self._failure(f"was not ready after {timeout:.0f} s"))
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def is_ready(self, timeout: float = 1.0) -> bool:
        """GET /v2/health/ready; False on any connection error (proxies bypassed: it is localhost)."""
        import urllib.error  # lazily: keeps `import birdgen.server` cheap
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"http://{self.http_url}/v2/health/ready", timeout=timeout) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def log_text(self) -> str:
        """This run's server log so far (everything since the last start())."""
        if self.log_file is None or not self.log_file.exists():
            return ""
        with self.log_file.open("rb") as handle:
            handle.seek(self._log_offset)
            return handle.read().decode("utf-8", errors="replace")

    def _failure(self, reason: str, tail_lines: int = 40) -> str:
        lines = self.log_text().splitlines()
        errors = [ln for ln in lines if _LOG_ERROR_LINE.search(ln) and not _LOG_NOISE.search(ln)][:20]
        parts = [f"tritonserver {reason} (model repository {self.model_repository}, log {self.log_file})"]
        if errors:
            parts += ["Errors:", *errors]
        parts += [f"Last {min(tail_lines, len(lines))} log lines:", *lines[-tail_lines:]]
        return "\n".join(parts)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGINT the server (graceful: Triton drains and unloads), SIGKILL its group after ``timeout``.

        Returns the exit code (negative signal number if killed); calling it again returns the same code.
        """
        with self._lock:
            proc = self._process
            if proc is None:
                return self.returncode if self.returncode is not None else 0
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGINT)
                if not wait_exit_unreaped(proc.pid, timeout):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    wait_exit_unreaped(proc.pid, 10.0)
                # The exited-but-unreaped leader keeps its pid (= our group id) reserved, so this reaches
                # only leftover stubs of this server, never a stranger that reused the pid.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            self.returncode = proc.wait()
            wait_group_gone(proc.pid, 5.0)  # SIGKILLed stubs vanish asynchronously; ports close with them
            self._process = None
            _running.discard(self)
            if self._log is not None:
                self._log.close()
                self._log = None
            self._remove_shm_regions()
            if self._temp_log and self.returncode == 0 and self.log_file is not None:
                self.log_file.unlink(missing_ok=True)  # kept after failures: error messages point at it
            return self.returncode

    def _remove_shm_regions(self) -> None:
        """A killed server leaves its python-backend regions in /dev/shm; they are ours by prefix."""
        shm = Path("/dev/shm")
        if self._shm_prefix and shm.is_dir():
            for region in shm.glob(f"{self._shm_prefix}*"):
                with contextlib.suppress(OSError):
                    region.unlink()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"TritonServer({str(self.model_repository)!r}, grpc={self.grpc_url}, http={self.http_url}, "
            f"pid={self.pid})"
        )


def serve_forever(server: TritonServer, *, echo_log: bool = True) -> int:
    """Start ``server``, print its URLs, and block until SIGINT/SIGTERM; then stop it cleanly.

    Returns the server's exit code (its own, if it died by itself; 130 if interrupted while starting).
    The server log is copied to stderr as it grows when ``echo_log`` is set (it lives in a file so that
    start() errors can quote it).
    """
    stop_requested = threading.Event()

    def _request_stop(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    try:
        server.start()
    except KeyboardInterrupt:
        return 130
    server._temp_log = False  # its path is printed below, so keep the log after exit
    print(
        f"Triton ready: grpc={server.grpc_url} http={server.http_url} metrics={server.metrics_url}\n"
        f"model repository: {server.model_repository}\nlog: {server.log_file}  (Ctrl-C to stop)",
        flush=True,
    )
    previous = {sig: signal.signal(sig, _request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    offset = server._log_offset
    try:
        while not stop_requested.wait(0.5):
            if echo_log:
                offset = _echo_log(server, offset)
            if server.pid is None:
                print("tritonserver exited on its own", file=sys.stderr, flush=True)
                break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        code = server.stop()
        if echo_log:
            _echo_log(server, offset)
    return code


def _echo_log(server: TritonServer, offset: int) -> int:
    if server.log_file is None:
        return offset
    with contextlib.suppress(OSError), server.log_file.open("rb") as handle:
        handle.seek(offset)
        chunk = handle.read()
        sys.stderr.write(chunk.decode("utf-8", errors="replace"))
        sys.stderr.flush()
        offset += len(chunk)
    return offset
