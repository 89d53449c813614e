"""The host-wide CPU engine lock: exclusive across processes and threads, off on request, and what the
ONNX Runtime engine does with it (spin only while holding it)."""

from __future__ import annotations

import fcntl
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from birdgen.engines.cpu_lock import LOCK_ENV, CpuLock, lock_path


def other_process_can_lock(path: Path) -> bool:
    """Whether a separate process gets the lock file at once (non-blocking)."""
    code = (
        "import fcntl, sys\n"
        f"f = open({str(path)!r}, 'a')\n"
        "try:\n"
        "    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "except BlockingIOError:\n"
        "    sys.exit(1)\n"
    )
    return subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.fixture
def lock_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cpu.lock"
    monkeypatch.setenv(LOCK_ENV, str(path))
    return path


def test_default_lock_file_is_per_user_in_the_temp_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LOCK_ENV, raising=False)
    path = lock_path()
    assert path is not None and path.name.endswith(".lock") and "birdgen-cpu" in path.name


def test_lock_excludes_other_processes_while_held(lock_file: Path) -> None:
    lock = CpuLock()
    with lock:
        assert not other_process_can_lock(lock_file)
    assert other_process_can_lock(lock_file)


def test_lock_excludes_other_threads_of_the_process(lock_file: Path) -> None:
    """flock alone would let a second thread through on the same open file."""
    lock, order = CpuLock(), []

    def second() -> None:
        with lock:
            order.append("second")

    with lock:
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.2)  # the thread's chance to (wrongly) get in
        order.append("first released")
    thread.join()
    assert order == ["first released", "second"]


def test_two_locks_in_one_process_exclude_each_other(lock_file: Path) -> None:
    with CpuLock():
        other = open(lock_file, "a")  # noqa: SIM115 - a second open file, as a second engine has
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.close()


def test_off_turns_the_lock_into_a_no_op(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(LOCK_ENV, "off")
    lock = CpuLock()
    assert not lock.enabled and lock_path() is None
    with lock:
        pass


def test_inactive_lock_is_a_no_op_for_engines_off_the_cpu(lock_file: Path) -> None:
    lock = CpuLock(active=False)
    assert not lock.enabled
    with lock:
        assert other_process_can_lock(lock_file)


@pytest.mark.parametrize("setting", ["lock", "off"])
def test_onnxruntime_engine_spins_only_while_holding_the_lock(
    setting: str, lock_file: Path, monkeypatch: pytest.MonkeyPatch, repository: Path
) -> None:
    from birdgen.engines.onnxruntime import OnnxRuntimeEngine

    if setting == "off":
        monkeypatch.setenv(LOCK_ENV, "off")
    engine = OnnxRuntimeEngine(repository / "text_encoder" / "1" / "model.onnx", "cpu")
    options = engine.session.get_session_options()
    spin = "1" if setting == "lock" else "0"
    for key in ("session.intra_op.allow_spinning", "session.force_spinning_stop"):
        assert options.get_session_config_entry(key) == spin
    engine.infer({"input_ids": np.zeros((1, 77), dtype=np.int64)})
    assert other_process_can_lock(lock_file)  # released after the run
