"""birdgen.server against the real tritonserver from the nvidia-pytriton wheel (python backend, CPU)."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import textwrap
from pathlib import Path

import numpy as np
import pytest

import birdgen
from birdgen.process_group import live_group_members
from birdgen.server import TritonServer
from birdgen.triton_install import MODEL_BOOTSTRAP, TritonServerError, server_environment

pytestmark = pytest.mark.triton

if importlib.util.find_spec("pytriton") is None:
    pytest.skip("nvidia-pytriton (tritonserver) is not installed", allow_module_level=True)

ECHO_CONFIG = """\
name: "{name}"
backend: "python"
max_batch_size: 0
input [ {{ name: "INPUT" data_type: TYPE_FP32 dims: [ -1 ] }} ]
output [
  {{ name: "OUTPUT" data_type: TYPE_FP32 dims: [ -1 ] }},
  {{ name: "ORIGIN" data_type: TYPE_STRING dims: [ 2 ] }}
]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""

# Echoes INPUT * 2 and reports where birdgen and numpy were imported from *inside the stub*, which proves
# the bootstrap reaches the venv (numpy) and the editable install (birdgen, via its .pth finder).
ECHO_MODEL = (
    MODEL_BOOTSTRAP
    + """
import numpy as np
import triton_python_backend_utils as pb_utils

import birdgen


class TritonPythonModel:
    def execute(self, requests):
        origin = np.array([birdgen.__file__.encode(), np.__file__.encode()], dtype=np.object_)
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT").as_numpy()
            outputs = [pb_utils.Tensor("OUTPUT", x * 2), pb_utils.Tensor("ORIGIN", origin)]
            responses.append(pb_utils.InferenceResponse(outputs))
        return responses
"""
)

BROKEN_MODEL = MODEL_BOOTSTRAP + textwrap.dedent(
    """
    class TritonPythonModel:
        def initialize(self, args):
            raise RuntimeError("broken on purpose")
    """
)


def _write_model(repo: Path, name: str, source: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(ECHO_CONFIG.format(name=name))
    (repo / name / "1" / "model.py").write_text(source)


@pytest.fixture
def echo_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    _write_model(repo, "echo", ECHO_MODEL)
    return repo


def _infer_echo(server: TritonServer) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        assert client.is_server_ready()
        data = np.arange(5, dtype=np.float32)
        inp = grpcclient.InferInput("INPUT", list(data.shape), "FP32")
        inp.set_data_from_numpy(data)
        result = client.infer("echo", [inp])
    finally:
        client.close()
    np.testing.assert_array_equal(result.as_numpy("OUTPUT"), data * 2)
    birdgen_file, numpy_file = (v.decode() for v in result.as_numpy("ORIGIN"))
    assert Path(birdgen_file).resolve() == Path(birdgen.__file__).resolve()
    assert Path(numpy_file).resolve() == Path(np.__file__).resolve()  # the venv's numpy, not the system's


def _assert_gone(pid: int, port: int) -> None:
    """The server and every stub of its process group are gone, and nothing listens on its port."""
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert live_group_members(pid) == []  # no stub left running (zombies await pid 1's reaping)
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_serves_python_model_from_the_venv_and_stops_cleanly(echo_repo: Path, tmp_path: Path) -> None:
    log = tmp_path / "triton.log"
    server = TritonServer(echo_repo, log_file=log)
    with server:
        pid = server.pid
        assert pid is not None
        assert os.getpgid(pid) == pid  # its own group, so stop() signals it alone
        _infer_echo(server)
    assert server.returncode == 0
    assert server.stop() == 0  # idempotent
    assert server.pid is None
    _assert_gone(pid, server.grpc_port)
    assert "successfully loaded 'echo'" in log.read_text()


def test_restart_on_same_repository_and_ports_even_after_a_kill(echo_repo: Path, tmp_path: Path) -> None:
    server = TritonServer(echo_repo, log_file=tmp_path / "triton.log").start()
    first_pid = server.pid
    assert first_pid is not None
    prefix = server._shm_prefix
    assert server.stop(timeout=0.0) == -signal.SIGKILL  # no grace: SIGKILL to the whole group
    _assert_gone(first_pid, server.http_port)
    assert not list(Path("/dev/shm").glob(f"{prefix}*"))  # the killed server's regions were removed

    server.start()
    try:
        assert server.pid not in (None, first_pid)
        _infer_echo(server)
    finally:
        assert server.stop() == 0


def test_broken_model_fails_start_naming_the_model(echo_repo: Path, tmp_path: Path) -> None:
    _write_model(echo_repo, "broken_model", BROKEN_MODEL)
    server = TritonServer(echo_repo, log_file=tmp_path / "triton.log")
    with pytest.raises(TritonServerError, match="broken_model") as excinfo:
        server.start(timeout=60)
    assert "broken on purpose" in str(excinfo.value)
    assert server.pid is None
    assert server.returncode not in (None, 0)
    assert str(server.log_file) in str(excinfo.value)  # the message points at the full log


def test_explicit_mode_loads_only_the_requested_models(echo_repo: Path) -> None:
    _write_model(echo_repo, "broken_model", BROKEN_MODEL)
    with TritonServer(echo_repo, model_control="explicit", load_models=["echo"]) as server:
        _infer_echo(server)


def test_command_line_and_environment(tmp_path: Path) -> None:
    server = TritonServer(tmp_path, grpc_port=18001, http_port=18000, metrics_port=18002, log_verbose=1)
    cmd = server.command()
    assert Path(cmd[0]).name == "tritonserver"
    for arg in ("--grpc-port=18001", "--http-port=18000", "--metrics-port=18002", "--exit-on-error=true"):
        assert arg in cmd
    assert (server.grpc_url, server.http_url) == ("127.0.0.1:18001", "127.0.0.1:18000")
    assert server.metrics_url == "http://127.0.0.1:18002/metrics"
    backend_dir = Path(next(a for a in cmd if a.startswith("--backend-directory=")).split("=", 1)[1])
    assert (backend_dir / "python" / "triton_python_backend_stub").is_file()
    env = server_environment()
    assert "nvidia_pytriton.libs" in env["LD_LIBRARY_PATH"]
    assert env["BIRDGEN_SITE"]
    with pytest.raises(ValueError, match="explicit"):
        TritonServer(tmp_path, load_models=["echo"])
