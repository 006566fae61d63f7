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

import asyncio
import itertools
import os
import pickle
import re
import sys
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import aclosing, asynccontextmanager, suppress
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
from ledger.database import encode_json, init_connection
from ledger.export import EVENT_KIND, LINK_KIND, START_KIND
from ledger.hashing import GENESIS_HASH, chain_hash, decode_marking_floats, event_hash
from ledger.rebuild import (
    EVENT_COLUMNS,
    Difference,
    replay_difference,
    split_histories,
    stored_event_hash,
)
from projections.readmodel import ALL_COLUMNS

Check = Literal["job_chain", "global_chain", "read_model", "checkpoint", "export"]
PREFETCH: Final = 10_000
_NO_LIMIT: Final = 24 * 3600.0  # seconds: the pool's command timeout is for requests, not for a whole-ledger pass
_NO_TIMEOUTS: Final = "SET LOCAL statement_timeout = 0; SET LOCAL idle_in_transaction_session_timeout = 0"
# Every event in (job, version) order (the order of the events_job_version_key index, and of the read model's
# primary key), each with its position if it has one, its chain hash and the chain hash of the position
# before it: all the global chain needs, a position at a time (see _LedgerPass).
# recorded_at comes as text, formatted by PostgreSQL (on its own core, while this process hashes and folds).
_LEDGER_COLUMNS: Final = ", ".join(utc_text("e.recorded_at") if c == "recorded_at" else f"e.{c}" for c in EVENT_COLUMNS)
SELECT_LEDGER: Final = (
    f"SELECT {_LEDGER_COLUMNS}, p.position, p.chain_hash, q.chain_hash "
    "FROM events e LEFT JOIN event_positions p ON p.event_id = e.id "
    "LEFT JOIN event_positions q ON q.position = p.position - 1{where} ORDER BY e.job_uuid, e.version"
)
SELECT_RANGE_JOBS: Final = f"SELECT {', '.join(ALL_COLUMNS)} FROM jobs{{where}} ORDER BY uuid"
# The job uuid of the n-th event in (job, version) order, an index-only scan: where a range of the pass starts.
SPLIT_AT: Final = "SELECT job_uuid FROM events ORDER BY job_uuid, version OFFSET $1 LIMIT 1"
# Below this many positions one process verifies alone: starting worker processes costs more than it saves.
PARALLEL_MIN_POSITIONS: Final = 100_000
_J_UUID, _VERSION, _TYPE, _DATA, _ACTOR, _CLIENT, _REQUEST, _AT, _PREV, _HASH, _ID = range(len(EVENT_COLUMNS))
_POSITION, _CHAIN, _PREVIOUS_CHAIN = range(len(EVENT_COLUMNS), len(EVENT_COLUMNS) + 3)
COUNT_POSITIONS: Final = "SELECT count(*) FROM event_positions"
# The first position whose event row is gone (only looked for when there are more positions than events with
# one), and whether the position before it exists.
FIRST_ORPHAN: Final = (
    "SELECT p.position, p.event_id, (p.position = 1 OR EXISTS "
    "(SELECT 1 FROM event_positions q WHERE q.position = p.position - 1)) AS linked FROM event_positions p "
    "WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.id = p.event_id) ORDER BY p.position LIMIT 1"
)
PREVIOUS_POSITION: Final = "SELECT max(position) FROM event_positions WHERE position < $1"
PREVIOUS_POSITION_ROW: Final = (
    "SELECT position, chain_hash FROM event_positions WHERE position < $1 ORDER BY position DESC LIMIT 1"
)
LAST_POSITION: Final = "SELECT position, chain_hash FROM event_positions ORDER BY position DESC LIMIT 1"
CHAIN_AT: Final = "SELECT chain_hash FROM event_positions WHERE position = $1"
_SNAPSHOT_ID: Final = re.compile(r"[0-9A-F]+-[0-9A-F]+-[0-9]+")
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
    pool: asyncpg.Pool,
    checkpoint: Any = None,
    public_key: Ed25519PublicKey | None = None,
    *,
    workers: int | None = None,
) -> VerifyReport:
    """Verify every job chain, the global chain and the read model; optionally against a saved checkpoint.

    With ``checkpoint`` (a decoded checkpoint document) and ``public_key``, the checkpoint must verify and
    the recomputed chain hash at its position must equal its chain hash: that detects a history rewritten
    consistently (every hash recomputed), and events removed from the end, which nothing else can.

    One pass over the events in one snapshot, each event hashed once (``_LedgerPass``); it takes two of the
    pool's connections, one streaming the events and one the read model. A large ledger (at least
    ``PARALLEL_MIN_POSITIONS`` positions) is cut into ``workers`` ranges of job uuids (default: one per CPU),
    each verified by a worker process of its own in the same exported snapshot; their findings are merged
    into exactly those of the single pass (``_merge``).
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

    async with (
        pool.acquire() as conn,
        pool.acquire() as jobs_conn,
        _marking_floats(conn),
        _marking_floats(jobs_conn),
        _snapshot(conn, jobs_conn) as snapshot,
    ):
        positions = await conn.fetchval(COUNT_POSITIONS)
        if workers is None:
            workers = _cpus() if positions >= PARALLEL_MIN_POSITIONS else 1
        if workers > 1:
            bounds = await _ranges(conn, positions, workers)
            result = _merge(await _in_workers(pool, snapshot, bounds))
        else:
            result = await _LedgerPass(conn, jobs_conn).run()
        first_break = result.first_break
        if positions > result.sequenced:
            first_break = await _orphans(conn, first_break)
        chain = None if first_break is None else await _finding(conn, first_break)
        state = await _chain_state(conn, chain, None if anchor is None else anchor.position)
    difference = result.difference
    if result.job_chain is not None:
        findings.append(result.job_chain)
    if chain is not None:
        findings.append(chain)
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
        unsequenced=result.events - positions,
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


@asynccontextmanager
async def _marking_floats(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """jsonb read with ``decode_marking_floats`` for the duration, so event hashes can take msgspec's fast path."""
    await conn.set_type_codec(
        "jsonb", schema="pg_catalog", encoder=encode_json, decoder=decode_marking_floats, format="text"
    )
    try:
        yield
    finally:
        if not conn.is_closed():
            await init_connection(conn)  # back to the pool's codecs before the connection goes back


@asynccontextmanager
async def _snapshot(conn: asyncpg.Connection, other: asyncpg.Connection) -> AsyncIterator[str]:
    """One read-only snapshot on both connections (exported by ``conn``), with no statement timeouts.

    Yields the snapshot's id: other sessions can join it (``_imported``) while this lasts.
    """
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        snapshot = await conn.fetchval("SELECT pg_export_snapshot()")
        await conn.execute(_NO_TIMEOUTS)
        async with _imported(other, snapshot):
            yield snapshot


@asynccontextmanager
async def _imported(conn: asyncpg.Connection, snapshot: str) -> AsyncIterator[None]:
    """A read-only transaction on ``conn`` in the exported ``snapshot``, with no statement timeouts."""
    if not _SNAPSHOT_ID.fullmatch(snapshot):
        raise RuntimeError(f"unexpected snapshot id {snapshot!r}")
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        await conn.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")  # must come first; takes no parameter
        await conn.execute(_NO_TIMEOUTS)
        yield


# ---- the pass in worker processes --------------------------------------------------------------------------
Bounds = tuple[str | None, str | None]  # job uuids: from the first (inclusive) to the second (exclusive)
# A worker is this interpreter running ledger.verify_worker: a fresh process that imports only what the pass
# needs, unlike multiprocessing's spawn, which re-runs the caller's main module (a script without a
# ``__name__ == "__main__"`` guard would start verifying again in every worker).
_WORKER: Final = (sys.executable, "-m", "ledger.verify_worker")


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


async def _ranges(conn: asyncpg.Connection, positions: int, parts: int) -> list[Bounds]:
    """About ``parts`` ranges of job uuids of about equal size, covering every job (in the database's order)."""
    starts: list[str] = []
    for part in range(1, parts):
        start = await conn.fetchval(SPLIT_AT, positions * part // parts)
        if start is not None and (not starts or start != starts[-1]):
            starts.append(start)
    edges: list[str | None] = [None, *starts, None]
    return list(itertools.pairwise(edges))


async def _in_workers(pool: asyncpg.Pool, snapshot: str, bounds: list[Bounds]) -> list[_RangeResult]:
    """``_LedgerPass`` over each range, each in a worker process, all in ``snapshot``; in range order."""
    # The pool's own connection arguments (DSN, server settings), so the workers connect as its connections do.
    connect = (tuple(pool._connect_args), dict(pool._connect_kwargs))
    return list(await asyncio.gather(*(_in_worker(connect, snapshot, part) for part in bounds)))


async def _in_worker(connect: tuple[tuple[Any, ...], dict[str, Any]], snapshot: str, bounds: Bounds) -> _RangeResult:
    """One range in one worker process: the request on its stdin, the pickled ``_RangeResult`` on its stdout."""
    worker = await asyncio.create_subprocess_exec(
        *_WORKER, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await worker.communicate(pickle.dumps((connect, snapshot, bounds)))
    finally:
        if worker.returncode is None:  # cancelled: the worker must not outlive the verify
            worker.kill()
            await worker.wait()
    if worker.returncode != 0:
        raise RuntimeError(f"verify worker failed ({worker.returncode}): {err.decode(errors='replace')[-2000:]}")
    result = pickle.loads(out)
    assert isinstance(result, _RangeResult)
    return result


async def range_pass(connect: tuple[tuple[Any, ...], dict[str, Any]], snapshot: str, bounds: Bounds) -> _RangeResult:
    """The pass over one range of job uuids on connections of its own, in ``snapshot`` (a worker's job)."""
    args, kwargs = connect
    conn = await asyncpg.connect(*args, **kwargs)
    try:
        jobs_conn = await asyncpg.connect(*args, **kwargs)
        try:
            async with (
                _marking_floats(conn),
                _marking_floats(jobs_conn),
                _imported(conn, snapshot),
                _imported(jobs_conn, snapshot),
            ):
                return await _LedgerPass(conn, jobs_conn, bounds).run()
        finally:
            await jobs_conn.close()
    finally:
        await conn.close()


def _merge(parts: Sequence[_RangeResult]) -> _RangeResult:
    """The ranges' results as the single pass would have found them.

    The ranges are in job uuid order, and both the job chains and the read model are checked in that order:
    the first range with a finding has the first finding. The global chain's first break is the lowest
    position any range found (every position is checked locally, and positions are unique).
    """
    breaks = [part.first_break for part in parts if part.first_break is not None]
    return _RangeResult(
        events=sum(part.events for part in parts),
        sequenced=sum(part.sequenced for part in parts),
        job_chain=next((part.job_chain for part in parts if part.job_chain is not None), None),
        first_break=min(breaks, key=lambda broken: broken.position) if breaks else None,
        difference=next((part.difference for part in parts if part.difference is not None), None),
    )


async def _read_ahead(
    conn: asyncpg.Connection, sql: str, args: Sequence[Any] = ()
) -> AsyncIterator[list[asyncpg.Record]]:
    """The rows of ``sql`` a batch at a time, the next batch always on its way while the caller works."""
    cursor = await conn.cursor(sql, *args)
    ahead: asyncio.Future[list[asyncpg.Record]] = asyncio.ensure_future(cursor.fetch(PREFETCH, timeout=_NO_LIMIT))
    try:
        while batch := await ahead:
            # A fetch is in flight while the caller works through a batch, however long that takes.
            ahead = asyncio.ensure_future(cursor.fetch(PREFETCH, timeout=_NO_LIMIT))
            await asyncio.sleep(0)  # let the fetch go out before the caller settles into the batch
            yield batch
    finally:
        if not ahead.done():
            # An abandoned fetch must finish before the connection can be used again (or its transaction end).
            with suppress(Exception):
                await ahead


class _GlobalBreak(msgspec.Struct, frozen=True):
    """The first position (so far) at which the global chain fails; the detail is completed at the end."""

    position: int
    detail: str
    job_uuid: str | None
    version: int | None
    event_id: int
    gap: bool = False  # the detail still needs the position before the hole


class _RangeResult(msgspec.Struct, frozen=True):
    """What the pass found in one range of jobs (or the whole ledger): picklable, from a worker process."""

    events: int
    sequenced: int  # events with a position
    job_chain: Finding | None
    first_break: _GlobalBreak | None  # the lowest position found bad in the range
    difference: Difference | None


def _where(bounds: Bounds, column: str) -> tuple[str, list[str]]:
    """The SQL condition (and its arguments) keeping ``column`` within ``bounds``, in the database's order."""
    conditions, args = [], []
    for value, operator in zip(bounds, (">=", "<"), strict=True):
        if value is not None:
            args.append(value)
            conditions.append(f"{column} {operator} ${len(args)}")
    return (" WHERE " + " AND ".join(conditions) if conditions else ""), args


class _LedgerPass:
    """The single pass: every event once, in ``(job_uuid, version)`` order, with its position.

    Per event: its hash is recomputed once and serves both chains. The job chain is checked in order, as
    ``ledger.rebuild.verify_job_chains`` does. The global chain is checked locally: a position is good when
    the one before it exists, its event is there and hashes to the stored hash, it is the next version of
    its job in position order, and its chain hash is the chain step from the previous position's stored chain
    hash. The first position that is not good is exactly where a walk in position order, recomputing every
    chain hash, first fails (every stored chain hash before it equals the recomputed one), with the same
    complaint. Each job is folded once and compared with its read-model row, streamed in the same uuid
    order on the second connection, as ``ledger.rebuild.check_read_model`` does.

    ``bounds`` limits the pass to a range of job uuids (events and read-model rows alike): every check
    above is local to a job or to a position, so ranges can be verified apart and merged (``_merge``).
    """

    def __init__(self, conn: asyncpg.Connection, jobs_conn: asyncpg.Connection, bounds: Bounds = (None, None)) -> None:
        self.conn = conn
        self.jobs_conn = jobs_conn
        self.bounds = bounds
        self.events = 0
        self.job_chain: Finding | None = None
        self.first_break: _GlobalBreak | None = None
        self.difference: Difference | None = None
        # A history and a job row with different uuids: which is missing is the database's collation's call.
        self.unmatched: tuple[str, str] | None = None

    async def run(self) -> _RangeResult:
        """Read and check every event and read-model row in the bounds."""
        sequenced = 0
        events_where, events_args = _where(self.bounds, "e.job_uuid")
        jobs_where, jobs_args = _where(self.bounds, "uuid")
        async with (
            aclosing(_read_ahead(self.conn, SELECT_LEDGER.format(where=events_where), events_args)) as event_batches,
            aclosing(_job_rows(self.jobs_conn, SELECT_RANGE_JOBS.format(where=jobs_where), jobs_args)) as job_rows,
        ):
            stored_row = await anext(job_rows, None)
            carry: list[asyncpg.Record] = []
            async for batch in event_batches:
                self.events += len(batch)
                histories, carry = split_histories(carry, batch)
                for history in histories:
                    sequenced += self._check(history)
                    stored_row = await self._compare(history, stored_row, job_rows)
            if carry:
                sequenced += self._check(carry)
                stored_row = await self._compare(carry, stored_row, job_rows)
            if self.difference is None and self.unmatched is None and stored_row is not None:
                self.difference = Difference(job_uuid=stored_row["uuid"], problem="extra")
        if self.unmatched is not None:
            replayed_uuid, stored_uuid = self.unmatched
            if await self.conn.fetchval("SELECT $1::text < $2::text", replayed_uuid, stored_uuid):
                self.difference = Difference(job_uuid=replayed_uuid, problem="missing")
            else:
                self.difference = Difference(job_uuid=stored_uuid, problem="extra")
        return _RangeResult(
            events=self.events,
            sequenced=sequenced,
            job_chain=self.job_chain,
            first_break=self.first_break,
            difference=self.difference,
        )

    def _check(self, history: list[asyncpg.Record]) -> int:
        """Check one job's chain and its part of the global chain; the count of its sequenced events."""
        hashes = [stored_event_hash(row, floats_marked=True) for row in history]  # see _marking_floats
        if self.job_chain is None:
            self.job_chain = _job_chain_break(history, hashes)
        sequenced = [(row[_POSITION], row, digest) for row, digest in zip(history, hashes, strict=True)]
        sequenced = [item for item in sequenced if item[0] is not None]
        sequenced.sort(key=lambda item: item[0])
        last_version = 0
        for position, row, recomputed in sequenced:
            if self.first_break is not None and position >= self.first_break.position:
                break
            detail = _position_problem(row, recomputed, last_version)
            if detail is not None:
                self.first_break = _GlobalBreak(
                    position=position,
                    detail=detail,
                    job_uuid=row[_J_UUID],
                    version=row[_VERSION],
                    event_id=row[_ID],
                    gap=detail == "",
                )
                break
            last_version = row[_VERSION]
        return len(sequenced)

    async def _compare(
        self, history: list[asyncpg.Record], stored_row: asyncpg.Record | None, job_rows: AsyncIterator[asyncpg.Record]
    ) -> asyncpg.Record | None:
        """Compare one job's replay with its read-model row; the next row still to compare."""
        if self.difference is not None or self.unmatched is not None:
            return stored_row
        job_uuid = history[0][_J_UUID]
        if stored_row is None:
            self.difference = Difference(job_uuid=job_uuid, problem="missing")
            return None
        if stored_row["uuid"] != job_uuid:
            self.unmatched = (job_uuid, stored_row["uuid"])
            return stored_row
        self.difference = replay_difference(history, stored_row, floats_marked=True)  # see _marking_floats
        return await anext(job_rows, None)


async def _orphans(conn: asyncpg.Connection, first_break: _GlobalBreak | None) -> _GlobalBreak | None:
    """Positions whose event row is gone: the first of them may be the global chain's first break."""
    row = await conn.fetchrow(FIRST_ORPHAN)
    if row is None or (first_break is not None and first_break.position < row["position"]):
        return first_break
    position, event_id = row["position"], row["event_id"]
    detail = "" if not row["linked"] else f"position {position} refers to event id {event_id}, which does not exist"
    return _GlobalBreak(
        position=position, detail=detail, job_uuid=None, version=None, event_id=event_id, gap=not row["linked"]
    )


async def _finding(conn: asyncpg.Connection, broken: _GlobalBreak) -> Finding:
    detail = broken.detail
    if broken.gap:
        before = await conn.fetchval(PREVIOUS_POSITION, broken.position) or 0
        detail = f"position {before + 1} is missing: the chain jumps from {before} to {broken.position}"
    return Finding(
        check="global_chain",
        detail=detail,
        job_uuid=broken.job_uuid,
        version=broken.version,
        position=broken.position,
        event_id=broken.event_id,
    )


def _job_chain_break(history: list[asyncpg.Record], hashes: list[str]) -> Finding | None:
    """The first event breaking this job's chain (versions 1, 2, ..., each linked to the last), if any."""
    expected_prev = GENESIS_HASH
    for expected_version, (row, recomputed) in enumerate(zip(history, hashes, strict=True), start=1):
        if row[_VERSION] != expected_version:
            detail = f"version: expected version {expected_version}"
        elif row[_PREV] != expected_prev:
            detail = f"prev_hash: prev_hash {row[_PREV]} is not the previous hash {expected_prev}"
        elif recomputed != row[_HASH]:
            detail = f"hash: stored hash {row[_HASH]} but the event hashes to {recomputed}"
        else:
            expected_prev = row[_HASH]
            continue
        return Finding(
            check="job_chain",
            detail=detail,
            job_uuid=row[_J_UUID],
            version=row[_VERSION],
            position=row[_POSITION],
            event_id=row[_ID],
        )
    return None


def _position_problem(row: asyncpg.Record, recomputed: str, last_version: int) -> str | None:
    """What is wrong at this event's position, in the order a walk would find it; "" for a hole before it."""
    position = row[_POSITION]
    previous_chain = row[_PREVIOUS_CHAIN]
    if previous_chain is None:
        if position != 1:
            return ""
        previous_chain = GENESIS_HASH
    if recomputed != row[_HASH]:
        return f"stored hash {row[_HASH]} but the event hashes to {recomputed}"
    if row[_VERSION] != last_version + 1:
        return f"version {row[_VERSION]} of the job is sequenced where version {last_version + 1} should be"
    chain = chain_hash(previous_chain, position, recomputed)
    if chain != row[_CHAIN]:
        return f"stored chain hash {row[_CHAIN]} but the chain recomputes to {chain}"
    return None


async def _job_rows(conn: asyncpg.Connection, sql: str, args: Sequence[Any]) -> AsyncIterator[asyncpg.Record]:
    async with aclosing(_read_ahead(conn, sql, args)) as batches:
        async for batch in batches:
            for row in batch:
                yield row


async def _chain_state(conn: asyncpg.Connection, chain: Finding | None, checkpoint_position: int | None) -> _ChainState:
    """Where the verified prefix of the global chain ends, and its chain hash at the checkpoint's position.

    Up to there every stored chain hash equals the recomputed one, so the stored values can be reported.
    """
    state = _ChainState()
    if chain is None:
        last = await conn.fetchrow(LAST_POSITION)
    else:
        assert chain.position is not None
        last = await conn.fetchrow(PREVIOUS_POSITION_ROW, chain.position)
    if last is not None:
        state.position, state.chain = last["position"], last["chain_hash"]
    if checkpoint_position is not None and 0 < checkpoint_position <= state.position:
        state.at_checkpoint = await conn.fetchval(CHAIN_AT, checkpoint_position)
    return state


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
