"""An exported repository's manifest: the SHA-256 of every file, and what a server loads at start.

Core (no torch): the exporter writes the manifest; the entrypoint, the CLI, the benchmark harness and
the TensorRT plan cache read and check it without importing the export code; every python-backend
model checks its own files against it when Triton loads it (``verify_model``), before it reads an
engine. docs/security.md says what is checked when, and what it costs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from birdgen.contracts import (
    CONTROLLED_UNET,
    IMAGE_MODEL,
    MANIFEST,
    MANIFEST_SIGNATURE,
    SVD_STAGES,
    TARGET_FILE,
    controlnet_model,
)
from birdgen.signing import PUBLIC_KEY_ENV, SIGNING_KEY_ENV, SignatureError, verify

# Files of a repository that the manifest does not list: itself, its signature (made from it), and
# the entrypoint's record of the GPUs the export was built for (written after the export).
NOT_LISTED = (MANIFEST, MANIFEST_SIGNATURE, TARGET_FILE)


class IntegrityError(RuntimeError):
    """Files differ from the manifest, or the manifest from its signature: refuse to serve them."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(root: Path) -> Iterator[Path]:
    """Every file under ``root``, sorted, except Python's bytecode caches (``__pycache__``), which
    the python backend writes next to each model.py it imports."""
    return (p for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts)


def tree_hashes(root: Path, base: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``, keyed by its path relative to ``base``."""
    return {str(p.relative_to(base)): sha256_file(p) for p in _files(root)}


def repository_files(repo: Path) -> dict[str, str]:
    """SHA-256 of every file of an exported repository, as the manifest lists them (all but NOT_LISTED)."""
    return {k: v for k, v in tree_hashes(repo, repo).items() if k not in NOT_LISTED}


def read_manifest(repo: Path) -> dict[str, Any]:
    """The repository's manifest; empty when nothing was exported there yet."""
    path = Path(repo) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def core_models(repository: Path) -> list[str]:
    """The models a server loads at start: the entry models and the base stages. Family UNets and the
    ControlNet and SVD stages load on first use, so a server without that traffic holds no memory for them."""
    manifest = read_manifest(repository)
    if not manifest:
        raise FileNotFoundError(
            f"{repository} has no {MANIFEST}: export a model into it first (birdgen export)"
        )
    on_use = {*map(controlnet_model, manifest.get("controlnets", ())), CONTROLLED_UNET, *SVD_STAGES}
    return [
        *manifest.get("entries", [IMAGE_MODEL]),
        *(name for name in manifest["stages"] if name not in on_use),
    ]


def verify_manifest(repo: Path, manifest: dict[str, Any] | None = None) -> list[str]:
    """Files that differ from the manifest (missing ones included), then files it does not list;
    empty when intact. Every listed file is hashed: the whole repository is read once.

    `manifest`: the one already read (and its signature verified), so it is not read again.
    """
    repo = Path(repo)
    listed = (read_manifest(repo) if manifest is None else manifest).get("files", {})
    bad = [rel for rel, sha in listed.items() if not (repo / rel).is_file() or sha256_file(repo / rel) != sha]
    present = {str(p.relative_to(repo)) for p in _files(repo)}
    return bad + sorted(present - set(listed) - set(NOT_LISTED))


def read_signed_manifest(repo: Path, public_key: Path | None) -> dict[str, Any]:
    """The manifest; with `public_key`, only once its signature verifies.

    The bytes verified are the bytes parsed (read once), so the manifest cannot change in between.
    """
    path = Path(repo) / MANIFEST
    if not path.is_file():
        raise IntegrityError(f"{repo} has no {MANIFEST}")
    data = path.read_bytes()
    if public_key is not None:
        signature = Path(repo) / MANIFEST_SIGNATURE
        if not signature.is_file():
            raise IntegrityError(
                f"{MANIFEST} is not signed ({MANIFEST_SIGNATURE} is missing) and {PUBLIC_KEY_ENV} is set, "
                f"so only signed exports are served: export with --signing-key or {SIGNING_KEY_ENV}"
            )
        try:
            verify(data, signature.read_bytes(), public_key)
        except SignatureError as exc:
            raise IntegrityError(f"{MANIFEST}'s signature does not verify: {exc}") from None
    manifest: dict[str, Any] = json.loads(data)
    return manifest


def model_files(manifest: dict[str, Any], model: str, version: str | int) -> dict[str, str]:
    """What the manifest lists for one Triton model version: its config.pbtxt and its version folder."""
    prefix, config = f"{model}/{version}/", f"{model}/config.pbtxt"
    return {
        rel: sha for rel, sha in manifest.get("files", {}).items() if rel.startswith(prefix) or rel == config
    }


def model_problems(repo: Path, manifest: dict[str, Any], model: str, version: str | int) -> list[str]:
    """Why one model version must not load: files that differ from the manifest or are missing, and
    files in its version folder that the manifest does not list (added after the export). Empty when
    intact. Each listed file is hashed once: seconds for a real SDXL UNet (5 GB at ~0.5-2 GB/s)."""
    repo = Path(repo)
    listed = model_files(manifest, model, version)
    problems = []
    for rel, expected in sorted(listed.items()):
        if not (repo / rel).is_file():
            problems.append(f"{rel} is missing (manifest sha256 {expected[:12]})")
            continue
        actual = sha256_file(repo / rel)
        if actual != expected:
            problems.append(f"{rel} has sha256 {actual[:12]}, {MANIFEST} says {expected[:12]}")
    present = {str(p.relative_to(repo)) for p in _files(repo / model / str(version))}
    problems += [f"{rel} is not listed in {MANIFEST}" for rel in sorted(present - set(listed))]
    return problems


def verify_model(repo: Path, model: str, version: str | int, public_key: Path | None) -> dict[str, Any]:
    """The manifest, once `model` version `version` matches it (and, with `public_key`, the manifest
    is signed). Otherwise IntegrityError with one line naming the model, each file and both
    checksums: Triton reports the load as failed with that line in its log.

    Why per model, at load: family UNets (and roll-outs) load long after the entrypoint checked the
    whole repository at start, and `birdgen serve` has no start check at all.
    """
    refused = f"birdgen: refusing to load {model} version {version}"
    try:
        manifest = read_signed_manifest(repo, public_key)
    except (IntegrityError, ValueError) as exc:  # ValueError: a manifest that is not JSON
        raise IntegrityError(f"{refused}: {exc}") from None
    problems = model_problems(repo, manifest, model, version)
    if problems:
        raise IntegrityError(f"{refused}: {'; '.join(problems)}")
    return manifest
