"""The service's Ed25519 signing key: loading it, making it on first start, and reading public keys back.

The key signs ledger checkpoints (``ledger/checkpoint.py``). It is either the PEM file named by
``JOBLEDGER_SIGNING_KEY`` or ``signing-key.pem`` in the data folder, made on first start. Making it must be
safe when several service processes start at once: each writes a complete key to a private temporary file
and then hard-links it into place, which fails if the name already exists, so exactly one key wins and every
process loads that one.

Public keys are read with ``parse_public_key``, which auditors' tools use too, so it depends on nothing but
``cryptography``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ledger.config import Settings

KEY_FILE_NAME: Final = "signing-key.pem"
KEY_ID_HEX_LENGTH: Final = 16
PUBLIC_KEY_BYTES: Final = 32
_log = logging.getLogger("jobledger.signing")


class SigningKeyError(Exception):
    """The signing key cannot be loaded or made (missing, unreadable, not Ed25519, ...)."""


def key_id(public_raw: bytes) -> str:
    """The key id: the first 16 hex digits of SHA-256 over the 32-byte raw public key."""
    return hashlib.sha256(public_raw).hexdigest()[:KEY_ID_HEX_LENGTH]


def raw_public_key(public_key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of an Ed25519 public key."""
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 private key with its key id; ``path`` is the file it came from."""

    private_key: Ed25519PrivateKey
    path: Path

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The matching public key."""
        return self.private_key.public_key()

    @property
    def public_raw(self) -> bytes:
        """The 32 raw bytes of the public key."""
        return raw_public_key(self.public_key)

    @property
    def key_id(self) -> str:
        """See ``key_id``."""
        return key_id(self.public_raw)

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message``."""
        return self.private_key.sign(message)

    def public_key_document(self) -> dict[str, str]:
        """What ``GET ledger/public_key`` returns: the key id and the key as raw base64 and as PEM."""
        pem = self.public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        return {
            "algorithm": "Ed25519",
            "key_id": self.key_id,
            "public_key": base64.b64encode(self.public_raw).decode("ascii"),
            "pem": pem.decode("ascii"),
        }


def load_signing_key(path: Path) -> SigningKey:
    """Load an unencrypted PEM (PKCS#8) Ed25519 private key; ``SigningKeyError`` if it is not one."""
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as exc:
        raise SigningKeyError(f"cannot read the signing key {path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        # Not refused: mounted secrets are often 0644 inside a private container. But it deserves a word.
        _log.warning("the signing key %s is accessible to other users (mode %o)", path, stat.S_IMODE(mode))
    try:
        private_key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SigningKeyError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(private_key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} holds a {type(private_key).__name__}, not an Ed25519 key")
    return SigningKey(private_key=private_key, path=path)


def create_key_file(path: Path) -> None:
    """Make a new key at ``path`` unless one is already there; either way ``path`` then holds a complete key.

    The key is written (mode 0600) and synced under a temporary name first and then hard-linked into place:
    ``link`` fails when the name exists, so of several processes racing here exactly one key is installed,
    and no process can ever read a partly written file.
    """
    folder = path.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return  # another process won the race; its key is the key
        _fsync_folder(folder)
    finally:
        os.unlink(temporary)


def _fsync_folder(folder: Path) -> None:
    """Make the new directory entry durable, so a crash cannot lose a key that has already signed things."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_or_create_signing_key(settings: Settings) -> SigningKey:
    """The service's signing key: ``settings.signing_key_path`` if configured, else the data folder's key.

    A configured key must exist (a typo must not silently produce a new identity); the data folder's key is
    made on first use.
    """
    if settings.signing_key_path is not None:
        return load_signing_key(settings.signing_key_path)
    path = settings.data_dir / KEY_FILE_NAME
    if not path.exists():
        try:
            create_key_file(path)
        except OSError as exc:
            raise SigningKeyError(f"cannot create the signing key {path}: {exc.strerror or exc}") from None
        _log.info("created signing key %s", path)
    return load_signing_key(path)


def parse_public_key(text: str) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM, from base64 of its 32 raw bytes, or from ``GET ledger/public_key``'s JSON.

    Raises ``ValueError`` for anything else.
    """
    text = text.strip()
    if text.startswith("{"):
        document = json.loads(text)
        if not isinstance(document, dict) or not isinstance(document.get("public_key"), str):
            raise ValueError("a JSON public key document needs a public_key string")
        text = document["public_key"].strip()
    if text.startswith("-----BEGIN"):
        try:
            loaded = serialization.load_pem_public_key(text.encode("ascii"))
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise ValueError(f"not a PEM public key: {exc}") from None
        if not isinstance(loaded, Ed25519PublicKey):
            raise ValueError(f"the PEM key is a {type(loaded).__name__}, not Ed25519")
        return loaded
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a public key must be PEM or base64 of 32 raw bytes") from None
    if len(raw) != PUBLIC_KEY_BYTES:
        raise ValueError(f"an Ed25519 public key has {PUBLIC_KEY_BYTES} bytes, not {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


__all__ = [
    "KEY_FILE_NAME",
    "SigningKey",
    "SigningKeyError",
    "create_key_file",
    "key_id",
    "load_or_create_signing_key",
    "load_signing_key",
    "parse_public_key",
    "raw_public_key",
]
