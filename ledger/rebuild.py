"""The read model re-derived from the events alone: rebuild it, check it, and verify the job hash chains.

All three stream the events in ``(job_uuid, version)`` order through a server-side cursor and fold each job
with the same pure ``projections.job.fold`` the live projection uses, so memory holds a batch of events (and,
in a rebuild, a batch of rows on their way into ``jobs``), never the whole ledger.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing, asynccontextmanager, suppress
from datetime import UTC, datetime
from typing import Any, Final, Literal

import asyncpg
import msgspec

from ledger.database import init_connection
from ledger.hashing import GENESIS_HASH, UnhashableValue, event_hash, same_json
from projections.job import IllegalTransition, Job, Recorded, apply, decode_event, fold
from projections.readmodel import ALL_COLUMNS, job_to_row
from projections.timefmt import format_ts

# Rows per cursor round trip, and jobs per COPY: large enough that round trips do not dominate, small enough
# that each statement stays short and memory stays flat.
PREFETCH: Final = 10_000
COPY_BATCH: Final = 20_000
_LONG_CALL_SECONDS: Final = 600.0

EVENT_COLUMNS: Final = (
    "job_uuid",
    "version",
    "event_type",
    "data",
    "actor_user_uuid",
    "actor_client_uuid",
    "request_id",
    "recorded_at",
    "prev_hash",
    "hash",
    "id",
)
_J_UUID, _VERSION, _TYPE, _DATA, _ACTOR, _CLIENT, _REQUEST, _AT, _PREV, _HASH, _ID = range(len(EVENT_COLUMNS))
# Both sides of the merge in check_read_model are ordered by the columns' own (default) collation, so the
# unique indexes on (job_uuid, version) and uuid serve them without a sort.
SELECT_EVENTS: Final = f"SELECT {', '.join(EVENT_COLUMNS)} FROM events ORDER BY job_uuid, version"
SELECT_JOBS: Final = f"SELECT {', '.join(ALL_COLUMNS)} FROM jobs ORDER BY uuid"
SECONDARY_INDEXES: Final = (
    "SELECT i.indexrelid::regclass::text AS name, pg_get_indexdef(i.indexrelid) AS definition FROM pg_index i "
    "WHERE i.indrelid = 'jobs'::regclass "
    "AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid) ORDER BY 1"
)
# Rebuild and check are maintenance jobs that legitimately outlast the service's per-request limits.
_NO_TIMEOUTS: Final = "SET LOCAL statement_timeout = 0; SET LOCAL idle_in_transaction_session_timeout = 0"
_JSONB_COLUMNS: Final = frozenset({"resource_limits", "script_parameters"})
_JSONB_INDEXES: Final = tuple(i for i, name in enumerate(ALL_COLUMNS) if name in _JSONB_COLUMNS)

Problem = Literal["attributes", "missing", "extra", "unreplayable"]
ChainProblem = Literal["version", "prev_hash", "hash"]


class RebuildReport(msgspec.Struct, kw_only=True, frozen=True):
    """What a rebuild wrote: ``jobs`` rows folded from ``events`` events, in ``seconds``."""

    jobs: int
    events: int
    seconds: float


class Difference(msgspec.Struct, kw_only=True, frozen=True):
    """The first job (in uuid order) whose read-model row is not what a replay of its events gives.

    ``problem`` is ``attributes`` (the row exists but ``attributes`` differ), ``missing`` (events but no
    row), ``extra`` (a row but no events) or ``unreplayable`` (the events do not fold; ``detail`` says why).
    """

    job_uuid: str
    problem: Problem
    attributes: tuple[str, ...] = ()
    detail: str = ""

    def __str__(self) -> str:
        if self.problem == "attributes":
            return f"job {self.job_uuid}: {', '.join(self.attributes)} differ"
        if self.problem == "missing":
            return f"job {self.job_uuid}: has events but no read-model row"
        if self.problem == "extra":
            return f"job {self.job_uuid}: has a read-model row but no events"
        return f"job {self.job_uuid}: its events do not fold: {self.detail}"


class ChainBreak(msgspec.Struct, kw_only=True, frozen=True):
    """The first event (in job, version order) that breaks its job's hash chain.

    ``problem`` is ``version`` (not the next version: a gap, or a first event other than 1), ``prev_hash``
    (does not link to the previous event's hash, or to ``GENESIS_HASH`` for version 1) or ``hash`` (the
    stored hash is not the hash of the stored event).
    """

    job_uuid: str
    version: int
    event_id: int
    problem: ChainProblem
    detail: str

    def __str__(self) -> str:
        return f"job {self.job_uuid} event {self.version} (id {self.event_id}): {self.detail}"


class ReplayError(Exception):
    """A job's events do not fold (an illegal or undecodable event): the ledger itself is damaged."""

    def __init__(self, job_uuid: str, version: int, message: str) -> None:
        super().__init__(f"job {job_uuid} event {version}: {message}")
        self.job_uuid = job_uuid
        self.version = version
        self.message = message


# ---------------------------------------------------------------------------------------------------------
# Reading and folding
# ---------------------------------------------------------------------------------------------------------
async def _history_batches(
    conn: asyncpg.Connection,
    *,
    read_ahead: bool = False,
    when_idle: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[list[list[asyncpg.Record]]]:
    """Complete job histories (each a list of event rows in version order), a cursor batch at a time.

    Needs an open transaction. With ``read_ahead`` the next batch is requested before this one is handed
    over, so PostgreSQL reads while Python folds; the connection is then busy while the caller holds a
    batch, so the caller must not use it, except in ``when_idle``, which runs between batches.
    """
    cursor = await conn.cursor(SELECT_EVENTS)
    ahead: asyncio.Future[list[asyncpg.Record]] | None = None
    carry: list[asyncpg.Record] = []
    try:
        batch = await cursor.fetch(PREFETCH, timeout=_LONG_CALL_SECONDS)
        while batch:
            if when_idle is not None:
                await when_idle()
            if read_ahead:
                ahead = asyncio.ensure_future(cursor.fetch(PREFETCH, timeout=_LONG_CALL_SECONDS))
                await asyncio.sleep(0)  # lets the fetch send its request before we go back to folding
            histories, carry = split_histories(carry, batch)
            yield histories
            batch = await ahead if ahead is not None else await cursor.fetch(PREFETCH, timeout=_LONG_CALL_SECONDS)
            ahead = None
        if carry:
            yield [carry]
    finally:
        if ahead is not None:
            # An abandoned read-ahead must finish before the connection can be used (or the transaction ended).
            with suppress(Exception):
                await ahead


def split_histories(
    carry: list[asyncpg.Record], batch: list[asyncpg.Record]
) -> tuple[list[list[asyncpg.Record]], list[asyncpg.Record]]:
    """Cut ``carry + batch`` into complete histories and the trailing one, which the next batch may continue."""
    histories: list[list[asyncpg.Record]] = []
    current = carry
    for row in batch:
        if current and row[_J_UUID] != current[0][_J_UUID]:
            histories.append(current)
            current = []
        current.append(row)
    return histories, current


async def _histories(conn: asyncpg.Connection) -> AsyncIterator[list[asyncpg.Record]]:
    """Each job's event rows, one list per job, in (job_uuid, version) order. Needs an open transaction."""
    async with aclosing(_history_batches(conn)) as batches:
        async for histories in batches:
            for history in histories:
                yield history


async def _job_rows(conn: asyncpg.Connection) -> AsyncIterator[asyncpg.Record]:
    """The read-model rows in uuid order. Needs an open transaction."""
    cursor = await conn.cursor(SELECT_JOBS)
    while batch := await cursor.fetch(PREFETCH, timeout=_LONG_CALL_SECONDS):
        for row in batch:
            yield row


def _recorded(row: asyncpg.Record) -> Recorded:
    return Recorded(
        job_uuid=row[_J_UUID],
        version=row[_VERSION],
        event=decode_event(row[_TYPE], row[_DATA]),
        actor_user_uuid=row[_ACTOR],
        actor_client_uuid=row[_CLIENT],
        request_id=row[_REQUEST],
        recorded_at=timestamp_text(row[_AT]),
    )


def timestamp_text(moment: datetime | str) -> str:
    """``format_ts(moment)``, about twice as fast for the UTC datetimes asyncpg returns (a million per rebuild).

    Text is taken as already formatted: a query may have PostgreSQL format the column (``ledger.asof.utc_text``),
    which costs the database less than formatting costs Python.
    """
    if isinstance(moment, str):
        return moment
    if moment.tzinfo is not UTC or moment.year < 1000:
        return format_ts(moment)
    return moment.isoformat(timespec="microseconds")[:-6] + "Z"


def _replay(history: Sequence[asyncpg.Record], *, floats_marked: bool = False) -> tuple[Any, ...]:
    """Fold one job's event rows into its read-model row (the values of ``ALL_COLUMNS``).

    Raises ``ReplayError`` if the events do not decode or do not fold. ``floats_marked``: the rows' ``data``
    was read with ``ledger.hashing.decode_marking_floats``.
    """
    try:
        records = [_recorded(row) for row in history]
        job = fold(records)
    except (IllegalTransition, ValueError):
        raise _locate_failure(history) from None
    assert job is not None  # history is never empty
    return job_to_row(job, history[-1][_HASH], records[-1].recorded_at, floats_marked=floats_marked)


def _locate_failure(history: Sequence[asyncpg.Record]) -> ReplayError:
    """Re-fold event by event (slowly: only on failure) to name the event that breaks the fold."""
    job: Job | None = None
    for row in history:
        try:
            job = apply(job, _recorded(row))
        except IllegalTransition as exc:
            return ReplayError(row[_J_UUID], row[_VERSION], f"{exc.rule}: {exc.message}")
        except ValueError as exc:
            return ReplayError(row[_J_UUID], row[_VERSION], f"undecodable event: {exc}")
    return ReplayError(history[0][_J_UUID], history[-1][_VERSION], "the events do not fold")


# ---------------------------------------------------------------------------------------------------------
# Rebuild
# ---------------------------------------------------------------------------------------------------------
def _encode_jsonb_binary(value: Any) -> bytes:
    return b"\x01" + msgspec.json.encode(value)


def _decode_jsonb_binary(data: bytes) -> Any:
    return msgspec.json.decode(data[1:])


@asynccontextmanager
async def _binary_jsonb(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """Use jsonb's binary wire format on ``conn`` for the duration (COPY is binary; the pool's codec is text)."""
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=_encode_jsonb_binary,
        decoder=_decode_jsonb_binary,
        format="binary",
    )
    try:
        yield
    finally:
        if not conn.is_closed():
            await init_connection(conn)  # back to the pool's codecs before the connection goes back


async def rebuild_read_model(pool: asyncpg.Pool) -> RebuildReport:
    """Replace every row of the ``jobs`` read model with the fold of that job's events.

    Safe while the service writes: the ``jobs`` table is locked before the snapshot is taken, and every
    writer touches ``jobs`` in the statement (and transaction) that appends its events, so no event can
    commit unseen by the snapshot yet before the new rows. Readers and writers wait for the rebuild (up to
    their lock timeout). Raises ``ReplayError``, changing nothing, if some job's events do not fold.
    """
    started = time.perf_counter()
    events = 0
    async with pool.acquire() as conn, _binary_jsonb(conn), conn.transaction(isolation="repeatable_read"):
        # LOCK takes no snapshot; the REPEATABLE READ snapshot is taken by the next query, after the lock is held.
        await conn.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
        await conn.execute(_NO_TIMEOUTS)
        indexes = await _secondary_indexes(conn)
        await conn.execute("TRUNCATE jobs")
        # Filling the table and then building each index in one sorted pass beats updating them row by row.
        for name, _ in indexes:
            await conn.execute(f"DROP INDEX {name}")
        rows = _RowWriter(conn)
        batches = _history_batches(conn, read_ahead=True, when_idle=lambda: rows.flush(COPY_BATCH))
        async with aclosing(batches):
            async for histories in batches:
                for history in histories:
                    rows.append(_replay(history))
                    events += len(history)
        await rows.flush()
        for _, definition in indexes:
            await conn.execute(definition)
    return RebuildReport(jobs=rows.written, events=events, seconds=round(time.perf_counter() - started, 3))


class _RowWriter:
    """Read-model rows on their way into ``jobs``, COPYed a batch at a time."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.pending: list[tuple[Any, ...]] = []
        self.written = 0

    def append(self, row: tuple[Any, ...]) -> None:
        self.pending.append(row)

    async def flush(self, at_least: int = 1) -> None:
        """COPY the pending rows if there are at least ``at_least`` of them."""
        if len(self.pending) >= max(at_least, 1):
            await self.conn.copy_records_to_table(
                "jobs", records=self.pending, columns=ALL_COLUMNS, timeout=_LONG_CALL_SECONDS
            )
            self.written += len(self.pending)
            self.pending = []


async def _secondary_indexes(conn: asyncpg.Connection) -> list[tuple[str, str]]:
    """(name, CREATE INDEX statement) of each index on ``jobs`` that no constraint owns."""
    rows = await conn.fetch(SECONDARY_INDEXES)
    return [(row["name"], row["definition"]) for row in rows]


# ---------------------------------------------------------------------------------------------------------
# Check
# ---------------------------------------------------------------------------------------------------------
async def check_read_model(pool: asyncpg.Pool) -> Difference | None:
    """Compare the read model with a fresh replay of the events, changing nothing.

    A streaming merge of the ``jobs`` rows and the events' jobs, both in uuid order, within one snapshot.
    Every column must match, including the ``last_hash``/``last_recorded_at`` bookkeeping. Returns the first
    ``Difference`` in uuid order, or None when the read model is exactly the replay.
    """
    async with (
        pool.acquire() as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
        aclosing(_histories(conn)) as histories,
        aclosing(_job_rows(conn)) as job_rows,
    ):
        await conn.execute(_NO_TIMEOUTS)
        history = await anext(histories, None)
        row = await anext(job_rows, None)
        while history is not None or row is not None:
            if history is None or row is None:
                return _unmatched(history, row)
            replayed_uuid, stored_uuid = history[0][_J_UUID], row["uuid"]
            if replayed_uuid != stored_uuid:
                # Only the database knows its collation's order; this runs once, at the first difference.
                if await conn.fetchval("SELECT $1::text < $2::text", replayed_uuid, stored_uuid):
                    return Difference(job_uuid=replayed_uuid, problem="missing")
                return Difference(job_uuid=stored_uuid, problem="extra")
            difference = replay_difference(history, row)
            if difference is not None:
                return difference
            history = await anext(histories, None)
            row = await anext(job_rows, None)
    return None


def _unmatched(history: list[asyncpg.Record] | None, row: asyncpg.Record | None) -> Difference:
    if history is not None:
        return Difference(job_uuid=history[0][_J_UUID], problem="missing")
    assert row is not None
    return Difference(job_uuid=row["uuid"], problem="extra")


def replay_difference(
    history: Sequence[asyncpg.Record], row: asyncpg.Record, *, floats_marked: bool = False
) -> Difference | None:
    """The difference between one job's replay and its stored row, if any (``floats_marked`` as in ``_replay``)."""
    try:
        expected = _replay(history, floats_marked=floats_marked)
    except ReplayError as exc:
        return Difference(job_uuid=exc.job_uuid, problem="unreplayable", detail=str(exc))
    stored = tuple(row)  # a SELECT_JOBS row: the values of ALL_COLUMNS, in order
    if (
        expected == stored
        and list(map(type, expected)) == list(map(type, stored))
        and all(same_json(expected[i], stored[i]) for i in _JSONB_INDEXES)
    ):
        return None  # the usual case, checked in bulk; it implies _same for every column
    differing = tuple(
        name for name, value in zip(ALL_COLUMNS, expected, strict=True) if not _same(name, value, row[name])
    )
    if differing:
        return Difference(job_uuid=row["uuid"], problem="attributes", attributes=differing)
    return None


def _same(column: str, expected: Any, stored: Any) -> bool:
    """Exact equality: Python's ``==`` would take ``1`` for ``True`` or ``1.0`` inside a jsonb value."""
    if column in _JSONB_COLUMNS:
        return same_json(expected, stored)
    if isinstance(expected, datetime) or isinstance(stored, datetime):
        return isinstance(expected, datetime) and isinstance(stored, datetime) and expected == stored
    return type(expected) is type(stored) and expected == stored


# ---------------------------------------------------------------------------------------------------------
# Hash chains
# ---------------------------------------------------------------------------------------------------------
async def verify_job_chains(pool: asyncpg.Pool) -> ChainBreak | None:
    """Recompute every event's hash from its stored columns and check each job's chain.

    Per job, versions must run 1, 2, ..., n; version 1 must link to ``GENESIS_HASH`` and every later event
    to its predecessor's hash; every stored hash must equal ``ledger.hashing.event_hash`` of the stored
    event. Streams the events in one snapshot. Returns the first ``ChainBreak``, or None.
    """
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        await conn.execute(_NO_TIMEOUTS)
        async with aclosing(_history_batches(conn, read_ahead=True)) as batches:
            async for histories in batches:
                for history in histories:
                    broken = _check_chain(history)
                    if broken is not None:
                        return broken
    return None


def _check_chain(history: Sequence[asyncpg.Record]) -> ChainBreak | None:
    """The first break in one job's chain of event rows, or None."""
    expected_prev = GENESIS_HASH
    for expected_version, row in enumerate(history, start=1):
        problem: ChainProblem | None = None
        if row[_VERSION] != expected_version:
            problem, detail = "version", f"expected version {expected_version}"
        elif row[_PREV] != expected_prev:
            problem, detail = "prev_hash", f"prev_hash {row[_PREV]} is not the previous hash {expected_prev}"
        else:
            actual = stored_event_hash(row)
            if actual != row[_HASH]:
                problem, detail = "hash", f"stored hash {row[_HASH]} but the event hashes to {actual}"
        if problem is not None:
            return ChainBreak(
                job_uuid=row[_J_UUID], version=row[_VERSION], event_id=row[_ID], problem=problem, detail=detail
            )
        expected_prev = row[_HASH]
    return None


def stored_event_hash(row: Sequence[Any], *, floats_marked: bool = False) -> str:
    """The recomputed hash of an event row (its first columns those of ``EVENT_COLUMNS``), or why it has none.

    ``floats_marked``: the row's ``data`` was read with ``ledger.hashing.decode_marking_floats``.
    """
    try:
        return event_hash(
            job_uuid=row[_J_UUID],
            version=row[_VERSION],
            event_type=row[_TYPE],
            data=row[_DATA],
            actor_user_uuid=row[_ACTOR],
            actor_client_uuid=row[_CLIENT],
            request_id=row[_REQUEST],
            recorded_at=timestamp_text(row[_AT]),
            prev_hash=row[_PREV],
            floats_marked=floats_marked,
        )
    except (UnhashableValue, TypeError, ValueError) as exc:
        return f"<unhashable: {exc}>"


__all__ = [
    "EVENT_COLUMNS",
    "ChainBreak",
    "Difference",
    "RebuildReport",
    "ReplayError",
    "check_read_model",
    "rebuild_read_model",
    "replay_difference",
    "split_histories",
    "stored_event_hash",
    "timestamp_text",
    "verify_job_chains",
]
