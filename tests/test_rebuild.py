"""Rebuilding, checking and verifying the read model and hash chains, against a real concurrent workload.

Several tasks drive many jobs through ``JobService`` at once (every command kind, some of them refused), while
the read model is checked and rebuilt underneath them. Afterwards the read model must equal a replay of the
events, every chain must verify, a corrupted row must be named exactly, and a rebuild must repair it.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Final

import asyncpg
import pytest

from ledger.access import Caller
from ledger.errors import DomainError
from ledger.hashing import GENESIS_HASH, event_hash
from ledger.rebuild import (
    ChainBreak,
    Difference,
    RebuildReport,
    ReplayError,
    check_read_model,
    rebuild_read_model,
    verify_job_chains,
)
from ledger.service import Contention, JobService
from ledger.store import APPEND_ONE, EventStore, seal
from projections.job import Recorded, Updated, apply
from projections.readmodel import ALL_COLUMNS, job_to_row
from projections.timefmt import format_ts, now_ts, parse_ts

USERS: Final = tuple(Caller(user_uuid=f"zzzzz-tpzed-{n:015d}", role="user") for n in range(1, 4))
DISPATCHERS: Final = tuple(Caller(user_uuid=f"zzzzz-tpzed-{n:015d}", role="dispatcher") for n in range(11, 13))
ADMIN: Final = Caller(user_uuid="zzzzz-tpzed-000000000000099", role="admin")
COMMIT: Final = "0123456789abcdef0123456789abcdef01234567"
COMMANDS: Final = ("create", "update", "lock", "unlock", "start", "cancel", "finish")
TASKS: Final = 8
STEPS_PER_TASK: Final = 45
SELECT_ALL_JOBS: Final = f"SELECT {', '.join(ALL_COLUMNS)} FROM jobs ORDER BY uuid"


# ---------------------------------------------------------------------------------------------------------
# The workload
# ---------------------------------------------------------------------------------------------------------
class Workload:
    """Random commands from several concurrent clients; counts what succeeded and what was refused."""

    def __init__(self, service: JobService, seed: int) -> None:
        self.service = service
        self.seed = seed
        self.jobs: list[str] = []
        self.outcomes: Counter[tuple[str, str]] = Counter()

    async def run(self, tasks: int, steps: int) -> None:
        """``tasks`` clients, each issuing ``steps`` commands."""
        for n in range(4):  # some jobs to work on from the first step
            await self.create(random.Random(self.seed - n))
        await asyncio.gather(*(self.client(random.Random(self.seed * 1000 + n), steps) for n in range(tasks)))

    async def client(self, rng: random.Random, steps: int) -> None:
        handlers: dict[str, Callable[[random.Random], Awaitable[Any]]] = {
            "create": self.create,
            "update": self.update,
            "lock": self.lock,
            "unlock": self.unlock,
            "start": self.start,
            "cancel": self.cancel,
            "finish": self.finish,
        }
        for _ in range(steps):
            command = rng.choices(COMMANDS, weights=(3, 2, 3, 1, 3, 1, 3))[0]
            try:
                await handlers[command](rng)
            except (DomainError, Contention) as exc:
                self.outcomes[command, type(exc).__name__] += 1
            else:
                self.outcomes[command, "ok"] += 1

    async def create(self, rng: random.Random) -> None:
        # Few distinct parameter sets and submit_ids, so reuse, retries and submit_id conflicts all happen.
        job, created = await self.service.create(
            rng.choice(USERS),
            script_name=rng.choice(("hash", "sort")),
            script_version=rng.choice(("main", COMMIT)),
            script_parameters={"n": rng.randrange(3)},
            priority=rng.randrange(3),
            resource_limits={"min_nodes": 1},
            submit_id=rng.choice((None, None, "nightly", "weekly")),
            reuse=rng.random() < 0.7,
        )
        if created:
            self.jobs.append(job.uuid)

    async def pick(self, rng: random.Random, fitting: str = "true") -> str:
        """A job: mostly one ``fitting`` the command (a SQL condition on ``jobs``), so it often succeeds."""
        if rng.random() < 0.6:
            rows = await self.service.store.pool.fetch(f"SELECT uuid FROM jobs WHERE {fitting}")
            if rows:
                return rng.choice(rows)["uuid"]
        return rng.choice(self.jobs)

    async def holder_or_other(self, rng: random.Random, job_uuid: str) -> Caller:
        """Usually the dispatcher holding the job's lock (so start and finish often succeed), sometimes not."""
        job = await self.service.get(ADMIN, job_uuid)
        holders = [d for d in DISPATCHERS if d.user_uuid == job.is_locked_by]
        return holders[0] if holders and rng.random() < 0.85 else rng.choice(DISPATCHERS)

    async def update(self, rng: random.Random) -> None:
        job_uuid = await self.pick(rng, "state = 'Queued'")
        caller = rng.choice((*USERS, ADMIN))
        changes = rng.choice(({"priority": rng.randrange(5)}, {"script_name": rng.choice(("hash", "count"))}))
        await self.service.update(caller, job_uuid, changes)

    async def lock(self, rng: random.Random) -> None:
        job_uuid = await self.pick(rng, "state = 'Queued' AND is_locked_by IS NULL")
        await self.service.lock(rng.choice((*DISPATCHERS, rng.choice(USERS))), job_uuid)

    async def unlock(self, rng: random.Random) -> None:
        job_uuid = await self.pick(rng, "state = 'Queued' AND is_locked_by IS NOT NULL")
        await self.service.unlock(await self.holder_or_other(rng, job_uuid), job_uuid)

    async def start(self, rng: random.Random) -> None:
        job_uuid = await self.pick(rng, "state = 'Queued' AND is_locked_by IS NOT NULL")
        await self.service.start(await self.holder_or_other(rng, job_uuid), job_uuid, script_version=COMMIT)

    async def cancel(self, rng: random.Random) -> None:
        await self.service.cancel(rng.choice((*USERS, *DISPATCHERS)), await self.pick(rng))

    async def finish(self, rng: random.Random) -> None:
        job_uuid = await self.pick(rng, "started_at IS NOT NULL AND finished_at IS NULL")
        caller = await self.holder_or_other(rng, job_uuid)
        await self.service.finish(caller, job_uuid, success=rng.random() < 0.7, output=f"out-{rng.randrange(3)}")


async def maintain(pool: asyncpg.Pool, done: asyncio.Event) -> tuple[int, list[Difference]]:
    """Check and rebuild the read model over and over while the workload runs; return what the checks found."""
    rounds, differences = 0, []
    while not done.is_set():
        difference = await check_read_model(pool)
        if difference is not None:
            differences.append(difference)
        await rebuild_read_model(pool)
        rounds += 1
    return rounds, differences


async def run_workload(pool: asyncpg.Pool, seed: int) -> Workload:
    """The workload, with checks and rebuilds running beside it."""
    workload = Workload(JobService(EventStore(pool)), seed)
    done = asyncio.Event()
    maintenance = asyncio.create_task(maintain(pool, done))
    try:
        await workload.run(TASKS, STEPS_PER_TASK)
    finally:
        done.set()
        rounds, differences = await maintenance
    assert rounds >= 1
    assert differences == [], "a check during writes saw the read model differ from the events"
    return workload


@pytest.fixture
async def worked(pool: asyncpg.Pool) -> Workload:
    """A database after a concurrent workload that exercised every command."""
    workload = await run_workload(pool, seed=20261125)
    succeeded = {command for (command, outcome), count in workload.outcomes.items() if outcome == "ok" and count}
    assert succeeded == set(COMMANDS), workload.outcomes
    assert sum(count for (_, outcome), count in workload.outcomes.items() if outcome != "ok") > 0
    assert await pool.fetchval("SELECT count(*) FROM events WHERE event_type = 'reused'") > 0
    return workload


# ---------------------------------------------------------------------------------------------------------
# After the workload
# ---------------------------------------------------------------------------------------------------------
async def test_workload_leaves_a_consistent_ledger(pool: asyncpg.Pool, worked: Workload) -> None:
    assert await check_read_model(pool) is None
    assert await verify_job_chains(pool) is None
    kinds = {row["event_type"] for row in await pool.fetch("SELECT DISTINCT event_type FROM events")}
    assert kinds == {"submitted", "updated", "locked", "unlocked", "started", "cancelled", "finished", "reused"}


async def a_job(pool: asyncpg.Pool, where: str = "true") -> str:
    """The uuid of some job matching ``where``."""
    uuid = await pool.fetchval(f"SELECT uuid FROM jobs WHERE {where} ORDER BY uuid DESC LIMIT 1")
    assert uuid is not None, where
    return uuid


CORRUPTIONS: Final = [
    ("UPDATE jobs SET priority = priority + 7 WHERE uuid = $1", "true", ("priority",)),
    # jsonb compared exactly: true is not 1, although Python's == says it is.
    ("UPDATE jobs SET script_parameters = '{\"n\": true}' WHERE uuid = $1", "script_parameters = '{\"n\": 1}'", None),
    ("UPDATE jobs SET running = NOT running, etag = 'forged' WHERE uuid = $1", "true", ("running", "etag")),
    ("UPDATE jobs SET is_locked_by = NULL WHERE uuid = $1", "is_locked_by IS NOT NULL", ("is_locked_by",)),
    ("UPDATE jobs SET last_hash = repeat('a', 64) WHERE uuid = $1", "true", ("last_hash",)),
    (
        "UPDATE jobs SET last_recorded_at = last_recorded_at + interval '1 microsecond' WHERE uuid = $1",
        "true",
        ("last_recorded_at",),
    ),
]


async def test_check_names_a_corrupted_row_and_rebuild_repairs_it(pool: asyncpg.Pool, worked: Workload) -> None:
    original = await pool.fetch(SELECT_ALL_JOBS)
    events = await pool.fetchval("SELECT count(*) FROM events")
    for statement, where, attributes in CORRUPTIONS:
        uuid = await a_job(pool, where)
        assert await pool.execute(statement, uuid) == "UPDATE 1"  # the read model is not append-only
        expected = Difference(job_uuid=uuid, problem="attributes", attributes=attributes or ("script_parameters",))
        assert await check_read_model(pool) == expected
        report = await rebuild_read_model(pool)
        assert (report.jobs, report.events) == (len(original), events)
        assert await check_read_model(pool) is None
        assert await pool.fetch(SELECT_ALL_JOBS) == original


async def test_check_names_a_missing_or_extra_row(pool: asyncpg.Pool, worked: Workload) -> None:
    original = await pool.fetch(SELECT_ALL_JOBS)
    missing = await a_job(pool, "submit_id IS NULL")  # copies of it must not collide on (owner, submit_id)
    await pool.execute("DELETE FROM jobs WHERE uuid = $1", missing)
    assert await check_read_model(pool) == Difference(job_uuid=missing, problem="missing")
    await rebuild_read_model(pool)
    assert await pool.fetch(SELECT_ALL_JOBS) == original

    for extra in ("zzzzz-8i9sb-000000000000000", "zzzzz-8i9sb-zzzzzzzzzzzzzzz"):  # before and after every job
        columns = ", ".join(ALL_COLUMNS[1:])
        await pool.execute(
            f"INSERT INTO jobs (uuid, {columns}) SELECT $1, {columns} FROM jobs WHERE uuid = $2",
            extra,
            missing,
        )
        assert await check_read_model(pool) == Difference(job_uuid=extra, problem="extra")
        await rebuild_read_model(pool)
        assert await pool.fetch(SELECT_ALL_JOBS) == original


async def test_rebuild_is_idempotent(pool: asyncpg.Pool, worked: Workload) -> None:
    original = await pool.fetch(SELECT_ALL_JOBS)
    first = await rebuild_read_model(pool)
    assert await pool.fetch(SELECT_ALL_JOBS) == original
    second = await rebuild_read_model(pool)
    assert await pool.fetch(SELECT_ALL_JOBS) == original
    assert (first.jobs, first.events) == (second.jobs, second.events) == (len(original), first.events)
    assert first.events == await pool.fetchval("SELECT count(*) FROM events")
    # The indexes the rebuild dropped for speed are all back.
    indexes = {
        row["indexname"] for row in await pool.fetch("SELECT indexname FROM pg_indexes WHERE tablename = 'jobs'")
    }
    assert {"jobs_pkey", "jobs_owner_submit_id", "jobs_queue", "jobs_identity", "jobs_modified_at"} <= indexes


async def test_rebuild_of_nothing(pool: asyncpg.Pool) -> None:
    assert await check_read_model(pool) is None
    assert await verify_job_chains(pool) is None
    report = await rebuild_read_model(pool)
    assert (report.jobs, report.events) == (0, 0)
    assert isinstance(report, RebuildReport)


# ---------------------------------------------------------------------------------------------------------
# The rebuild's snapshot comes after its lock
# ---------------------------------------------------------------------------------------------------------
async def test_rebuild_waits_for_a_writer_and_sees_its_event(pool: asyncpg.Pool) -> None:
    service = JobService(EventStore(pool))
    owner = USERS[0]
    job, _ = await service.create(owner, script_name="hash", script_version="main", script_parameters={"n": 1})
    stored = await service.store.get_job(job.uuid)
    assert stored is not None
    rec = Recorded(
        job_uuid=job.uuid,
        version=2,
        event=Updated(priority=4),
        actor_user_uuid=owner.user_uuid,
        actor_client_uuid=None,
        request_id="writer",
        recorded_at=max(now_ts(), stored.last_recorded_at),
    )
    updated = apply(job, rec)
    (sealed,) = seal([rec], stored.last_hash)
    args = (rec.job_uuid, 2, "updated", sealed.data, rec.actor_user_uuid, None, "writer", parse_ts(rec.recorded_at))
    async with pool.acquire() as writer:
        transaction = writer.transaction()
        await transaction.start()
        # The writer's statement has appended the event and rewritten the row, but not committed yet.
        await writer.execute(
            APPEND_ONE, *args, sealed.prev_hash, sealed.hash, *job_to_row(updated, sealed.hash, rec.recorded_at)
        )
        rebuild = asyncio.create_task(rebuild_read_model(pool))
        await wait_until_blocked_on_jobs(pool)
        await transaction.commit()
    await rebuild
    assert await check_read_model(pool) is None
    rebuilt = await service.get(owner, job.uuid)
    assert (rebuilt.version, rebuilt.priority) == (2, 4)


async def wait_until_blocked_on_jobs(pool: asyncpg.Pool) -> None:
    """Return once some session waits for a lock on ``jobs`` (polling the lock table, for at most 10 s)."""
    query = "SELECT count(*) FROM pg_locks WHERE relation = 'jobs'::regclass AND NOT granted"
    for _ in range(2000):
        if await pool.fetchval(query):
            return
        await asyncio.sleep(0.005)
    raise AssertionError("nobody waited for a lock on jobs")


# ---------------------------------------------------------------------------------------------------------
# Tampering by someone who can bypass the database's guards (a superuser disabling the triggers)
# ---------------------------------------------------------------------------------------------------------
async def tamper(pool: asyncpg.Pool, statement: str, *args: Any) -> None:
    """Run ``statement`` against ``events`` with its guard triggers disabled, as only a superuser could."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")  # user triggers do not fire
        await conn.execute(statement, *args)


async def second_event(pool: asyncpg.Pool) -> asyncpg.Record:
    """Some job's event 2 (of a job that has an event 3 after it)."""
    row = await pool.fetchrow(
        "SELECT e.* FROM events e JOIN events later ON later.job_uuid = e.job_uuid AND later.version = 3 "
        "WHERE e.version = 2 ORDER BY e.job_uuid LIMIT 1"
    )
    assert row is not None
    return row


def rehash(row: asyncpg.Record, **changes: Any) -> str:
    """The hash ``row`` would have with ``changes``."""
    fields = {name: row[name] for name in ("job_uuid", "version", "event_type", "data", "actor_user_uuid")}
    fields |= {"actor_client_uuid": row["actor_client_uuid"], "request_id": row["request_id"]}
    fields |= {"recorded_at": format_ts(row["recorded_at"]), "prev_hash": row["prev_hash"], **changes}
    return event_hash(**fields)


async def test_verify_finds_an_altered_event(pool: asyncpg.Pool, worked: Workload) -> None:
    row = await second_event(pool)
    await tamper(pool, "UPDATE events SET request_id = 'forged' WHERE id = $1", row["id"])
    broken = await verify_job_chains(pool)
    assert isinstance(broken, ChainBreak)
    assert (broken.job_uuid, broken.version, broken.event_id, broken.problem) == (
        row["job_uuid"],
        2,
        row["id"],
        "hash",
    )


async def test_verify_finds_a_relinked_event(pool: asyncpg.Pool, worked: Workload) -> None:
    # Event 2 replaced by a self-consistent forgery: its own hash checks out, but event 3 no longer links to it.
    row = await second_event(pool)
    forged = rehash(row, request_id="forged")
    await tamper(pool, "UPDATE events SET request_id = 'forged', hash = $2 WHERE id = $1", row["id"], forged)
    broken = await verify_job_chains(pool)
    assert broken is not None
    assert (broken.job_uuid, broken.version, broken.problem) == (row["job_uuid"], 3, "prev_hash")


async def test_verify_finds_a_removed_event(pool: asyncpg.Pool, worked: Workload) -> None:
    row = await second_event(pool)
    await tamper(pool, "DELETE FROM events WHERE id = $1", row["id"])
    broken = await verify_job_chains(pool)
    assert broken is not None
    assert (broken.job_uuid, broken.version, broken.problem) == (row["job_uuid"], 3, "version")


async def test_verify_finds_a_first_event_off_genesis(pool: asyncpg.Pool, worked: Workload) -> None:
    row = await pool.fetchrow("SELECT * FROM events WHERE version = 1 ORDER BY job_uuid DESC LIMIT 1")
    assert row is not None
    forged_prev = "1" * 64
    forged = rehash(row, prev_hash=forged_prev)
    await tamper(pool, "UPDATE events SET prev_hash = $2, hash = $3 WHERE id = $1", row["id"], forged_prev, forged)
    broken = await verify_job_chains(pool)
    assert broken is not None
    assert (broken.job_uuid, broken.version, broken.problem) == (row["job_uuid"], 1, "prev_hash")
    assert GENESIS_HASH in broken.detail


async def test_rebuild_refuses_an_unfoldable_history_and_changes_nothing(pool: asyncpg.Pool, worked: Workload) -> None:
    row = await pool.fetchrow(
        "SELECT * FROM events WHERE version = 2 AND event_type <> 'reused' ORDER BY job_uuid LIMIT 1"
    )
    assert row is not None
    await tamper(pool, "UPDATE events SET event_type = 'submitted' WHERE id = $1", row["id"])
    original = await pool.fetch(SELECT_ALL_JOBS)
    with pytest.raises(ReplayError) as refused:
        await rebuild_read_model(pool)
    assert (refused.value.job_uuid, refused.value.version) == (row["job_uuid"], 2)
    assert await pool.fetch(SELECT_ALL_JOBS) == original
    difference = await check_read_model(pool)
    assert difference is not None
    assert (difference.job_uuid, difference.problem) == (row["job_uuid"], "unreplayable")


async def test_check_sees_an_altered_event_through_the_fold(pool: asyncpg.Pool, worked: Workload) -> None:
    # Tampering with an event's data changes what the job folds to: the read model no longer matches. The event
    # altered is a job's last priority update, so the job's final priority is the forged one.
    row = await pool.fetchrow(
        "SELECT e.* FROM events e WHERE e.event_type = 'updated' AND e.data ? 'priority' AND NOT EXISTS ("
        "  SELECT 1 FROM events later WHERE later.job_uuid = e.job_uuid AND later.version > e.version"
        "  AND later.event_type = 'updated' AND later.data ? 'priority'"
        ") ORDER BY e.job_uuid LIMIT 1"
    )
    assert row is not None, "the workload made no priority update"
    await tamper(pool, "UPDATE events SET data = jsonb_set(data, '{priority}', '99') WHERE id = $1", row["id"])
    difference = await check_read_model(pool)
    assert difference == Difference(job_uuid=row["job_uuid"], problem="attributes", attributes=("priority", "etag"))
