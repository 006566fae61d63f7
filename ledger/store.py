"""The event store: appending a job's events together with its read-model row, and reading them back.

This module knows SQL and nothing of HTTP. Every append is one statement (a data-modifying CTE), so the
events and the read-model row they produce commit together or not at all, in a single round trip.
Conflicts are decided by PostgreSQL's constraints and turned into the domain errors below; callers never
see a raw asyncpg exception for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Final

import asyncpg
import msgspec

from ledger.hashing import GENESIS_HASH, event_hash
from projections.job import Job, Recorded, decode_event, event_data, event_type
from projections.readmodel import ALL_COLUMNS, JOB_COLUMNS, job_to_row, row_to_job
from projections.timefmt import format_ts, parse_ts


class StoreError(Exception):
    """Base of the store's domain errors."""


class StaleVersion(StoreError):
    """Another writer appended to the job first; reload it and decide again."""

    def __init__(self, job_uuid: str, expected_version: int) -> None:
        super().__init__(f"job {job_uuid} is no longer at version {expected_version}")
        self.job_uuid = job_uuid
        self.expected_version = expected_version


class SubmitIdTaken(StoreError):
    """The owner already has a job with this submit_id."""

    def __init__(self, owner_uuid: str, submit_id: str) -> None:
        super().__init__(f"submit_id {submit_id!r} is already used by another job of {owner_uuid}")
        self.owner_uuid = owner_uuid
        self.submit_id = submit_id


class ChainViolation(StoreError):
    """An append that would break the job's hash chain or time order (a bug in the caller)."""


class StoredEvent(msgspec.Struct, frozen=True, tag_field="kind", tag="orvos#event"):
    """An event as the ledger holds it: the envelope, its hashes, and its global position once sequenced.

    Encoded, it is the API's ``orvos#event`` (the tag is written first). Fields are positional too, in the
    order of the stream's page query, so a page of rows becomes events without a keyword per field.
    """

    id: int
    position: int | None
    job_uuid: str
    version: int
    event_type: str
    data: dict[str, Any]
    actor_user_uuid: str
    actor_client_uuid: str | None
    request_id: str
    recorded_at: str
    prev_hash: str
    hash: str

    def to_recorded(self) -> Recorded:
        """The domain view of this event, for folding."""
        return Recorded(
            job_uuid=self.job_uuid,
            version=self.version,
            event=decode_event(self.event_type, self.data),
            actor_user_uuid=self.actor_user_uuid,
            actor_client_uuid=self.actor_client_uuid,
            request_id=self.request_id,
            recorded_at=self.recorded_at,
        )


class JobRecord(msgspec.Struct, kw_only=True, frozen=True):
    """A read-model row: the job, plus what the next append to it must chain onto."""

    job: Job
    last_hash: str
    last_recorded_at: str


class SealedEvent(msgspec.Struct, kw_only=True, frozen=True):
    """An event ready to append: its envelope, stored data and hashes."""

    record: Recorded
    event_type: str
    data: dict[str, Any]
    prev_hash: str
    hash: str


def seal(records: Sequence[Recorded], prev_hash: str) -> list[SealedEvent]:
    """Compute the stored form and chained hashes of consecutive events following ``prev_hash``."""
    sealed = []
    for rec in records:
        kind = event_type(rec.event)
        data = event_data(rec.event)
        digest = event_hash(
            job_uuid=rec.job_uuid,
            version=rec.version,
            event_type=kind,
            data=data,
            actor_user_uuid=rec.actor_user_uuid,
            actor_client_uuid=rec.actor_client_uuid,
            request_id=rec.request_id,
            recorded_at=rec.recorded_at,
            prev_hash=prev_hash,
        )
        sealed.append(SealedEvent(record=rec, event_type=kind, data=data, prev_hash=prev_hash, hash=digest))
        prev_hash = digest
    return sealed


_EVENT_COLUMNS: Final = (
    "job_uuid, version, event_type, data, actor_user_uuid, actor_client_uuid, request_id, recorded_at, prev_hash, hash"
)
_N_EVENT: Final = 10


def _params(first: int, count: int) -> str:
    return ", ".join(f"${i}" for i in range(first, first + count))


def _upsert_job(first_param: int, where: str = "") -> str:
    """Insert or replace a read-model row; its values are parameters ``$first_param`` onwards (if ``where``)."""
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in ALL_COLUMNS if c != "uuid")
    values = _params(first_param, len(ALL_COLUMNS))
    source = f"SELECT {values} {where}" if where else f"VALUES ({values})"
    return f"INSERT INTO jobs ({', '.join(ALL_COLUMNS)}) {source} ON CONFLICT (uuid) DO UPDATE SET {updates}"


def _find_identical(first_param: int) -> str:
    """Candidates for reuse (CONTRACT §4), found through the jobs_identity index: finished jobs anyone readable,
    unfinished ones only the caller's own. Parameters from ``$first_param``: script name, parameter digest,
    script version, the caller's uuid, whether the caller reads everything."""
    name, digest, version, owner, everyone = (f"${n}" for n in range(first_param, first_param + 5))
    return (
        f"SELECT {', '.join(ALL_COLUMNS)} FROM jobs "
        f"WHERE script_name = {name} AND script_parameters_digest = {digest} AND script_version = {version} "
        f"AND (state = 'Complete' OR (state IN ('Queued', 'Running') AND owner_uuid = {owner})) "
        f"AND ({everyone} OR owner_uuid = {owner}) "
        "ORDER BY created_at, uuid LIMIT 50"
    )


INSERT_EVENT: Final = f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES ({_params(1, _N_EVENT)}) RETURNING id"
UPSERT_JOB: Final = _upsert_job(1)
# One event and its read-model row, in one statement: both commit or neither does, in one round trip.
APPEND_ONE: Final = f"WITH appended AS ({INSERT_EVENT}) {_upsert_job(_N_EVENT + 1)} RETURNING (SELECT id FROM appended)"
_SELECT_EVENT: Final = (
    "SELECT e.id, p.position, e.job_uuid, e.version, e.event_type, e.data, e.actor_user_uuid, "
    "e.actor_client_uuid, e.request_id, e.recorded_at, e.prev_hash, e.hash "
    "FROM events e LEFT JOIN event_positions p ON p.event_id = e.id "
)
LOAD_JOB_EVENTS: Final = _SELECT_EVENT + "WHERE e.job_uuid = $1 AND e.version <= $2 ORDER BY e.version"
LOAD_JOB_EVENTS_UNTIL: Final = _SELECT_EVENT + "WHERE e.job_uuid = $1 AND e.recorded_at <= $2 ORDER BY e.version"
GET_JOB: Final = f"SELECT {', '.join(ALL_COLUMNS)} FROM jobs WHERE uuid = $1"
FIND_IDENTICAL: Final = _find_identical(1)
_DIGEST_COLUMN: Final = ALL_COLUMNS.index("script_parameters_digest")
_UNLESS_FOUND: Final = "WHERE NOT EXISTS (SELECT 1 FROM candidates)"
# A new job's append guarded by the reuse look-up, in one statement and one snapshot: the candidates come back,
# and the event and the row are written only if there are none (CONTRACT §4's usual case: one round trip).
APPEND_UNLESS_IDENTICAL: Final = (
    f"WITH candidates AS ({_find_identical(_N_EVENT + len(ALL_COLUMNS) + 1)}), "
    f"appended AS (INSERT INTO events ({_EVENT_COLUMNS}) SELECT {_params(1, _N_EVENT)} {_UNLESS_FOUND} RETURNING id), "
    f"upserted AS ({_upsert_job(_N_EVENT + 1, _UNLESS_FOUND)} RETURNING uuid) "
    "SELECT * FROM candidates"
)
# Identical submissions (same script, version and parameter digest: CONTRACT §4's identity, not the owner's)
# queue behind one another until the first commits, so the second's look-up finds the first's job. The lock is
# transaction-scoped: it is released with the commit that makes the new job visible.
# An array's text form quotes its elements, so distinct identities never join into the same key text.
LOCK_IDENTITY: Final = "SELECT pg_advisory_xact_lock(hashtextextended(ARRAY[$1::text, $2::text, $3::text]::text, 0))"
GET_JOB_BY_SUBMIT_ID: Final = f"SELECT {', '.join(ALL_COLUMNS)} FROM jobs WHERE owner_uuid = $1 AND submit_id = $2"


def event_args(sealed: SealedEvent) -> tuple[Any, ...]:
    """The parameters of ``INSERT_EVENT`` (and the first ten of ``APPEND_ONE``) for a sealed event."""
    rec = sealed.record
    return (
        rec.job_uuid,
        rec.version,
        sealed.event_type,
        sealed.data,
        rec.actor_user_uuid,
        rec.actor_client_uuid,
        rec.request_id,
        parse_ts(rec.recorded_at),
        sealed.prev_hash,
        sealed.hash,
    )


def stored_event(row: asyncpg.Record) -> StoredEvent:
    """A ``StoredEvent`` from a row selected with the columns of ``_SELECT_EVENT``."""
    return StoredEvent(
        id=row["id"],
        position=row["position"],
        job_uuid=row["job_uuid"],
        version=row["version"],
        event_type=row["event_type"],
        data=row["data"],
        actor_user_uuid=row["actor_user_uuid"],
        actor_client_uuid=row["actor_client_uuid"],
        request_id=row["request_id"],
        recorded_at=format_ts(row["recorded_at"]),
        prev_hash=row["prev_hash"],
        hash=row["hash"],
    )


def job_record(row: asyncpg.Record) -> JobRecord:
    """A ``JobRecord`` from a ``jobs`` row."""
    return JobRecord(
        job=row_to_job(row), last_hash=row["last_hash"], last_recorded_at=format_ts(row["last_recorded_at"])
    )


@contextmanager
def _domain_errors(job: Job, expected_version: int) -> Iterator[None]:
    """PostgreSQL's verdicts on an append, as the store's domain errors."""
    try:
        yield
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name == "events_job_version_key":
            raise StaleVersion(job.uuid, expected_version) from None
        if exc.constraint_name == "jobs_owner_submit_id":
            raise SubmitIdTaken(job.owner_uuid, job.submit_id or "") from None
        raise
    except asyncpg.CheckViolationError as exc:
        if exc.constraint_name in ("events_job_chain", "events_job_time"):
            # A predecessor vanished from under us can only mean a concurrent writer; anything else is a bug.
            raise ChainViolation(str(exc)) from exc
        raise


class EventStore:
    """Appends and reads job events and the current-jobs read model."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        # Called after each committed append (the sequencer's wake-up); must be cheap and must not raise.
        self.on_append: Callable[[], None] | None = None

    async def append(
        self, job_uuid: str, expected_version: int, prev_hash: str, records: Sequence[Recorded], job: Job
    ) -> list[SealedEvent]:
        """Append ``records`` to a job at ``expected_version`` and store ``job`` (their fold) as its row.

        ``prev_hash`` is the hash of the job's event ``expected_version`` (``GENESIS_HASH`` for a new job).
        Raises ``StaleVersion`` if another writer got there first, ``SubmitIdTaken`` on a duplicate
        submit_id. Nothing is written when it raises.
        """
        if not records:
            raise ValueError("nothing to append")
        for offset, rec in enumerate(records, start=1):
            if rec.job_uuid != job_uuid or rec.version != expected_version + offset:
                raise ValueError("records must be the job's next consecutive versions")
        if expected_version == 0 and prev_hash != GENESIS_HASH:
            raise ValueError("a new job's first event links to the genesis hash")
        sealed = seal(records, prev_hash)
        row = job_to_row(job, sealed[-1].hash, records[-1].recorded_at)
        with _domain_errors(job, expected_version):
            if len(sealed) == 1:
                await self.pool.execute(APPEND_ONE, *event_args(sealed[0]), *row)
            else:
                async with self.pool.acquire() as conn, conn.transaction():
                    for item in sealed:
                        await conn.execute(INSERT_EVENT, *event_args(item))
                    await conn.execute(UPSERT_JOB, *row)
        if self.on_append is not None:
            self.on_append()
        return sealed

    async def create_unless_identical(self, record: Recorded, job: Job, *, readable_by_all: bool) -> list[JobRecord]:
        """Append a new job's first event (``record``, folding to ``job``) unless the reuse look-up finds one.

        Returns the candidates ``find_identical`` would (for the job's owner): when there are any, nothing
        was written. Raises as ``append`` does.
        """
        if record.version != 1:
            raise ValueError("a new job's first event is version 1")
        (sealed,) = seal([record], GENESIS_HASH)
        row = job_to_row(job, sealed.hash, record.recorded_at)
        digest = row[_DIGEST_COLUMN]  # computed once, for the row and the look-up
        look_up = (job.script_name, digest, job.script_version, job.owner_uuid, readable_by_all)
        with _domain_errors(job, 0):
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(LOCK_IDENTITY, job.script_name, job.script_version, digest)
                # READ COMMITTED: this statement's snapshot is taken after the lock, so it sees the job of an
                # identical submission that held the lock before us.
                rows = await conn.fetch(APPEND_UNLESS_IDENTICAL, *event_args(sealed), *row, *look_up)
        if rows:
            return [job_record(found) for found in rows]
        if self.on_append is not None:
            self.on_append()
        return []

    async def get_job(self, job_uuid: str) -> JobRecord | None:
        """The job's read-model row, or None."""
        row = await self.pool.fetchrow(GET_JOB, job_uuid)
        return None if row is None else job_record(row)

    async def get_job_by_submit_id(self, owner_uuid: str, submit_id: str) -> JobRecord | None:
        """The owner's job with this submit_id, or None."""
        row = await self.pool.fetchrow(GET_JOB_BY_SUBMIT_ID, owner_uuid, submit_id)
        return None if row is None else job_record(row)

    async def find_identical(
        self,
        *,
        script_name: str,
        parameters_digest: str,
        script_version: str,
        owner_uuid: str,
        readable_by_all: bool,
    ) -> list[JobRecord]:
        """Unfailed jobs with this script, version and parameter digest that the caller may reuse."""
        rows = await self.pool.fetch(
            FIND_IDENTICAL, script_name, parameters_digest, script_version, owner_uuid, readable_by_all
        )
        return [job_record(row) for row in rows]

    async def load_events(self, job_uuid: str, up_to_version: int | None = None) -> list[StoredEvent]:
        """The job's events in version order, up to and including ``up_to_version`` (default: all)."""
        limit = 2**31 - 1 if up_to_version is None else up_to_version
        rows = await self.pool.fetch(LOAD_JOB_EVENTS, job_uuid, limit)
        return [stored_event(row) for row in rows]

    async def load_events_until(self, job_uuid: str, moment: datetime) -> list[StoredEvent]:
        """The job's events recorded at or before ``moment``, in version order."""
        rows = await self.pool.fetch(LOAD_JOB_EVENTS_UNTIL, job_uuid, moment)
        return [stored_event(row) for row in rows]


__all__ = [
    "JOB_COLUMNS",
    "ChainViolation",
    "EventStore",
    "JobRecord",
    "SealedEvent",
    "StaleVersion",
    "StoreError",
    "StoredEvent",
    "SubmitIdTaken",
    "seal",
]
