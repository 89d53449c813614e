"""Ed25519 signatures of manifest.json: made where a repository is exported, checked where it is served.

Why: the manifest's SHA-256 checksums catch an engine that changed, but whoever can change an engine
can usually rewrite manifest.json too. A signature made with a private key that never reaches the
servers, checked with the public key on the servers, ties the checksums to whoever exported.

Keys are files given by path (``BIRDGEN_SIGNING_KEY``, ``BIRDGEN_MANIFEST_PUBLIC_KEY``, or
``--signing-key FILE``), never the key itself on a command line. Core and light: ``cryptography`` is
imported only when a key is used (the torch-free client imports the core).
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Any

from birdgen.contracts import PUBLIC_KEY, SIGNING_KEY

SIGNING_KEY_ENV = "BIRDGEN_SIGNING_KEY"  # path of the private key PEM, where exports are signed
PUBLIC_KEY_ENV = "BIRDGEN_MANIFEST_PUBLIC_KEY"  # path of the public key PEM: only signed exports serve


class SignatureError(ValueError):
    """A key cannot be used, or a signature does not verify; the message says which and why."""


def signing_key_from_env() -> Path | None:
    value = os.environ.get(SIGNING_KEY_ENV)
    return Path(value) if value else None


def public_key_from_env() -> Path | None:
    value = os.environ.get(PUBLIC_KEY_ENV)
    return Path(value) if value else None


def generate_keys(out: Path) -> tuple[Path, Path]:
    """A new key pair in `out`: the private key (mode 0600) and the public key (0644), PEM.

    Refuses to overwrite either file: a replaced private key would silently invalidate every
    signature the servers' public key was meant to check.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out = Path(out)
    private_path, public_path = out / SIGNING_KEY, out / PUBLIC_KEY
    for path in (private_path, public_path):
        if path.exists():
            raise FileExistsError(f"{path} exists; move it away or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(private_path, private, 0o600)
    _write_new(public_path, public, 0o644)
    return private_path, public_path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Created with its final mode (never readable by others, not even for a moment)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have taken bits away from the public key
        os.write(fd, data)
    finally:
        os.close(fd)


def _load_key(path: Path, private: bool) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    path = Path(path)
    kind = "private" if private else "public"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SignatureError(f"cannot read the {kind} key {path}: {exc.strerror or exc}") from None
    try:
        if private:
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{path} is not an unencrypted PEM {kind} key ({exc})") from None
    wanted = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, wanted):
        raise SignatureError(f"{path} is not an Ed25519 {kind} key (birdgen keygen makes one)")
    return key


def check_private_key(path: Path) -> None:
    """Raise SignatureError unless `path` is a usable signing key (checked before a long export)."""
    _load_key(path, private=True)


def sign(data: bytes, private_key: Path) -> bytes:
    """The signature file's content for `data`: base64 of the 64-byte Ed25519 signature, one line."""
    signature = _load_key(private_key, private=True).sign(data)
    return base64.b64encode(signature) + b"\n"


def verify(data: bytes, signature: bytes, public_key: Path) -> None:
    """Raise SignatureError unless `signature` (as `sign` writes it) signs `data` for `public_key`."""
    from cryptography.exceptions import InvalidSignature

    key = _load_key(public_key, private=False)
    try:
        raw = base64.b64decode(signature.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("the signature file is not base64") from None
    try:
        key.verify(raw, data)
    except InvalidSignature:
        raise SignatureError(
            f"not signed by {public_key}'s key (changed after signing, or signed with another key)"
        ) from None
