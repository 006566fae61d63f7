"""Signed checkpoints: the head of the global chain (position, chain hash), signed with the service's key.

A checkpoint commits the service to every event up to its position: the chain hash at position N covers the
hash of every event at positions 1..N (``ledger.hashing.chain_hash``). An auditor who keeps a checkpoint can
later detect any change to that prefix, by the service or by anyone with write access to its database.

The signed message is fixed ASCII text, one field per line, so that nothing about JSON encoding can make two
parties disagree about what was signed (``docs/ledger-format.md``, "Global chain and checkpoints")::

    jobledger-checkpoint/v1
    <key_id>
    <position>
    <chain_hash>
    <signed_at>

Each line ends with ``\\n``. ``verify_checkpoint`` is the strict check every verifier here uses: it rejects
anything whose fields are not exactly in the documented form before it looks at the signature.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any, Final

import asyncpg
import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ledger.hashing import GENESIS_HASH
from ledger.signing import SigningKey, key_id, raw_public_key
from projections.timefmt import now_ts

MESSAGE_HEADER: Final = "jobledger-checkpoint/v1"
SIGNATURE_BYTES: Final = 64
CHECKPOINT_FIELDS: Final = frozenset({"position", "chain_hash", "signed_at", "key_id", "signature"})
# fullmatch, ASCII classes only: ``$`` would accept a trailing newline and ``\d`` non-ASCII digits, and either
# would let a field smuggle an extra line into the signed message.
HASH_PATTERN: Final = re.compile(r"[0-9a-f]{64}")
KEY_ID_PATTERN: Final = re.compile(r"[0-9a-f]{16}")
TIMESTAMP_PATTERN: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")
HEAD: Final = "SELECT position, chain_hash FROM event_positions ORDER BY position DESC LIMIT 1"


class Checkpoint(msgspec.Struct, kw_only=True, frozen=True):
    """A signed head of the global chain, as ``GET ledger/checkpoint`` returns it."""

    position: int
    chain_hash: str
    signed_at: str
    key_id: str
    signature: str  # base64 (standard alphabet, padded) of the 64-byte Ed25519 signature


class InvalidCheckpoint(ValueError):
    """A checkpoint that is malformed, made by another key, or whose signature does not verify."""


def checkpoint_message(*, key_id: str, position: int, chain_hash: str, signed_at: str) -> bytes:
    """The exact bytes a checkpoint's signature covers. Raises ``InvalidCheckpoint`` for malformed fields."""
    _check_fields(position=position, chain_hash=chain_hash, signed_at=signed_at, key_id=key_id)
    return f"{MESSAGE_HEADER}\n{key_id}\n{position}\n{chain_hash}\n{signed_at}\n".encode("ascii")


def _check_fields(*, position: Any, chain_hash: Any, signed_at: Any, key_id: Any) -> None:
    # bool is an int in Python; a JSON ``true`` must not pass for position 1.
    if type(position) is not int or position < 0:
        raise InvalidCheckpoint("position must be a non-negative integer")
    if not isinstance(chain_hash, str) or not HASH_PATTERN.fullmatch(chain_hash):
        raise InvalidCheckpoint("chain_hash must be 64 lower-case hex digits")
    if not isinstance(signed_at, str) or not TIMESTAMP_PATTERN.fullmatch(signed_at):
        raise InvalidCheckpoint("signed_at must be a UTC timestamp like 2026-11-25T10:00:00.123456Z")
    if not isinstance(key_id, str) or not KEY_ID_PATTERN.fullmatch(key_id):
        raise InvalidCheckpoint("key_id must be 16 lower-case hex digits")


def sign_head(key: SigningKey, position: int, chain_hash: str, signed_at: str | None = None) -> Checkpoint:
    """Sign the head ``(position, chain_hash)`` with ``key`` (at ``signed_at``, default now)."""
    moment = signed_at or now_ts()
    message = checkpoint_message(key_id=key.key_id, position=position, chain_hash=chain_hash, signed_at=moment)
    signature = base64.b64encode(key.sign(message)).decode("ascii")
    return Checkpoint(
        position=position, chain_hash=chain_hash, signed_at=moment, key_id=key.key_id, signature=signature
    )


async def ledger_head(conn: asyncpg.Pool | asyncpg.Connection) -> tuple[int, str]:
    """The last sequenced position and its chain hash; ``(0, GENESIS_HASH)`` before the first event."""
    row = await conn.fetchrow(HEAD)
    if row is None:
        return 0, GENESIS_HASH
    return row["position"], row["chain_hash"]


async def make_checkpoint(pool: asyncpg.Pool, key: SigningKey) -> Checkpoint:
    """A checkpoint of the current head, signed now."""
    position, chain = await ledger_head(pool)
    return sign_head(key, position, chain)


def loads_strict(text: str | bytes) -> Any:
    """``json.loads`` that refuses duplicate object keys and non-finite numbers.

    Two parsers that resolve ``{"a": 1, "a": 2}`` differently would verify different documents; a verifier
    must not be the one that was fooled.
    """

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for name, value in pairs:
            if name in result:
                raise ValueError(f"duplicate key {name!r}")
            result[name] = value
        return result

    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, object_pairs_hook=unique, parse_constant=refuse)


def verify_checkpoint(document: Any, public_key: Ed25519PublicKey) -> Checkpoint:
    """Check a checkpoint (a decoded JSON object) strictly and return it; ``InvalidCheckpoint`` if it fails.

    Exactly the five fields, each in its documented form; ``key_id`` must be the given key's id; the
    signature must be 64 bytes of strict base64 and verify over ``checkpoint_message``.
    """
    if not isinstance(document, dict):
        raise InvalidCheckpoint("a checkpoint is a JSON object")
    if set(document) != CHECKPOINT_FIELDS:
        missing = sorted(CHECKPOINT_FIELDS - set(document))
        extra = sorted(set(document) - CHECKPOINT_FIELDS)
        raise InvalidCheckpoint(f"checkpoint fields: missing {missing}, unexpected {extra}")
    message = checkpoint_message(
        key_id=document["key_id"],
        position=document["position"],
        chain_hash=document["chain_hash"],
        signed_at=document["signed_at"],
    )
    expected_id = key_id(raw_public_key(public_key))
    if document["key_id"] != expected_id:
        raise InvalidCheckpoint(f"checkpoint was signed by key {document['key_id']}, not by the given {expected_id}")
    encoded = document["signature"]
    if not isinstance(encoded, str):
        raise InvalidCheckpoint("signature must be a base64 string")
    try:
        signature = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidCheckpoint("signature is not valid base64") from None
    if len(signature) != SIGNATURE_BYTES or base64.b64encode(signature).decode("ascii") != encoded:
        raise InvalidCheckpoint("signature must be the canonical base64 of 64 bytes")
    try:
        public_key.verify(signature, message)
    except InvalidSignature:
        raise InvalidCheckpoint("the checkpoint's signature does not verify with the given public key") from None
    return Checkpoint(**document)


__all__ = [
    "MESSAGE_HEADER",
    "Checkpoint",
    "InvalidCheckpoint",
    "checkpoint_message",
    "ledger_head",
    "loads_strict",
    "make_checkpoint",
    "sign_head",
    "verify_checkpoint",
]
