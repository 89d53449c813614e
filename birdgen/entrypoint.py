"""`birdgen entrypoint`: what the server image runs (docker/Dockerfile.server, docs/docker.md).

Three steps, in order, each refusing loudly rather than serving something wrong:

1. Export when the repository has no up-to-date export for this engine kind and this machine's GPUs
   (engines such as TensorRT plans are GPU-specific, so they are built where they run and never
   shipped). The GPUs an export was built for are recorded in ``export_target.json`` (outside the
   manifest); when they differ or are unknown the export is forced, because stage keys cover code,
   settings and library versions, not the GPU.
2. Verify: Python bytecode caches in the repository are removed (a planted .pyc would run instead of
   a checked model.py); with ``BIRDGEN_MANIFEST_PUBLIC_KEY`` set, ``manifest.json`` must carry a
   signature that key verifies (``manifest.json.sig``); then ``verify_manifest``: any file whose
   SHA-256 differs from the manifest, is missing, or is not listed in it stops the start with the
   files named. (Each model checks its own files again when Triton loads it:
   ``birdgen.manifest.verify_model``.)
3. ``exec`` tritonserver with explicit model control, loading the entry models and base stages
   (family UNets load on first use), ports from ``BIRDGEN_*_PORT``.

Kept import-cheap (stdlib only until an export runs): the CLI builds its parser eagerly.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from birdgen.contracts import MANIFEST, TARGET_FILE
from birdgen.manifest import IntegrityError, core_models, read_manifest, read_signed_manifest, verify_manifest
from birdgen.server import admin_key_from_env, serving_flags
from birdgen.signing import PUBLIC_KEY_ENV, public_key_from_env, signing_key_from_env

__all__ = [
    "TARGET_FILE",
    "RepositoryRefused",
    "add_arguments",
    "export_reasons",
    "gpu_identity",
    "prepare",
    "run",
    "tritonserver_command",
]

EXIT_REFUSED = 3  # distinct from the CLI's 2 (usage / fixable input), so an orchestrator can tell them apart


class RepositoryRefused(RuntimeError):
    """The repository must not be served: checksums differ from the manifest, or there is nothing to serve."""


def gpu_identity() -> list[str]:
    """This machine's GPUs as ``"<name> (sm_<major><minor>)"``, one per GPU; empty without any.

    ``nvidia-smi`` (mounted by the NVIDIA container toolkit with ``--gpus``) rather than torch: no CUDA
    context, and the entrypoint stays light when no export is needed.
    """
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.splitlines():
        name, _, cap = line.rpartition(",")
        if name.strip():
            gpus.append(f"{name.strip()} (sm_{cap.strip().replace('.', '')})")
    return gpus


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def export_reasons(repository: Path, engine: str, gpus: Sequence[str]) -> tuple[list[str], bool]:
    """Why ``repository`` needs an export for ``engine`` on ``gpus`` (empty: it is up to date), and
    whether the export must be forced (the GPUs changed: same stage keys, different hardware)."""
    manifest = read_manifest(repository)
    if not manifest:
        return [f"{repository} has no {MANIFEST}"], False
    reasons, force = [], False
    if manifest.get("engine") != engine:
        reasons.append(f"it was exported with engine {manifest.get('engine')!r}, not {engine!r}")
    target = _read_json(repository / TARGET_FILE)
    if not target:
        # Unknown hardware: forced, since GPU-specific engines (TensorRT plans) would pass the key check.
        reasons.append(f"it has no {TARGET_FILE} (which GPUs it was exported for is unknown)")
        force = True
    elif target.get("gpus") != list(gpus):
        reasons.append(f"it was exported for GPUs {target.get('gpus')}, this machine has {list(gpus)}")
        force = True
    return reasons, force


def _write_target(repository: Path, engine: str, gpus: Sequence[str]) -> None:
    path = repository / TARGET_FILE
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps({"engine": engine, "gpus": list(gpus)}, indent=2) + "\n")
    temporary.replace(path)


def _export(**kwargs: Any) -> dict[str, Any]:
    from birdgen.export.exporter import export_repository  # torch and friends: only when exporting

    return export_repository(**kwargs)


def prepare(
    repository: Path,
    *,
    model_dir: Path | None,
    engine: str,
    device: str | None = None,
    export: str = "auto",
    gpus: Sequence[str] | None = None,
    exporter: Callable[..., dict[str, Any]] | None = None,
    progress: Callable[[str], None] = print,
    signing_key: Path | None = None,
    public_key: Path | None = None,
) -> list[str]:
    """Steps 1 and 2: export if needed (``export``: auto, always or never; signed with
    ``signing_key``), then verify the manifest's signature (with ``public_key``) and every checksum.

    Returns the models to load at start. Raises ``RepositoryRefused`` naming what is wrong.
    """
    repository = Path(repository)
    gpus = gpu_identity() if gpus is None else list(gpus)
    reasons, force = export_reasons(repository, engine, gpus)
    if export == "always":
        reasons, force = reasons or ["--export always"], True
    if export == "never":
        reasons = []
    if reasons and model_dir is None:
        if not (repository / MANIFEST).is_file():
            raise RepositoryRefused(
                f"nothing to serve: {repository} has no {MANIFEST} and no model folder was given to "
                "export from (mount one and set BIRDGEN_MODEL_DIR / --model-dir)"
            )
        progress(f"[entrypoint] not exporting (no model folder given) although {'; '.join(reasons)}")
    elif reasons:
        why = "; ".join(reasons)
        progress(f"[entrypoint] exporting {model_dir} ({engine}, GPUs {gpus or 'none'}): {why}")
        # Removed first: an export that fails half-way leaves no claim that it matches these GPUs.
        (repository / TARGET_FILE).unlink(missing_ok=True)
        (exporter or _export)(
            model_dir=Path(model_dir),
            out=repository,
            engine=engine,
            device=device,
            force=force,
            progress=lambda message: progress(f"[entrypoint] export: {message}"),
            signing_key=signing_key,
        )
        _write_target(repository, engine, gpus)
    else:
        progress(f"[entrypoint] {repository}: export up to date for {engine} on GPUs {gpus or 'none'}")
    _remove_bytecode(repository, progress)
    manifest = None
    if public_key is not None:
        try:
            manifest = read_signed_manifest(repository, public_key)
        except IntegrityError as exc:
            raise RepositoryRefused(
                f"refusing to serve {repository}: {exc}\nRe-export with the signing key whose public key "
                f"{PUBLIC_KEY_ENV} names ({public_key}), or unset it to serve unsigned exports."
            ) from None
        progress(f"[entrypoint] {repository}: {MANIFEST}'s signature verifies with {public_key}")
    bad = verify_manifest(repository, manifest)  # the checksums of the very manifest verified above
    if bad:
        listed = "\n".join(f"  {name}" for name in bad)
        raise RepositoryRefused(
            f"refusing to serve {repository}: {len(bad)} file(s) differ from the SHA-256 checksums in "
            f"{MANIFEST} (changed, missing, or not listed in it):\n{listed}\n"
            "Re-export the repository (birdgen export / birdgen entrypoint --export always) or restore "
            "those files."
        )
    models = core_models(repository)
    progress(f"[entrypoint] {repository}: all checksums match; loading {', '.join(models)}")
    return models


def _remove_bytecode(repository: Path, progress: Callable[[str], None]) -> None:
    """Remove Python's bytecode caches from the repository, or refuse where they cannot be removed.

    Why: Python runs ``__pycache__/model.*.pyc`` instead of the model.py beside it when the .pyc's
    header matches the source's size and time, so a planted .pyc would pass every checksum (caches
    are not in the manifest). The server image writes none (PYTHONDONTWRITEBYTECODE); `birdgen serve`
    leaves them behind.
    """
    caches = sorted(p for p in repository.rglob("__pycache__") if p.is_dir())
    for cache in caches:
        try:
            shutil.rmtree(cache)
        except OSError as exc:
            raise RepositoryRefused(
                f"refusing to serve {repository}: {cache} holds Python bytecode, which would run instead "
                f"of the checked model.py, and cannot be removed ({exc.strerror or exc}); remove it "
                "where the repository is written"
            ) from None
    if caches:
        progress(f"[entrypoint] removed {len(caches)} Python bytecode cache(s) from {repository}")


def tritonserver_command(
    repository: Path,
    load_models: Sequence[str],
    *,
    tritonserver: str = "tritonserver",
    grpc_port: int = 8001,
    http_port: int = 8000,
    metrics_port: int = 8002,
    cache_size_bytes: int = 256 * 2**20,
    backend_directory: Path | None = None,
    admin_key: str | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """Step 3's command line: the same flags as ``birdgen serve`` (birdgen.server.serving_flags), with
    the image's own tritonserver and backends (no ``--backend-directory`` unless given)."""
    cmd = [
        tritonserver,
        *serving_flags(
            repository,
            grpc_port=grpc_port,
            http_port=http_port,
            metrics_port=metrics_port,
            model_control="explicit",
            load_models=load_models,
            cache_size_bytes=cache_size_bytes,
            admin_key=admin_key,
        ),
    ]
    if backend_directory is not None:
        cmd.append(f"--backend-directory={backend_directory}")
    return [*cmd, *extra_args]


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"BIRDGEN_{name}") or default


def add_arguments(parser: argparse.ArgumentParser, engine_kinds: Sequence[str]) -> None:
    """Every flag defaults to a ``BIRDGEN_*`` environment variable, so the image is configured with -e.

    Secrets and keys have no flag (a command line is visible to whoever lists processes): the epilog
    names the variables read from the environment only.
    """
    parser.epilog = (
        "From the environment only: [BIRDGEN_ADMIN_KEY] locks Triton's admin protocols behind this key; "
        f"[{PUBLIC_KEY_ENV}] path of an Ed25519 public key PEM: serve only exports whose {MANIFEST} it "
        "verifies; [BIRDGEN_SIGNING_KEY] path of the private key PEM an export made here is signed with "
        "(docs/security.md)."
    )
    model_dir = _env("MODEL_DIR")
    parser.add_argument(
        "--model-repository",
        type=Path,
        default=Path(_env("MODEL_REPOSITORY", "outputs/model_repository") or ""),
        help="the repository to serve (and export into) [BIRDGEN_MODEL_REPOSITORY]",
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=Path(model_dir) if model_dir else None,
        help="diffusers SDXL folder to export from when needed [BIRDGEN_MODEL_DIR]",
    )
    parser.add_argument(
        "--engine",
        default=_env("ENGINE", "onnxruntime"),
        choices=engine_kinds,
        help="engine kind [BIRDGEN_ENGINE]",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default=_env("DEVICE"), help="stage hosting [BIRDGEN_DEVICE]"
    )
    parser.add_argument(
        "--export",
        choices=("auto", "always", "never"),
        default=_env("EXPORT", "auto"),
        help="auto: only when out of date for this engine and these GPUs [BIRDGEN_EXPORT]",
    )
    parser.add_argument(
        "--export-only", action="store_true", help="export and verify, then exit 0 (the export job)"
    )
    for name, default in (("grpc", 8001), ("http", 8000), ("metrics", 8002)):
        env = f"{name.upper()}_PORT"
        port = int(_env(env, str(default)) or default)
        parser.add_argument(f"--{name}-port", type=int, default=port, help=f"[BIRDGEN_{env}]")
    parser.add_argument(
        "--cache-size-bytes",
        type=int,
        default=int(_env("CACHE_SIZE_BYTES", str(256 * 2**20)) or 0),
        help="Triton's local response cache; 0 turns it off [BIRDGEN_CACHE_SIZE_BYTES]",
    )
    parser.add_argument(
        "--tritonserver", default=_env("TRITONSERVER", "tritonserver"), help="[BIRDGEN_TRITONSERVER]"
    )
    parser.add_argument("--backend-directory", type=Path, help="default: the tritonserver build's own")
    parser.add_argument(
        "--triton-args",
        default=_env("TRITON_ARGS", ""),
        help="extra tritonserver flags, shell-quoted [BIRDGEN_TRITON_ARGS]",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the tritonserver command, do not exec")


def run(args: argparse.Namespace) -> int:
    """The CLI's handler: 0 after --export-only / --dry-run, 3 when refused; otherwise it never returns.

    BIRDGEN_ADMIN_KEY (a secret: environment only, never a flag) locks Triton's admin protocols
    behind that key (birdgen.server.serving_flags); the printed command shows it as ***.
    BIRDGEN_MANIFEST_PUBLIC_KEY reaches tritonserver through the exec'd environment, so every stage
    model checks the signature again when it loads.
    """
    admin_key = admin_key_from_env()
    try:
        models = prepare(
            args.model_repository,
            model_dir=args.model_dir,
            engine=args.engine,
            device=args.device,
            export=args.export,
            signing_key=signing_key_from_env(),
            public_key=public_key_from_env(),
        )
    except RepositoryRefused as exc:
        print(f"birdgen entrypoint: {exc}", file=sys.stderr, flush=True)
        return EXIT_REFUSED
    if args.export_only:
        return 0
    cmd = tritonserver_command(
        args.model_repository,
        models,
        tritonserver=args.tritonserver,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        cache_size_bytes=args.cache_size_bytes,
        backend_directory=args.backend_directory,
        admin_key=admin_key,
        extra_args=shlex.split(args.triton_args),
    )
    shown = shlex.join(cmd).replace(admin_key, "***") if admin_key else shlex.join(cmd)
    print(f"[entrypoint] exec {shown}", flush=True)
    if args.dry_run:
        return 0
    sys.stderr.flush()
    os.execvp(cmd[0], cmd)  # tritonserver becomes the container's main process: signals reach it
