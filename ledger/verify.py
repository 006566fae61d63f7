"""Verifying the ledger: against the database (``verify_ledger``), or an export offline (``verify_export``).

Verification code is security-critical (an SDK that skipped part of a proof let a forged history through:
immudb GHSA-672p-m5jq-mrh8). So every check here recomputes from the stored or exported *content* and
trusts no stored derived value: event hashes are recomputed from the event's fields, chain hashes from the
previous chain hash, the position and the recomputed event hash. The offline verifier also refuses input
that is not exactly in the documented form (duplicate JSON keys, unknown fields, booleans for numbers,
hashes with a trailing newline), because a verifier that reads a line differently from another parser can be
made to accept something the other would reject.

Both return a ``VerifyReport`` whose findings name the first bad event of each check: job uuid, version,
position and event id where known, and what is wrong.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Final, Literal

import asyncpg
import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ledger.asof import utc_text
from ledger.checkpoint import (
    HASH_PATTERN,
    TIMESTAMP_PATTERN,
    InvalidCheckpoint,
    loads_strict,
    verify_checkpoint,
)
from ledger.export import EVENT_KIND, LINK_KIND, START_KIND
from ledger.hashing import GENESIS_HASH, UnhashableValue, chain_hash, event_hash
from ledger.rebuild import check_read_model, verify_job_chains

Check = Literal["job_chain", "global_chain", "read_model", "checkpoint", "export"]
PREFETCH: Final = 10_000
_NO_TIMEOUTS: Final = "SET LOCAL statement_timeout = 0; SET LOCAL idle_in_transaction_session_timeout = 0"
# A left join: a position whose event row has vanished must be reported, not silently skipped.
SELECT_CHAIN: Final = (
    "SELECT p.position, p.event_id, p.chain_hash, e.id, e.job_uuid, e.version, e.event_type, e.data, "
    f"e.actor_user_uuid, e.actor_client_uuid, e.request_id, {utc_text('e.recorded_at')} AS recorded_at, "
    "e.prev_hash, e.hash FROM event_positions p LEFT JOIN events e ON e.id = p.event_id ORDER BY p.position"
)
POSITION_OF_EVENT: Final = "SELECT position FROM event_positions WHERE event_id = $1"
COUNT_UNSEQUENCED: Final = "SELECT (SELECT count(*) FROM events) - (SELECT count(*) FROM event_positions)"
_EVENT_FIELDS: Final = frozenset(
    {"kind", "position", "id", "job_uuid", "version", "event_type", "data", "actor_user_uuid",
     "actor_client_uuid", "request_id", "recorded_at", "prev_hash", "hash", "chain_hash"}
)  # fmt: skip
_LINK_FIELDS: Final = frozenset({"kind", "position", "hash", "chain_hash"})
_START_FIELDS: Final = frozenset({"kind", "position", "chain_hash"})


class Finding(msgspec.Struct, kw_only=True, frozen=True):
    """One problem: which check found it, the event it is about (as far as known) and what is wrong."""

    check: Check
    detail: str
    job_uuid: str | None = None
    version: int | None = None
    position: int | None = None
    event_id: int | None = None
    line: int | None = None  # offline: the 1-based line of the export

    def __str__(self) -> str:
        where = []
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.position is not None:
            where.append(f"position {self.position}")
        if self.job_uuid is not None:
            where.append(f"job {self.job_uuid}")
        if self.version is not None:
            where.append(f"version {self.version}")
        if self.event_id is not None:
            where.append(f"event id {self.event_id}")
        return f"{self.check}: {', '.join(where) or 'ledger'}: {self.detail}"


class VerifyReport(msgspec.Struct, kw_only=True, frozen=True):
    """The outcome of a verification.

    ``positions`` is how many positions of the global chain were checked, ending at ``head`` with chain hash
    ``head_chain_hash`` (recomputed). ``unsequenced`` (database) counts events without a position yet;
    ``beyond_checkpoint`` (offline) counts positions after the checkpoint, internally consistent but not
    covered by its signature. ``findings`` holds at most one finding per check, the first it met.
    """

    ok: bool
    positions: int
    head: int
    head_chain_hash: str
    findings: tuple[Finding, ...] = ()
    unsequenced: int = 0
    beyond_checkpoint: int = 0
    checkpoint_position: int | None = None
    seconds: float = 0.0

    @property
    def first(self) -> Finding | None:
        """The first finding, or None when everything verified."""
        return self.findings[0] if self.findings else None


# ---------------------------------------------------------------------------------------------------------
# Against the database
# ---------------------------------------------------------------------------------------------------------
class _ChainState:
    """The global chain as recomputed so far."""

    def __init__(self) -> None:
        self.position = 0
        self.chain = GENESIS_HASH
        self.at_checkpoint: str | None = None
        # job uuid -> last version seen in position order: a job's events are sequenced in version order.
        self.versions: dict[str, int] = {}


async def verify_ledger(
    pool: asyncpg.Pool, checkpoint: Any = None, public_key: Ed25519PublicKey | None = None
) -> VerifyReport:
    """Verify every job chain, the global chain and the read model; optionally against a saved checkpoint.

    With ``checkpoint`` (a decoded checkpoint document) and ``public_key``, the checkpoint must verify and
    the recomputed chain hash at its position must equal its chain hash: that detects a history rewritten
    consistently (every hash recomputed), and events removed from the end, which nothing else can.
    """
    started = time.perf_counter()
    findings: list[Finding] = []
    anchor = None
    if checkpoint is not None:
        if public_key is None:
            raise ValueError("a checkpoint needs the public key to verify it")
        try:
            anchor = verify_checkpoint(checkpoint, public_key)
        except InvalidCheckpoint as exc:
            findings.append(Finding(check="checkpoint", detail=str(exc)))

    # One pass after another: they are CPU-bound in this process, so running them together gains nothing
    # (measured: bench/provenance.py), and holds three snapshots open instead of one.
    broken = await verify_job_chains(pool)
    state = _ChainState()
    unsequenced, chain_finding = await _verify_global_chain(pool, state, None if anchor is None else anchor.position)
    difference = await check_read_model(pool)
    if broken is not None:
        position = await pool.fetchval(POSITION_OF_EVENT, broken.event_id)
        findings.append(
            Finding(
                check="job_chain",
                detail=f"{broken.problem}: {broken.detail}",
                job_uuid=broken.job_uuid,
                version=broken.version,
                position=position,
                event_id=broken.event_id,
            )
        )
    if chain_finding is not None:
        findings.append(chain_finding)
    elif anchor is not None:
        findings.extend(_compare_with_checkpoint(state, anchor.position, anchor.chain_hash))
    if difference is not None:
        findings.append(Finding(check="read_model", detail=str(difference), job_uuid=difference.job_uuid))

    return VerifyReport(
        ok=not findings,
        positions=state.position,
        head=state.position,
        head_chain_hash=state.chain,
        findings=tuple(findings),
        unsequenced=unsequenced,
        checkpoint_position=None if anchor is None else anchor.position,
        seconds=round(time.perf_counter() - started, 3),
    )


def _compare_with_checkpoint(state: _ChainState, position: int, expected: str) -> list[Finding]:
    if position == 0:
        state.at_checkpoint = GENESIS_HASH
    if state.at_checkpoint is None:
        detail = f"the ledger ends at position {state.position}, before the checkpoint's position {position}"
        return [Finding(check="checkpoint", detail=detail + ": events were removed", position=position)]
    if state.at_checkpoint != expected:
        detail = f"chain hash at the checkpoint's position is {state.at_checkpoint}, the checkpoint says {expected}"
        return [Finding(check="checkpoint", detail=detail + ": history was rewritten", position=position)]
    return []


async def _verify_global_chain(
    pool: asyncpg.Pool, state: _ChainState, checkpoint_position: int | None
) -> tuple[int, Finding | None]:
    """Walk ``event_positions`` in order in one snapshot; return (unsequenced events, first finding)."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        await conn.execute(_NO_TIMEOUTS)
        unsequenced = await conn.fetchval(COUNT_UNSEQUENCED)
        cursor = await conn.cursor(SELECT_CHAIN)
        while batch := await cursor.fetch(PREFETCH):
            for row in batch:
                finding = _check_position(state, row)
                if finding is not None:
                    return unsequenced, finding
                if state.position == checkpoint_position:
                    state.at_checkpoint = state.chain
    return unsequenced, None


def _check_position(state: _ChainState, row: asyncpg.Record) -> Finding | None:
    """Check the next row of the global chain and advance ``state``; the finding if it is bad."""
    position = row["position"]

    def finding(detail: str) -> Finding:
        return Finding(
            check="global_chain",
            detail=detail,
            job_uuid=row["job_uuid"],
            version=row["version"],
            position=position,
            event_id=row["event_id"],
        )

    if position != state.position + 1:
        return finding(f"position {state.position + 1} is missing: the chain jumps from {state.position} to {position}")
    if row["id"] is None:
        return finding(f"position {position} refers to event id {row['event_id']}, which does not exist")
    recomputed = _hash_of_row(row)
    if recomputed != row["hash"]:
        return finding(f"stored hash {row['hash']} but the event hashes to {recomputed}")
    job, version = row["job_uuid"], row["version"]
    expected_version = state.versions.get(job, 0) + 1
    if version != expected_version:
        return finding(f"version {version} of the job is sequenced where version {expected_version} should be")
    chain = chain_hash(state.chain, position, recomputed)
    if chain != row["chain_hash"]:
        return finding(f"stored chain hash {row['chain_hash']} but the chain recomputes to {chain}")
    state.position, state.chain = position, chain
    state.versions[job] = version
    return None


def _hash_of_row(row: asyncpg.Record) -> str:
    try:
        return event_hash(
            job_uuid=row["job_uuid"],
            version=row["version"],
            event_type=row["event_type"],
            data=row["data"],
            actor_user_uuid=row["actor_user_uuid"],
            actor_client_uuid=row["actor_client_uuid"],
            request_id=row["request_id"],
            recorded_at=row["recorded_at"],  # already text, formatted by utc_text
            prev_hash=row["prev_hash"],
        )
    except (UnhashableValue, TypeError, ValueError) as exc:
        return f"<unhashable: {exc}>"


# ---------------------------------------------------------------------------------------------------------
# Offline: an export and a checkpoint, no database
# ---------------------------------------------------------------------------------------------------------
class _Bad(Exception):
    """A line of the export is wrong; carries what is known about where."""

    def __init__(self, detail: str, item: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.item = item or {}


def _is_int(value: Any) -> bool:
    return type(value) is int  # not bool: JSON true must not pass for 1


def _is_hash(value: Any) -> bool:
    return isinstance(value, str) and HASH_PATTERN.fullmatch(value) is not None


class _ExportState(_ChainState):
    def __init__(self) -> None:
        super().__init__()
        self.start: int | None = None
        # job uuid -> (last version, its hash, its recorded_at)
        self.jobs: dict[str, tuple[int, str, str]] = {}


def verify_export(lines: Iterable[str | bytes], checkpoint: Any, public_key: Ed25519PublicKey) -> VerifyReport:
    """Verify an NDJSON export against a checkpoint and the service's public key, without a database.

    ``lines`` are the export's lines, as text or as bytes (UTF-8). Checks the checkpoint's form and
    signature; every event line's hash, recomputed from its fields; each job's chain (versions 1, 2, ... in
    position order, each ``prev_hash`` the previous event's hash, times never going backwards); positions
    consecutive from the start; every chain hash recomputed; and that the recomputed chain hash at the
    checkpoint's position equals the checkpoint's. Stops at the first bad line.
    """
    started = time.perf_counter()
    try:
        anchor = verify_checkpoint(checkpoint, public_key)
    except InvalidCheckpoint as exc:
        return VerifyReport(
            ok=False,
            positions=0,
            head=0,
            head_chain_hash=GENESIS_HASH,
            findings=(Finding(check="checkpoint", detail=str(exc)),),
        )
    state = _ExportState()
    finding: Finding | None = None
    line_number = 0
    for line_number, line in enumerate(lines, start=1):
        try:
            _check_line(state, line, line_number)
        except _Bad as bad:
            finding = _export_finding(bad, line_number)
            break
        if state.position == anchor.position:
            state.at_checkpoint = state.chain
            if state.chain != anchor.chain_hash:
                detail = f"chain hash here is {state.chain}, the checkpoint says {anchor.chain_hash}"
                finding = Finding(check="checkpoint", detail=detail, position=state.position, line=line_number)
                break
    if state.start is None:
        state.start = 0  # an empty export starts, and ends, at genesis
    if finding is None:
        if anchor.position == 0 and state.start == 0:
            state.at_checkpoint = GENESIS_HASH
        finding = _coverage_finding(state, anchor.position, anchor.chain_hash)
    positions = state.position - (state.start or 0)
    return VerifyReport(
        ok=finding is None,
        positions=positions,
        head=state.position,
        head_chain_hash=state.chain,
        findings=() if finding is None else (finding,),
        beyond_checkpoint=max(0, state.position - anchor.position),
        checkpoint_position=anchor.position,
        seconds=round(time.perf_counter() - started, 3),
    )


def _coverage_finding(state: _ExportState, position: int, expected: str) -> Finding | None:
    """The export must reach the checkpoint's position (and start at or before it)."""
    assert state.start is not None
    if position < state.start:
        return Finding(
            check="checkpoint",
            detail=f"the export starts at position {state.start}, after the checkpoint's position {position}",
        )
    if state.at_checkpoint is None:
        return Finding(
            check="checkpoint",
            detail=f"the export ends at position {state.position}, before the checkpoint's position {position}",
        )
    if state.at_checkpoint != expected:  # the genesis case; other positions were compared line by line
        return Finding(
            check="checkpoint",
            detail=f"chain hash at position {position} is {state.at_checkpoint}, the checkpoint says {expected}",
            position=position,
        )
    return None


def _export_finding(bad: _Bad, line_number: int) -> Finding:
    item = bad.item

    def field(name: str) -> Any:
        value = item.get(name)
        return value if _is_int(value) or name == "job_uuid" else None

    job = item.get("job_uuid")
    return Finding(
        check="export",
        detail=bad.detail,
        job_uuid=job if isinstance(job, str) else None,
        version=field("version"),
        position=field("position"),
        event_id=field("id"),
        line=line_number,
    )


def _check_line(state: _ExportState, line: str | bytes, line_number: int) -> None:
    """Check one line and advance ``state``; raise ``_Bad`` if it is wrong."""
    try:
        # Decoded here, strictly as UTF-8: json.loads would guess among UTF-8/16/32 for bytes.
        item = loads_strict(line.decode("utf-8") if isinstance(line, bytes) else line)
    except (ValueError, RecursionError) as exc:
        raise _Bad(f"not a JSON object: {exc}") from None
    if not isinstance(item, dict):
        raise _Bad("not a JSON object")
    kind = item.get("kind")
    if kind == START_KIND:
        if line_number != 1:
            raise _Bad("a chainStart line may only be the first line", item)
        _check_fields(item, _START_FIELDS)
        if not _is_int(item["position"]) or item["position"] < 0 or not _is_hash(item["chain_hash"]):
            raise _Bad("chainStart needs a non-negative integer position and a 64-hex chain_hash", item)
        state.start = state.position = item["position"]
        state.chain = item["chain_hash"]
        return
    if state.start is None:
        state.start = 0  # no chainStart: the chain begins at genesis
    if kind == LINK_KIND:
        _check_fields(item, _LINK_FIELDS)
        if not _is_hash(item["hash"]):
            raise _Bad("hash must be 64 lower-case hex digits", item)
        _advance(state, item, item["hash"])
        return
    if kind != EVENT_KIND:
        raise _Bad(f"unknown line kind {kind!r}", item)
    _check_fields(item, _EVENT_FIELDS)
    _check_event_types(item)
    recomputed = _hash_of_item(item)
    if recomputed != item["hash"]:
        raise _Bad(f"the line says hash {item['hash']} but the event hashes to {recomputed}", item)
    _check_job_link(state, item)
    _advance(state, item, recomputed)


def _check_fields(item: dict[str, Any], expected: frozenset[str]) -> None:
    # Unknown fields are refused: they are covered by no hash, so a reader could be misled by them.
    if set(item) != expected:
        missing = sorted(expected - set(item))
        extra = sorted(set(item) - expected)
        raise _Bad(f"fields: missing {missing}, unexpected {extra}", item)


def _check_event_types(item: dict[str, Any]) -> None:
    for name in ("job_uuid", "event_type", "actor_user_uuid", "request_id"):
        if not isinstance(item[name], str):
            raise _Bad(f"{name} must be a string", item)
    if item["actor_client_uuid"] is not None and not isinstance(item["actor_client_uuid"], str):
        raise _Bad("actor_client_uuid must be a string or null", item)
    for name in ("id", "version"):
        if not _is_int(item[name]) or item[name] < 1:
            raise _Bad(f"{name} must be a positive integer", item)
    if not isinstance(item["data"], dict):
        raise _Bad("data must be an object", item)
    if not isinstance(item["recorded_at"], str) or not TIMESTAMP_PATTERN.fullmatch(item["recorded_at"]):
        raise _Bad("recorded_at must be a UTC timestamp like 2026-11-25T10:00:00.123456Z", item)
    for name in ("prev_hash", "hash"):
        if not _is_hash(item[name]):
            raise _Bad(f"{name} must be 64 lower-case hex digits", item)


def _hash_of_item(item: dict[str, Any]) -> str:
    try:
        return event_hash(
            job_uuid=item["job_uuid"],
            version=item["version"],
            event_type=item["event_type"],
            data=item["data"],
            actor_user_uuid=item["actor_user_uuid"],
            actor_client_uuid=item["actor_client_uuid"],
            request_id=item["request_id"],
            recorded_at=item["recorded_at"],
            prev_hash=item["prev_hash"],
        )
    except ValueError as exc:  # a value JSON can carry but canonical JSON cannot (inf, lone surrogates)
        raise _Bad(f"the event cannot be hashed: {exc}", item) from None


def _check_job_link(state: _ExportState, item: dict[str, Any]) -> None:
    """The event must be its job's next version, link to its previous hash, and not be older."""
    job, version = item["job_uuid"], item["version"]
    last = state.jobs.get(job)
    if last is None:
        if version != 1:
            raise _Bad(f"the job's first event in the export is version {version}, not 1", item)
        if item["prev_hash"] != GENESIS_HASH:
            raise _Bad("version 1 must link to the genesis hash", item)
    else:
        last_version, last_hash, last_at = last
        if version != last_version + 1:
            raise _Bad(f"version {version} follows version {last_version} of the job", item)
        if item["prev_hash"] != last_hash:
            raise _Bad(f"prev_hash {item['prev_hash']} is not the hash of version {last_version}", item)
        # The fixed-width format makes string order time order.
        if item["recorded_at"] < last_at:
            raise _Bad(f"recorded_at {item['recorded_at']} is before version {last_version}'s {last_at}", item)
    state.jobs[job] = (version, item["hash"], item["recorded_at"])


def _advance(state: _ExportState, item: dict[str, Any], event_hash_hex: str) -> None:
    """Extend the recomputed chain by one position and compare with the line's chain hash."""
    position = item["position"]
    if not _is_int(position) or position != state.position + 1:
        raise _Bad(f"position {position!r} does not follow position {state.position}", item)
    if not _is_hash(item["chain_hash"]):
        raise _Bad("chain_hash must be 64 lower-case hex digits", item)
    chain = chain_hash(state.chain, position, event_hash_hex)
    if chain != item["chain_hash"]:
        raise _Bad(f"the line says chain hash {item['chain_hash']} but the chain recomputes to {chain}", item)
    state.position, state.chain = position, chain


__all__ = ["Finding", "VerifyReport", "verify_export", "verify_ledger"]
