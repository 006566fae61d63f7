"""The event store against the real PostgreSQL: what the database itself refuses, and appends under contention.

The test connection is a superuser that owns every table: the ledger's guarantees must hold even for it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any, Final

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.access import Caller
from ledger.errors import Invalid
from ledger.hashing import GENESIS_HASH, UnhashableValue, canonical_json, chain_hash, event_hash, normalise
from ledger.sequencer import take_lease
from ledger.service import JobService
from ledger.store import (
    INSERT_EVENT,
    ChainViolation,
    EventStore,
    SealedEvent,
    StaleVersion,
    event_args,
    seal,
)
from projections.job import Event, Job, Locked, Recorded, Submitted, Updated, apply, fold
from projections.timefmt import format_ts, parse_ts

OWNER: Final = "zzzzz-tpzed-000000000owner01"
DISPATCHERS: Final = ("zzzzz-tpzed-00000000disp0001", "zzzzz-tpzed-00000000disp0002")
DOCS: Final = Path(__file__).resolve().parent.parent / "docs" / "ledger-format.md"
_job_numbers = itertools.count(1)


def new_job_uuid() -> str:
    """A job uuid no other test in this process uses."""
    return f"zzzzz-8i9sb-{next(_job_numbers):015d}"


def at(second: int) -> str:
    """A timestamp ``second`` seconds into the test's day."""
    return f"2026-11-25T10:{second // 60:02d}:{second % 60:02d}.000000Z"


def recorded(job_uuid: str, version: int, event: Event, actor: str = OWNER, when: str | None = None) -> Recorded:
    """An event of ``job_uuid``."""
    return Recorded(
        job_uuid=job_uuid,
        version=version,
        event=event,
        actor_user_uuid=actor,
        actor_client_uuid=None,
        request_id=f"req-{version}",
        recorded_at=when or at(version),
    )


def submission(job_uuid: str, parameters: dict[str, Any] | None = None) -> Recorded:
    """The ``submitted`` event that creates ``job_uuid``."""
    event = Submitted(
        owner_uuid=OWNER, script_name="hash", script_version="main", script_parameters=parameters or {"n": 1}
    )
    return recorded(job_uuid, 1, event)


async def create_job(store: EventStore, parameters: dict[str, Any] | None = None) -> tuple[Job, SealedEvent]:
    """Append a new job's first event; return the job and the sealed event."""
    rec = submission(new_job_uuid(), parameters)
    job = fold([rec])
    assert job is not None
    (sealed,) = await store.append(rec.job_uuid, 0, GENESIS_HASH, [rec], job)
    return job, sealed


async def table_contents(pool: asyncpg.Pool) -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
    """Every row of ``events`` and ``event_positions``."""
    events = await pool.fetch("SELECT * FROM events ORDER BY id")
    positions = await pool.fetch("SELECT * FROM event_positions ORDER BY position")
    return events, positions


# ---------------------------------------------------------------------------------------------------------
# Append-only, enforced by PostgreSQL
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
async def sequenced_ledger(pool: asyncpg.Pool, store: EventStore) -> None:
    """Two jobs of two events each, every event given a global position."""
    hashes = []
    for _ in range(2):
        job, first = await create_job(store)
        second = recorded(job.uuid, 2, Updated(priority=5))
        hashes.append(first.hash)
        hashes += [s.hash for s in await store.append(job.uuid, 1, first.hash, [second], apply(job, second))]
    chain = GENESIS_HASH
    ids = [row["id"] for row in await pool.fetch("SELECT id FROM events ORDER BY id")]
    lease, _ = await take_lease(pool, "test", 60_000)  # positions are written only under the lease
    assert lease is not None
    for position, (event_id, digest) in enumerate(zip(ids, hashes, strict=True), start=1):
        chain = chain_hash(chain, position, digest)
        await pool.execute(
            "INSERT INTO event_positions (position, event_id, chain_hash, epoch) VALUES ($1, $2, $3, $4)",
            position,
            event_id,
            chain,
            lease.epoch,
        )


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE events SET request_id = 'forged'",
        "UPDATE events SET data = '{}' WHERE version = 1",
        "DELETE FROM events WHERE version = 2",
        "DELETE FROM events",
        "TRUNCATE events CASCADE",
        "UPDATE event_positions SET chain_hash = repeat('f', 64)",
        "DELETE FROM event_positions WHERE position = 4",
        "TRUNCATE event_positions",
    ],
)
@pytest.mark.usefixtures("sequenced_ledger")
async def test_ledger_tables_are_append_only_even_for_their_owner(pool: asyncpg.Pool, statement: str) -> None:
    assert await pool.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
    assert await pool.fetchval("SELECT tableowner = current_user FROM pg_tables WHERE tablename = 'events'")
    before = await table_contents(pool)
    assert (len(before[0]), len(before[1])) == (4, 4)
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await pool.execute(statement)
    assert await table_contents(pool) == before


# ---------------------------------------------------------------------------------------------------------
# Each job's chain, enforced by PostgreSQL
# ---------------------------------------------------------------------------------------------------------
def resealed(sealed: SealedEvent, **changes: Any) -> SealedEvent:
    """``sealed`` with its record changed as given and ``prev_hash`` possibly replaced, hash recomputed."""
    prev_hash = changes.pop("prev_hash", sealed.prev_hash)
    record = Recorded(**{**{f: getattr(sealed.record, f) for f in Recorded.__struct_fields__}, **changes})
    (fresh,) = seal([record], prev_hash)
    return fresh


@pytest.mark.parametrize(
    ("change", "constraint"),
    [
        ({"prev_hash": "f" * 64}, "events_job_chain"),
        ({"version": 3}, "events_job_chain"),
        ({"recorded_at": "2026-11-25T10:00:00.999999Z"}, "events_job_time"),
    ],
    ids=["wrong-prev-hash", "version-gap", "time-backwards"],
)
async def test_chain_trigger_refuses_a_broken_link(
    pool: asyncpg.Pool, store: EventStore, change: dict[str, Any], constraint: str
) -> None:
    job, first = await create_job(store)  # recorded at 10:00:01
    (good,) = seal([recorded(job.uuid, 2, Locked(), DISPATCHERS[0])], first.hash)
    bad = resealed(good, **change)
    before = await table_contents(pool)
    with pytest.raises(asyncpg.CheckViolationError) as refused:
        await pool.execute(INSERT_EVENT, *event_args(bad))
    assert refused.value.constraint_name == constraint
    assert await table_contents(pool) == before
    await pool.execute(INSERT_EVENT, *event_args(good))  # the honest event still goes in


async def test_first_event_must_link_to_genesis(pool: asyncpg.Pool) -> None:
    (sealed,) = seal([submission(new_job_uuid())], "e" * 64)
    with pytest.raises(asyncpg.CheckViolationError) as refused:
        await pool.execute(INSERT_EVENT, *event_args(sealed))
    assert refused.value.constraint_name == "events_job_chain"
    assert await pool.fetchval("SELECT count(*) FROM events") == 0


async def test_store_reports_a_broken_link_as_chain_violation(pool: asyncpg.Pool, store: EventStore) -> None:
    job, _ = await create_job(store)
    rec = recorded(job.uuid, 2, Locked(), DISPATCHERS[0])
    with pytest.raises(ChainViolation):
        await store.append(job.uuid, 1, "f" * 64, [rec], apply(job, rec))
    stored = await store.get_job(job.uuid)
    assert stored is not None
    assert stored.job == job
    assert await pool.fetchval("SELECT count(*) FROM events") == 1


# ---------------------------------------------------------------------------------------------------------
# Contention
# ---------------------------------------------------------------------------------------------------------
CONTENDERS: Final = 24


async def warm(pool: asyncpg.Pool, connections: int) -> None:
    """Open ``connections`` connections in the pool, so concurrent callers each get their own at once."""
    held = [await pool.acquire() for _ in range(connections)]
    pids = {conn.get_server_pid() for conn in held}
    for conn in held:
        await pool.release(conn)
    assert len(pids) == connections


async def test_concurrent_appends_at_one_version_have_one_winner(pool: asyncpg.Pool, store: EventStore) -> None:
    job, first = await create_job(store)
    last_hash = first.hash
    await warm(pool, CONTENDERS)
    for version in range(2, 6):
        barrier = asyncio.Barrier(CONTENDERS)

        async def contend(
            priority: int, base: Job = job, prev: str = last_hash, at_version: int = version, ready: Any = barrier
        ) -> Any:
            rec = recorded(base.uuid, at_version, Updated(priority=priority), when=at(at_version))
            new_job = apply(base, rec)
            await ready.wait()
            try:
                sealed = await store.append(base.uuid, at_version - 1, prev, [rec], new_job)
            except StaleVersion as exc:
                return exc
            return new_job, sealed[-1].hash

        outcomes = await asyncio.gather(*(contend(priority) for priority in range(CONTENDERS)))
        winners = [outcome for outcome in outcomes if not isinstance(outcome, StaleVersion)]
        assert len(winners) == 1
        assert sum(isinstance(outcome, StaleVersion) for outcome in outcomes) == CONTENDERS - 1
        ((job, last_hash),) = winners
        stored = await store.get_job(job.uuid)
        assert stored is not None
        assert (stored.job, stored.last_hash) == (job, last_hash)
        assert stored.job.version == version
        assert await pool.fetchval("SELECT count(*) FROM events WHERE job_uuid = $1", job.uuid) == version
    history = await store.load_events(job.uuid)
    assert [event.version for event in history] == [1, 2, 3, 4, 5]
    assert fold(event.to_recorded() for event in history) == job


async def test_two_dispatchers_locking_one_job_get_one_success_one_invalid(pool: asyncpg.Pool) -> None:
    service = JobService(EventStore(pool))
    owner = Caller(user_uuid=OWNER, role="user")
    dispatchers = [Caller(user_uuid=uuid, role="dispatcher") for uuid in DISPATCHERS]
    await warm(pool, 2)
    for n in range(8):
        job, created = await service.create(
            owner, script_name="hash", script_version="main", script_parameters={"n": n}
        )
        assert created
        barrier = asyncio.Barrier(2)

        async def lock(caller: Caller, job_uuid: str = job.uuid, ready: asyncio.Barrier = barrier) -> Job | Invalid:
            await ready.wait()
            try:
                return await service.lock(caller, job_uuid)
            except Invalid as exc:
                return exc

        outcomes = await asyncio.gather(*(lock(caller) for caller in dispatchers))
        locked = [outcome for outcome in outcomes if isinstance(outcome, Job)]
        refused = [outcome for outcome in outcomes if isinstance(outcome, Invalid)]
        assert (len(locked), len(refused)) == (1, 1)
        assert refused[0].rule == "lock-once"
        current = await service.get(owner, job.uuid)
        assert current.is_locked_by == locked[0].is_locked_by
        assert current.version == 2
        assert await pool.fetchval("SELECT count(*) FROM events WHERE job_uuid = $1", job.uuid) == 2


# ---------------------------------------------------------------------------------------------------------
# Hashed values survive jsonb
# ---------------------------------------------------------------------------------------------------------
# Any character but NUL (jsonb cannot hold it; normalise refuses it, see below), lone surrogates included.
_text = st.text(alphabet=st.characters(exclude_characters="\x00"), max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | _text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text, children, max_size=4),
    max_leaves=24,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=json_values)
async def test_normalised_values_survive_jsonb(pool: asyncpg.Pool, store: EventStore, value: Any) -> None:
    try:
        normal = normalise(value)
    except UnhashableValue:
        # Only what truly cannot be stored is refused: here, a lone surrogate, which has no UTF-8 form.
        with pytest.raises(UnicodeEncodeError):
            json.dumps(value, ensure_ascii=False).encode()
        return
    hashed = canonical_json(normal)
    back = await pool.fetchval("SELECT $1::jsonb", normal)
    assert canonical_json(back) == hashed
    # And end to end: an event carrying the value, read back, hashes to what was stored.
    job, sealed = await create_job(store, {"value": normal})
    (stored,) = await store.load_events(job.uuid)
    assert canonical_json(stored.data["script_parameters"]["value"]) == hashed
    recomputed = event_hash(
        job_uuid=stored.job_uuid,
        version=stored.version,
        event_type=stored.event_type,
        data=stored.data,
        actor_user_uuid=stored.actor_user_uuid,
        actor_client_uuid=stored.actor_client_uuid,
        request_id=stored.request_id,
        recorded_at=stored.recorded_at,
        prev_hash=stored.prev_hash,
    )
    assert recomputed == stored.hash == sealed.hash


@pytest.mark.parametrize(
    ("value", "normal"),
    [(-0.0, 0.0), (1e16, 10**16), (-2.5e20, -(25 * 10**19)), (1e-07, 1e-07), (2.0, 2.0), ([{"a": -0.0}], [{"a": 0.0}])],
)
def test_normalise_examples(value: Any, normal: Any) -> None:
    assert canonical_json(normalise(value)) == canonical_json(normal)


@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), [float("-inf")], "a\x00b", {"k\x00": 1}, "\ud800", {"\udfff": 1}, {1: 2}, {1, 2}],
)
def test_normalise_refuses_what_cannot_be_stored(value: Any) -> None:
    with pytest.raises(UnhashableValue):
        normalise(value)


# ---------------------------------------------------------------------------------------------------------
# The documented example
# ---------------------------------------------------------------------------------------------------------
DOCUMENTED_SUBMISSION: Final = {
    "job_uuid": "zzzzz-8i9sb-0k9p2x7q4m1n8rt",
    "version": 1,
    "event_type": "submitted",
    "data": {
        "owner_uuid": "zzzzz-tpzed-5d3w8c1v0b9n2mq",
        "script_name": "hash",
        "script_version": "main",
        "script_parameters": {"input": "zzzzz-4zz18-8f0e2a7c3b1d9e4", "label": "café", "ratio": 0.25},
        "priority": 1,
        "resource_limits": {"min_nodes": 1, "max_nodes": 2},
        "submit_id": None,
    },
    "actor_user_uuid": "zzzzz-tpzed-5d3w8c1v0b9n2mq",
    "actor_client_uuid": "zzzzz-ozdt8-1a2b3c4d5e6f7g8",
    "request_id": "req-7f3a9c21",
    "recorded_at": "2026-11-25T10:00:00.123456Z",
    "prev_hash": GENESIS_HASH,
}
DOCUMENTED_HASHES: Final = (
    "04468af9a41f5b71ec10675e5a7bdeace91e96b0dc79a5d5a036ceb2367bc721",
    "5e06f4c5c29383fe87660d0db525ea4d1b345e5073fee93923f5dde92916314c",
)


async def test_documented_example_matches_the_implementation(pool: asyncpg.Pool, store: EventStore) -> None:
    first = event_hash(**DOCUMENTED_SUBMISSION)  # type: ignore[arg-type]
    locked = {
        **DOCUMENTED_SUBMISSION,
        "version": 2,
        "event_type": "locked",
        "data": {},
        "actor_user_uuid": "zzzzz-tpzed-d15p4tch3r00001",
        "actor_client_uuid": None,
        "request_id": "req-0b44e8d2",
        "recorded_at": "2026-11-25T10:00:05.000001Z",
        "prev_hash": first,
    }
    assert (first, event_hash(**locked)) == DOCUMENTED_HASHES  # type: ignore[arg-type]
    document = DOCS.read_text()
    assert all(digest in document for digest in DOCUMENTED_HASHES)
    # The same event sealed by the store and stored by PostgreSQL keeps that hash.
    rec = Recorded(
        job_uuid=DOCUMENTED_SUBMISSION["job_uuid"],
        version=1,
        event=Submitted(**DOCUMENTED_SUBMISSION["data"]),  # type: ignore[arg-type]
        actor_user_uuid=DOCUMENTED_SUBMISSION["actor_user_uuid"],
        actor_client_uuid=DOCUMENTED_SUBMISSION["actor_client_uuid"],
        request_id=DOCUMENTED_SUBMISSION["request_id"],
        recorded_at=DOCUMENTED_SUBMISSION["recorded_at"],
    )
    job = fold([rec])
    assert job is not None
    (sealed,) = await store.append(rec.job_uuid, 0, GENESIS_HASH, [rec], job)
    assert sealed.hash == DOCUMENTED_HASHES[0]
    assert await pool.fetchval("SELECT hash FROM events WHERE job_uuid = $1", rec.job_uuid) == DOCUMENTED_HASHES[0]
    assert format_ts(parse_ts(rec.recorded_at)) == rec.recorded_at
