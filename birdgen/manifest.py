"""An exported repository's manifest: the SHA-256 of every file, and what a server loads at start.

Core (no torch): the exporter writes the manifest; the entrypoint, the CLI, the benchmark harness and
the TensorRT plan cache read and check it without importing the export code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from birdgen.contracts import IMAGE_MODEL, MANIFEST, TARGET_FILE


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_hashes(root: Path, base: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``, keyed by its path relative to ``base``."""
    return {
        str(p.relative_to(base)): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def repository_files(repo: Path) -> dict[str, str]:
    """SHA-256 of every file of an exported repository, as the manifest lists them.

    Not listed: the manifest itself, and the entrypoint's record of the GPUs the export was built for
    (written after the export; birdgen/entrypoint.py).
    """
    return {k: v for k, v in tree_hashes(repo, repo).items() if k not in (MANIFEST, TARGET_FILE)}


def read_manifest(repo: Path) -> dict[str, Any]:
    """The repository's manifest; empty when nothing was exported there yet."""
    path = Path(repo) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def core_models(repository: Path) -> list[str]:
    """The models a server loads at start: the entry models and the base stages (family UNets load on use)."""
    manifest = read_manifest(repository)
    if not manifest:
        raise FileNotFoundError(
            f"{repository} has no {MANIFEST}: export a model into it first (birdgen export)"
        )
    return [*manifest.get("entries", [IMAGE_MODEL]), *manifest["stages"]]


def verify_manifest(repo: Path) -> list[str]:
    """Files whose checksum differs from the manifest (missing ones included); empty when intact."""
    manifest = read_manifest(repo)
    return [
        rel
        for rel, sha in manifest.get("files", {}).items()
        if not (Path(repo) / rel).is_file() or sha256_file(Path(repo) / rel) != sha
    ]
