"""Locate the ``tritonserver`` of the ``nvidia-pytriton`` wheel and make it runnable without NGC's image.

Why: the wheel ships the binary but not a usable python-backend directory, and its stub embeds the
*system* libpython. This module assembles the pieces: a backend directory of our own, ``LD_LIBRARY_PATH``
for the bundled libraries, and ``BIRDGEN_SITE`` so each ``model.py`` can reach the venv (see
``MODEL_BOOTSTRAP``). Starting and stopping the server is ``birdgen.server``'s job.

Kept import-cheap on purpose (stdlib only, no torch, no tritonclient): the CLI imports it eagerly.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import site
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = [
    "MODEL_BOOTSTRAP",
    "TritonInstall",
    "TritonServerError",
    "check_stub_libraries",
    "server_environment",
    "triton_install",
]

# Paste at the very top of every model.py, before any non-stdlib import. The stub runs the system
# libpython and ignores PYTHONPATH; site.addsitedir (unlike a bare sys.path insert) also runs the venv's
# .pth files, which is what installs the editable-birdgen finder. The venv then goes first on sys.path.
MODEL_BOOTSTRAP = """\
import os
import site
import sys


def _use_birdgen_site() -> None:
    before = list(sys.path)
    for path in filter(None, os.environ.get("BIRDGEN_SITE", "").split(os.pathsep)):
        site.addsitedir(path)
    sys.path[:] = [p for p in sys.path if p not in before] + before  # venv first


_use_birdgen_site()
"""

_PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
_STUB = "triton_python_backend_stub"


class TritonServerError(RuntimeError):
    """Triton could not be located, started, or became unhealthy; the message carries the log tail."""


@dataclasses.dataclass(frozen=True)
class TritonInstall:
    """Where the pieces of the pip-installed Triton live (``backend_dir`` is our own, not the wheel's)."""

    binary: Path
    backend_dir: Path
    cache_dir: Path
    lib_dir: Path
    stub: Path
    version: str


@functools.cache
def triton_install() -> TritonInstall:
    """Locate Triton inside the installed ``pytriton`` package (without importing it: that is slow)."""
    import importlib.metadata  # lazily: keeps `import birdgen.triton_install` cheap
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError(
            "tritonserver not found: install the model extras (pip install -e '.[models]', "
            "which brings nvidia-pytriton)"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    dist = root / "tritonserver"
    version = importlib.metadata.version("nvidia-pytriton")
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub_src = dist / "python_backend_stubs" / py / _STUB
    binary = dist / "bin" / "tritonserver"
    for needed in (binary, stub_src, *(dist / "backends" / "python" / f for f in _PYTHON_BACKEND_FILES)):
        if not needed.is_file():
            raise TritonServerError(f"nvidia-pytriton {version} is incomplete: {needed} is missing")
    backend_dir = _prepare_backend_dir(dist, stub_src, f"{version}-py{py}")
    return TritonInstall(
        binary=binary,
        backend_dir=backend_dir,
        cache_dir=dist / "caches",
        lib_dir=root.parent / "nvidia_pytriton.libs",
        stub=backend_dir / "python" / _STUB,
        version=version,
    )


def _prepare_backend_dir(dist: Path, stub_src: Path, key: str) -> Path:
    """Build ``<cache>/triton-backends/<key>/python/`` = the wheel's python backend + our interpreter's stub.

    Why: the wheel's ``backends/python`` lacks the stub, and site-packages must stay untouched. Files are
    copied (not symlinked) because the backend chmods the stub; the directory is published atomically so
    concurrent test processes never see a half-built one.
    """
    sources = {f: dist / "backends" / "python" / f for f in _PYTHON_BACKEND_FILES} | {_STUB: stub_src}
    for base in (_cache_home() / "triton-backends", Path(tempfile.gettempdir()) / "birdgen-triton-backends"):
        target = base / key
        if _backend_dir_current(target / "python", sources):
            return target
        try:
            base.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=base))
            (staging / "python").mkdir()
            for name, src in sources.items():
                shutil.copy2(src, staging / "python" / name)
            (staging / "python" / _STUB).chmod(0o755)
            if target.exists():  # stale (the wheel changed): move it aside, then replace
                stale = Path(tempfile.mkdtemp(prefix=f".{key}-stale-", dir=base))
                target.rename(stale / "old")
                shutil.rmtree(stale, ignore_errors=True)
            try:
                staging.rename(target)
            except OSError:  # another process published it first
                shutil.rmtree(staging, ignore_errors=True)
            if _backend_dir_current(target / "python", sources):
                return target
        except OSError:
            continue  # e.g. read-only cache home: fall back to the temp dir
    raise TritonServerError(f"could not build a python-backend directory for Triton ({key})")


def _backend_dir_current(python_dir: Path, sources: dict[str, Path]) -> bool:
    try:
        return all((python_dir / n).stat().st_size == src.stat().st_size for n, src in sources.items())
    except OSError:
        return False


def _cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "birdgen"


@functools.cache
def check_stub_libraries(install: TritonInstall) -> None:
    """Fail early, with the fix, when the stub's embedded libpython is not installed on the system."""
    ldd = shutil.which("ldd")
    if ldd is None:
        return
    env = {**os.environ, "LD_LIBRARY_PATH": _ld_library_path(install)}
    out = subprocess.run([ldd, str(install.stub)], capture_output=True, text=True, env=env, check=False)
    missing = [line.split()[0] for line in out.stdout.splitlines() if "not found" in line]
    if not missing:
        return
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    hint = (
        f" The python-backend stub embeds the system Python {py}: install it with "
        f"`apt-get install libpython{py}` (Debian/Ubuntu), and keep the venv on Python {py}."
        if any(m.startswith("libpython") for m in missing)
        else ""
    )
    raise TritonServerError(f"{install.stub} cannot run: missing {', '.join(missing)}.{hint}")


def _ld_library_path(install: TritonInstall) -> str:
    return os.pathsep.join(filter(None, [str(install.lib_dir), os.environ.get("LD_LIBRARY_PATH", "")]))


def server_environment() -> dict[str, str]:
    """The environment for tritonserver: ours plus its bundled libraries and ``BIRDGEN_SITE`` (the venv)."""
    install = triton_install()
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = _ld_library_path(install)
    env["BIRDGEN_SITE"] = os.pathsep.join(site.getsitepackages())
    return env
