"""The ledger's hash format. ``docs/ledger-format.md`` specifies it for third parties; keep them in step.

An event's hash is SHA-256 over the canonical JSON of its envelope (job, version, type, data, actor,
request id, time and the previous event's hash). Canonical JSON is Python's ``json.dumps`` with sorted keys,
no whitespace, ``ensure_ascii=False``, encoded as UTF-8, so a verifier needs only ``hashlib`` and ``json``.

Values are normalised before they are hashed and stored, so that what PostgreSQL's ``jsonb`` gives back
re-encodes to the same bytes: floats of magnitude 1e16 or more (always integral) become ints, and -0.0
becomes 0.0. NaN, infinities, NUL characters and lone surrogates cannot be stored at all and are refused.

``canonical_json`` is the reference. ``float_free_canonical_json`` makes the same bytes with msgspec, about
five times faster, for values that hold no plain float: msgspec writes some floats differently (``1e-7`` for
``1e-07``), so floats must reach it marked, as ``decode_marking_floats`` reads them, and go the reference way.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Final

import msgspec

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


class MarkedFloat(float):
    """A JSON number with a fraction or an exponent, as ``decode_marking_floats`` reads it."""


# decode_marking_floats(text): JSON decoded like ``msgspec.json.decode``, but every float as a ``MarkedFloat``
# (the same value). The bound method itself, not a wrapper: as a codec it runs once per row of a whole ledger.
decode_marking_floats: Final = msgspec.json.Decoder(float_hook=MarkedFloat).decode


def _not_plain_json(value: Any) -> Any:
    raise TypeError(f"not plain JSON: {type(value).__name__}")


# Everything but float subclasses (and types msgspec does not know) is written natively, byte for byte as
# canonical_json writes it: keys sorted by code point, the same escapes (only ", \ and controls; non-ASCII as
# UTF-8), integers of any size, true/false/null. A MarkedFloat calls the hook, which refuses it.
_FLOAT_FREE_ENCODER: Final = msgspec.json.Encoder(order="sorted", enc_hook=_not_plain_json)


def float_free_canonical_json(value: Any) -> bytes:
    """``canonical_json(value)``, five times faster, for a value holding no plain ``float``.

    Its floats, if any, must be ``MarkedFloat``s (as ``decode_marking_floats`` reads them): such a value, and
    anything msgspec refuses, is encoded by ``canonical_json`` itself (and raises what it raises).
    """
    try:
        return _FLOAT_FREE_ENCODER.encode(value)
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError):
        return canonical_json(value)


def _as_float(value: Any) -> float:
    if isinstance(value, float):
        return float(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


_IN_ORDER_ENCODER: Final = msgspec.json.Encoder(enc_hook=_as_float)


def same_json(a: Any, b: Any) -> bool:
    """Whether two finite JSON values are exactly the same (``1``, ``1.0`` and ``true`` differ), in any key order.

    Two values msgspec writes identically are the same (its floats read back exactly); only when they differ
    (or one has its keys in another order) does it take the slower canonical comparison.
    """
    try:
        if _IN_ORDER_ENCODER.encode(a) == _IN_ORDER_ENCODER.encode(b):
            return True
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError):
        pass
    try:
        return canonical_json(a) == canonical_json(b)
    except (TypeError, ValueError):
        return False


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
    floats_marked: bool = False,
) -> str:
    """The hex SHA-256 of one event, chained to its job's previous event by ``prev_hash``.

    ``floats_marked``: ``data`` holds no plain float (it was read with ``decode_marking_floats``), so the
    envelope can take ``float_free_canonical_json``.
    """
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
    encoded = float_free_canonical_json(envelope) if floats_marked else canonical_json(envelope)
    return hashlib.sha256(encoded).hexdigest()


def chain_hash(previous_chain_hash: str, position: int, event_hash_hex: str) -> str:
    """The global chain hash at ``position``: it covers the previous position's and this event's hash."""
    material = f"{previous_chain_hash}:{position}:{event_hash_hex}".encode()
    return hashlib.sha256(material).hexdigest()


def digest_parameters(parameters: dict[str, Any], *, floats_marked: bool = False) -> str:
    """Key-order-independent digest of ``script_parameters``, for finding identical jobs through an index.

    ``floats_marked``: as in ``event_hash`` (a verifier re-derives one digest per job of the ledger).
    """
    encoded = float_free_canonical_json(parameters) if floats_marked else canonical_json(parameters)
    return hashlib.sha256(encoded).hexdigest()
