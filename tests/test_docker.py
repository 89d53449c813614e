"""Static checks of the images (docker/): no daemon or registry is needed, so they run everywhere.

What they pin down: both images start from the same NGC tritonserver release; no version is written in
a Dockerfile (pyproject.toml is the one source, read through docker/pins.py); every folder the editable
install maps is copied and not ignored; the server's entrypoint is the tested `birdgen entrypoint`, and
the environment it sets is what that command reads; every image runs as a numeric non-root user that
owns what it writes.
"""

from __future__ import annotations

import argparse
import json
import re
import runpy
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from birdgen import entrypoint
from birdgen.cli import build_parser
from birdgen.engines import ENGINE_KINDS

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = {name: ROOT / "docker" / f"Dockerfile.{name}" for name in ("server", "export")}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
pins = runpy.run_path(str(ROOT / "docker" / "pins.py"))


def _text(name: str) -> str:
    return DOCKERFILES[name].read_text()


def _instructions(name: str, keyword: str) -> list[str]:
    """Arguments of every `keyword` instruction (continuation lines joined)."""
    joined = re.sub(r"\\\n\s*", " ", _text(name))
    return [line.split(None, 1)[1] for line in joined.splitlines() if line.startswith(keyword + " ")]


def _arg(name: str, arg: str) -> str:
    return next(a.split("=", 1)[1] for a in _instructions(name, "ARG") if a.startswith(arg + "="))


@pytest.mark.parametrize("name", DOCKERFILES)
def test_from_an_ngc_tritonserver_release(name: str) -> None:
    assert _instructions(name, "FROM") == ["nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-py3"]
    assert re.fullmatch(r"\d\d\.\d\d", _arg(name, "TRITON_VERSION"))
    # 24.12 is the first release with Python 3.12 (Ubuntu 24.04); birdgen needs 3.11 or 3.12.
    assert _arg(name, "TRITON_VERSION") >= "24.12"
    assert PYPROJECT["project"]["requires-python"] == ">=3.11,<3.13"
    assert _arg(name, "TORCH_INDEX_URL").startswith("https://download.pytorch.org/whl/cu12")


def test_both_images_share_the_base_and_torch_build() -> None:
    for arg in ("TRITON_VERSION", "TORCH_INDEX_URL"):
        assert _arg("server", arg) == _arg("export", arg)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_no_version_is_written_twice(name: str) -> None:
    assert not re.search(r"==\s*\d", _text(name)), "pins belong in pyproject.toml (docker/pins.py reads them)"
    for run in _instructions(name, "RUN"):
        for extras in re.findall(r"docker/pins\.py ([a-z ]+?) --", run):
            assert pins["requirements"](extras.split())  # the extras exist


def test_pins_expand_pyproject_extras() -> None:
    project = PYPROJECT["project"]
    optional = project["optional-dependencies"]
    serve = pins["requirements"](["serve"])
    assert serve == [*project["dependencies"], *optional["serve"]]
    assert all(re.search(r"==\d", r) for r in serve)
    models = pins["requirements"](["models"])
    assert set(models) == set(serve) | {"nvidia-pytriton==0.7.0"}  # the pip tritonserver stays out of images
    out = subprocess.run(
        [sys.executable, str(ROOT / "docker" / "pins.py"), "serve", "--only", "torch"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == [r for r in optional["serve"] if r.startswith("torch==")]
    with pytest.raises(ValueError, match="no extra 'gpu'"):
        pins["requirements"](["gpu"])


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copies_every_package_folder_and_nothing_is_ignored(name: str) -> None:
    copied = {a.split()[0] for a in _instructions(name, "COPY")}
    folders = {"birdgen", "model_repository", *PYPROJECT["tool"]["setuptools"]["package-dir"].values()}
    assert folders <= copied
    ignored = [
        ln for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")
    ]
    for path in copied:
        assert (ROOT / path).exists()
        assert not any(Path(path).match(pattern.removeprefix("**/")) for pattern in ignored), path


def test_server_entrypoint_is_the_tested_command() -> None:
    (entry,) = _instructions("server", "ENTRYPOINT")
    argv = json.loads(entry)
    assert argv == ["birdgen", "entrypoint"]
    args = build_parser().parse_args([*argv[1:], "--dry-run"])
    assert args.run.__module__ == "birdgen.entrypoint"
    # Every BIRDGEN_* variable the images set is one the entrypoint reads.
    parser = argparse.ArgumentParser()
    entrypoint.add_arguments(parser, ENGINE_KINDS)
    help_text = parser.format_help()
    for name in DOCKERFILES:
        for variable in re.findall(r"\b(BIRDGEN_[A-Z_]+)=", " ".join(_instructions(name, "ENV"))):
            assert f"[{variable}]" in help_text, variable


def test_engines_are_never_committed() -> None:
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "*.plan" in ignored


def _user_and_writes(path: Path) -> tuple[str, str]:
    """The image's final USER, and its RUN instructions joined (continuation lines too)."""
    joined = re.sub(r"\\\n\s*", " ", path.read_text())
    lines = joined.splitlines()
    users = [line.split(None, 1)[1] for line in lines if line.startswith("USER ")]
    assert users, f"{path.name} runs as root (no USER)"
    return users[-1], " ".join(line for line in lines if line.startswith("RUN "))


@pytest.mark.parametrize("path", sorted((ROOT / "docker").glob("Dockerfile.*")), ids=lambda p: p.name)
def test_every_image_runs_as_a_numeric_non_root_user(path: Path) -> None:
    """Numeric, so Kubernetes' runAsNonRoot can check it without /etc/passwd; created in the image."""
    user, runs = _user_and_writes(path)
    match = re.fullmatch(r"(\d+):(\d+)", user)
    assert match, f"{path.name}: USER {user} is not uid:gid"
    uid, gid = match.groups()
    assert int(uid) > 0 and int(gid) > 0, f"{path.name}: USER {user} is root"
    assert f"--uid {uid}" in runs and f"--gid {gid}" in runs, f"{path.name}: user {user} is never created"
    lines = path.read_text().splitlines()
    last_user = max(i for i, line in enumerate(lines) if line.startswith("USER "))
    assert not [ln for ln in lines[last_user:] if ln.startswith("RUN ")], "nothing builds as root after USER"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_server_and_export_users_own_what_they_write(name: str) -> None:
    user, runs = _user_and_writes(DOCKERFILES[name])
    env = " ".join(_instructions(name, "ENV"))
    (home,) = re.findall(r"--home-dir (\S+)", runs)
    assert f"HOME={home}" in env and "--create-home" in runs  # torch's and TensorRT's caches
    assert f"chown {user} /models/repository" in runs  # the repository path an export writes
    assert "BIRDGEN_MODEL_REPOSITORY=/models/repository" in env
    # No bytecode beside the repository's model.py files (the entrypoint removes any it finds).
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    if name == "server":  # a new named volume takes the mount point's owner: chowned before VOLUME
        text = _text(name)
        assert text.index("chown 10001:10001 /models/repository") < text.index("VOLUME ")
