"""The ledger's hash format. ``docs/ledger-format.md`` specifies it for third parties; keep them in step.

An event's hash is SHA-256 over the canonical JSON of its envelope (job, version, type, data, actor,
request id, time and the previous event's hash). Canonical JSON is Python's ``json.dumps`` with sorted keys,
no whitespace, ``ensure_ascii=False``, encoded as UTF-8, so a verifier needs only ``hashlib`` and ``json``.

Values are normalised before they are hashed and stored, so that what PostgreSQL's ``jsonb`` gives back
re-encodes to the same bytes: floats of magnitude 1e16 or more (always integral) become ints, and -0.0
becomes 0.0. NaN, infinities, NUL characters and lone surrogates cannot be stored at all and are refused.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Final

GENESIS_HASH: Final = "0" * 64
_BIG_FLOAT: Final = 1e16


class UnhashableValue(ValueError):
    """A value the ledger cannot store faithfully (NaN, infinity, a NUL character, a non-JSON type)."""


def normalise(value: Any) -> Any:
    """Return ``value`` in the form that survives a round trip through ``jsonb`` unchanged."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UnhashableValue("numbers must be finite")
        if abs(value) >= _BIG_FLOAT:
            return int(value)
        return 0.0 if value == 0 else value
    if isinstance(value, str):
        return _check_text(value)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise UnhashableValue("object keys must be strings")
            out[_check_text(key)] = normalise(item)
        return out
    if isinstance(value, list | tuple):
        return [normalise(item) for item in value]
    raise UnhashableValue(f"not a JSON value: {type(value).__name__}")


def _check_text(text: str) -> str:
    if "\x00" in text:
        raise UnhashableValue("strings must not contain NUL characters")
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:  # a lone surrogate: no UTF-8 for it, so it can be neither hashed nor stored
            raise UnhashableValue("strings must be valid Unicode (no lone surrogates)") from None
    return text


def canonical_json(value: Any) -> bytes:
    """The canonical bytes of a JSON value."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def event_hash(
    *,
    job_uuid: str,
    version: int,
    event_type: str,
    data: dict[str, Any],
    actor_user_uuid: str,
    actor_client_uuid: str | None,
    request_id: str,
    recorded_at: str,
    prev_hash: str,
) -> str:
    """The hex SHA-256 of one event, chained to its job's previous event by ``prev_hash``."""
    envelope = {
        "job_uuid": job_uuid,
        "version": version,
        "event_type": event_type,
        "data": data,
        "actor_user_uuid": actor_user_uuid,
        "actor_client_uuid": actor_client_uuid,
        "request_id": request_id,
        "recorded_at": recorded_at,
        "prev_hash": prev_hash,
    }
    return hashlib.sha256(canonical_json(envelope)).hexdigest()


def chain_hash(previous_chain_hash: str, position: int, event_hash_hex: str) -> str:
    """The global chain hash at ``position``: it covers the previous position's and this event's hash."""
    material = f"{previous_chain_hash}:{position}:{event_hash_hex}".encode()
    return hashlib.sha256(material).hexdigest()


def digest_parameters(parameters: dict[str, Any]) -> str:
    """Key-order-independent digest of ``script_parameters``, for finding identical jobs through an index."""
    return hashlib.sha256(canonical_json(parameters)).hexdigest()
