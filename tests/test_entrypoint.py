"""`birdgen entrypoint`, the server image's start: export when stale, refuse on a checksum mismatch, exec.

Fast on purpose: a hand-made repository (an echo python model plus a manifest with real SHA-256s)
stands in for an export, and the exporter is replaced where only the decision to export is tested.
One test execs the real pip-installed tritonserver through the entrypoint.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from birdgen import entrypoint
from birdgen.cli import main
from birdgen.contracts import MANIFEST, TARGET_FILE
from birdgen.entrypoint import RepositoryRefused, export_reasons, prepare, tritonserver_command
from birdgen.manifest import repository_files
from birdgen.server import free_port
from tests.test_server import ECHO_MODEL, _write_model


def _write_manifest(repo: Path, engine: str = "onnxruntime") -> None:
    files = repository_files(repo)  # what the exporter lists
    manifest = {"engine": engine, "entries": ["echo"], "stages": {}, "files": files}
    (repo / MANIFEST).write_text(json.dumps(manifest, indent=2))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """An exported-looking repository, up to date for onnxruntime on a machine without GPUs."""
    repo = tmp_path / "repo"
    _write_model(repo, "echo", ECHO_MODEL)
    _write_manifest(repo)
    (repo / TARGET_FILE).write_text(json.dumps({"engine": "onnxruntime", "gpus": []}))
    return repo


@pytest.fixture(autouse=True)
def no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same answer on every test machine (a GPU host would otherwise see a changed target)."""
    monkeypatch.setattr(entrypoint, "gpu_identity", list)


class FakeExporter:
    """Records export calls and writes what an export leaves: a repository whose manifest matches."""

    def __init__(self, template: Path) -> None:
        self.template = template
        self.calls: list[dict[str, Any]] = []

    def __call__(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(kwargs)
        out = kwargs["out"]
        if not out.exists():
            shutil.copytree(self.template, out)
        _write_manifest(out, kwargs["engine"])
        return json.loads((out / MANIFEST).read_text())


def test_tampered_file_refuses_naming_it(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_py = repo / "echo" / "1" / "model.py"
    model_py.write_text(model_py.read_text() + "\n# tampered\n")
    (repo / "echo" / "config.pbtxt").unlink()
    code = main(["entrypoint", "--model-repository", str(repo), "--dry-run"])
    err = capsys.readouterr().err
    assert code == entrypoint.EXIT_REFUSED
    assert "refusing to serve" in err
    assert "echo/1/model.py" in err and "echo/config.pbtxt" in err
    assert "exec" not in capsys.readouterr().out


def test_clean_repository_gives_the_tritonserver_command(
    repo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, port in (("GRPC", 9101), ("HTTP", 9100), ("METRICS", 9102)):
        monkeypatch.setenv(f"BIRDGEN_{name}_PORT", str(port))
    monkeypatch.setenv("BIRDGEN_MODEL_REPOSITORY", str(repo))
    monkeypatch.setenv("BIRDGEN_TRITON_ARGS", "--log-verbose=1 --pinned-memory-pool-byte-size=0")
    assert main(["entrypoint", "--dry-run"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[entrypoint] exec "))
    cmd = line.removeprefix("[entrypoint] exec ").split()
    assert cmd[0] == "tritonserver"
    for flag in (
        f"--model-repository={repo.resolve()}",
        "--grpc-port=9101",
        "--http-port=9100",
        "--metrics-port=9102",
        "--model-control-mode=explicit",
        "--load-model=echo",
        "--exit-on-error=true",
        "--strict-readiness=true",
        f"--cache-config=local,size={256 * 2**20}",
        "--log-verbose=1",
        "--pinned-memory-pool-byte-size=0",
    ):
        assert flag in cmd
    assert not any(arg.startswith("--backend-directory") for arg in cmd)  # the image's own backends


def test_command_loads_entries_and_base_stages_only() -> None:
    cmd = tritonserver_command(Path("/r"), ["bird_image", "unet"], cache_size_bytes=0, grpc_port=1)
    assert [a for a in cmd if a.startswith("--load-model")] == [
        "--load-model=bird_image",
        "--load-model=unet",
    ]
    assert not any(a.startswith("--cache-config") for a in cmd)


def test_export_decisions(repo: Path, tmp_path: Path) -> None:
    exporter = FakeExporter(repo)
    model_dir = tmp_path / "sdxl-turbo"
    fresh = tmp_path / "fresh"

    # No export yet: exported (nothing to force), the GPUs recorded, then verified and served.
    assert prepare(fresh, model_dir=model_dir, engine="torch", gpus=["H100 (sm_90)"], exporter=exporter) == [
        "echo"
    ]
    assert exporter.calls[-1]["engine"] == "torch" and exporter.calls[-1]["force"] is False
    assert json.loads((fresh / TARGET_FILE).read_text())["gpus"] == ["H100 (sm_90)"]

    # Up to date for this engine and these GPUs: no export.
    prepare(fresh, model_dir=model_dir, engine="torch", gpus=["H100 (sm_90)"], exporter=exporter)
    assert len(exporter.calls) == 1

    # Another GPU: the export is forced (stage keys do not cover the GPU; plans are GPU-specific).
    reasons, force = export_reasons(fresh, "torch", ["L4 (sm_89)"])
    assert force and "L4 (sm_89)" in reasons[0]
    prepare(fresh, model_dir=model_dir, engine="torch", gpus=["L4 (sm_89)"], exporter=exporter)
    assert exporter.calls[-1]["force"] is True

    # Another engine kind: exported (its stage keys differ), not forced.
    prepare(fresh, model_dir=model_dir, engine="onnxruntime", gpus=["L4 (sm_89)"], exporter=exporter)
    assert exporter.calls[-1]["engine"] == "onnxruntime" and exporter.calls[-1]["force"] is False

    # --export never / no model folder: serve what is there; always: export even when up to date.
    prepare(fresh, model_dir=model_dir, engine="torch", gpus=[], export="never", exporter=exporter)
    prepare(fresh, model_dir=None, engine="torch", gpus=[], exporter=exporter)
    assert len(exporter.calls) == 3
    prepare(
        fresh,
        model_dir=model_dir,
        engine="onnxruntime",
        gpus=["L4 (sm_89)"],
        export="always",
        exporter=exporter,
    )
    assert len(exporter.calls) == 4 and exporter.calls[-1]["force"] is True


def test_unknown_gpus_force_the_export_and_a_failed_export_claims_none(repo: Path, tmp_path: Path) -> None:
    """A repository from a plain `birdgen export` (no record of its GPUs) is rebuilt, forced; a failed
    export removes the record, so the next start exports again instead of serving stale engines."""
    (repo / TARGET_FILE).unlink()
    assert export_reasons(repo, "onnxruntime", [])[1] is True

    def failing(**kwargs: Any) -> dict[str, Any]:
        raise RuntimeError("out of GPU memory")

    (repo / TARGET_FILE).write_text(json.dumps({"engine": "onnxruntime", "gpus": ["A10 (sm_86)"]}))
    with pytest.raises(RuntimeError, match="out of GPU memory"):
        prepare(repo, model_dir=tmp_path, engine="onnxruntime", gpus=["L4 (sm_89)"], exporter=failing)
    assert not (repo / TARGET_FILE).exists()
    assert export_reasons(repo, "onnxruntime", ["L4 (sm_89)"]) == (
        [f"it has no {TARGET_FILE} (which GPUs it was exported for is unknown)"],
        True,
    )


def test_the_gpu_record_is_outside_the_manifest(repo: Path) -> None:
    """Rewritten after every export the entrypoint runs, so the checksums must not cover it."""
    assert TARGET_FILE not in repository_files(repo) and MANIFEST not in repository_files(repo)
    (repo / TARGET_FILE).write_text("{}")
    assert prepare(repo, model_dir=None, engine="onnxruntime", gpus=[]) == ["echo"]


def test_nothing_to_serve_without_manifest_or_model_folder(tmp_path: Path) -> None:
    with pytest.raises(RepositoryRefused, match=r"nothing to serve.*BIRDGEN_MODEL_DIR"):
        prepare(tmp_path / "empty", model_dir=None, engine="torch", gpus=[])


def test_export_only_verifies_and_exits(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exporter = FakeExporter(repo)
    monkeypatch.setattr(entrypoint, "_export", exporter)
    out = repo.parent / "exported"
    argv = ["entrypoint", "--model-repository", str(out), "--model-dir", str(repo), "--export-only"]
    assert main([*argv, "--engine", "torch"]) == 0
    assert [c["engine"] for c in exporter.calls] == ["torch"]


@pytest.mark.triton
@pytest.mark.skipif(importlib.util.find_spec("pytriton") is None, reason="no pip tritonserver")
def test_execs_tritonserver_which_serves_the_repository(repo: Path) -> None:
    """The real exec: the entrypoint's process becomes tritonserver (same pid), ready on its ports."""
    from birdgen.process_group import live_group_members
    from birdgen.triton_install import server_environment, triton_install

    install = triton_install()
    ports = {name: free_port() for name in ("grpc", "http", "metrics")}
    cmd = [sys.executable, "-m", "birdgen.cli", "entrypoint", "--model-repository", str(repo)]
    cmd += [f"--{name}-port={port}" for name, port in ports.items()]
    cmd += [f"--tritonserver={install.binary}", f"--backend-directory={install.backend_dir}"]
    cmd += [f"--triton-args=--cache-directory={install.cache_dir}"]
    env = {
        k: v for k, v in server_environment().items() if not k.startswith("BIRDGEN_") or k == "BIRDGEN_SITE"
    }
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                url = f"http://127.0.0.1:{ports['http']}/v2/health/ready"
                with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "tritonserver was not ready after 60 s"
            time.sleep(0.2)
        assert Path(f"/proc/{proc.pid}/exe").resolve().name == "tritonserver"  # exec'd, not a child
    finally:
        os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in live_group_members(proc.pid):
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0


def test_the_admin_key_locks_admin_protocols_and_is_never_printed(
    repo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BIRDGEN_MODEL_REPOSITORY", str(repo))
    monkeypatch.setenv("BIRDGEN_ADMIN_KEY", "s3cret-admin-key")
    assert main(["entrypoint", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "s3cret-admin-key" not in out
    restricted = "model-repository,model-config,shared-memory,trace,logging:birdgen-admin-key=***"
    assert f"--grpc-restricted-protocol={restricted}" in out and f"--http-restricted-api={restricted}" in out
