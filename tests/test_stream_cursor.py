"""Cursor and resume logic of the stream, and who sees what.

The property: from any cursor, with any page size, scan window and filters, a read returns exactly the
matching events in (cursor, next_after], in position order, and next_after never goes back and always moves
while anything is left — so any interleaving of page sizes and resumes from any checkpoint the consumer
saved yields exactly the expected sequence.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.access import Caller
from ledger.hashing import GENESIS_HASH, chain_hash
from ledger.sequencer import CounterBehind, SequencerBusy, release_lease, sequence_pending, take_lease
from ledger.service import JobService
from ledger.store import EventStore
from ledger.stream import read_events
from tests.harness import ApiClient, ServiceHarness
from tests.stream_support import SseClient, eventually, wait_until_sequenced

OWNERS = ("zzzzz-tpzed-00000000000000a", "zzzzz-tpzed-00000000000000b")
EVENT_TYPES = ("submitted", "updated", "locked", "unlocked", "started", "cancelled", "finished", "reused")


@dataclass(frozen=True)
class Recorded:
    """An event of the recorded set, with what the filters look at."""

    position: int
    id: int
    job_uuid: str
    event_type: str
    owner: str


async def _sequence_all(pool: asyncpg.Pool) -> None:
    # The horizon is cluster-wide: another session's open write transaction can hold events back a while.
    async def done() -> bool:
        await sequence_pending(pool)
        unsequenced: int = await pool.fetchval("SELECT count(*) FROM events") - await pool.fetchval(
            "SELECT count(*) FROM event_positions"
        )
        return unsequenced == 0

    await eventually(done, "every event sequenced", 20)


@pytest.fixture
async def recorded(pool: asyncpg.Pool) -> list[Recorded]:
    """About 60 events of 12 jobs of two owners, every event type, sequenced."""
    service = JobService(EventStore(pool))
    dispatcher = Caller(user_uuid="zzzzz-tpzed-00000000000000d", role="dispatcher", request_id="req-d")
    for n in range(12):
        owner = Caller(user_uuid=OWNERS[n % 2], role="user", request_id=f"req-{n}")
        job, _ = await service.create(owner, script_name="s", script_version="main", script_parameters={"n": n})
        if n % 3 == 0:
            await service.create(owner, script_name="s", script_version="main", script_parameters={"n": n})  # reused
        await service.update(owner, job.uuid, {"priority": n})
        await service.lock(dispatcher, job.uuid)
        if n % 4 == 1:
            await service.unlock(dispatcher, job.uuid)
            await service.cancel(owner, job.uuid)
            continue
        await service.start(dispatcher, job.uuid, "c" * 40)
        if n % 4 == 2:
            await service.cancel(owner, job.uuid)
        await service.finish(dispatcher, job.uuid, success=n % 2 == 0)
    await _sequence_all(pool)
    rows = await pool.fetch(
        "SELECT p.position, e.id, e.job_uuid, e.event_type, j.owner_uuid FROM event_positions p "
        "JOIN events e ON e.id = p.event_id JOIN jobs j ON j.uuid = e.job_uuid ORDER BY p.position"
    )
    events = [Recorded(r["position"], r["id"], r["job_uuid"], r["event_type"], r["owner_uuid"]) for r in rows]
    assert {e.event_type for e in events} == set(EVENT_TYPES)
    return events


@dataclass(frozen=True)
class Filters:
    """A consumer's view: owner and filters, as ``read_events`` takes them."""

    owner: str | None
    job_uuids: frozenset[str] | None
    event_types: frozenset[str] | None
    exclude_job_uuids: frozenset[str]
    exclude_event_types: frozenset[str]

    def admits(self, event: Recorded) -> bool:
        return (
            (self.owner is None or event.owner == self.owner)
            and (self.job_uuids is None or event.job_uuid in self.job_uuids)
            and (self.event_types is None or event.event_type in self.event_types)
            and event.job_uuid not in self.exclude_job_uuids
            and event.event_type not in self.exclude_event_types
        )


def _filters(job_uuids: list[str]) -> st.SearchStrategy[Filters]:
    jobs = st.frozensets(st.sampled_from(job_uuids), max_size=5)
    types = st.frozensets(st.sampled_from(EVENT_TYPES), max_size=4)
    return st.builds(
        Filters,
        owner=st.sampled_from((None, *OWNERS)),
        job_uuids=st.none() | jobs,
        event_types=st.none() | types,
        exclude_job_uuids=st.just(frozenset()) | jobs,
        exclude_event_types=st.just(frozenset()) | types,
    )


# A step: read with this page size, then carry on from next_after, or restart from a checkpoint saved earlier.
_STEPS = st.lists(st.tuples(st.integers(0, 12), st.none() | st.integers(0, 10_000)), min_size=1, max_size=25)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
async def test_any_reading_pattern_yields_exactly_the_expected_sequence(
    pool: asyncpg.Pool, recorded: list[Recorded], data: st.DataObject
) -> None:
    # The recorded set comes from a fixture (made once, only read here), so the strategies are drawn inside.
    head = recorded[-1].position
    view = data.draw(_filters(sorted({e.job_uuid for e in recorded})), label="view")
    start = data.draw(st.integers(0, head + 2), label="start")
    steps = data.draw(_STEPS, label="steps")
    window = data.draw(st.integers(1, 40), label="scan window")

    async def read(after: int, limit: int) -> tuple[list[int], int, int]:
        page = await read_events(
            pool, after=after, limit=limit, owner_uuid=view.owner, job_uuids=view.job_uuids,
            event_types=view.event_types, exclude_job_uuids=view.exclude_job_uuids,
            exclude_event_types=view.exclude_event_types, scan_window=window,
        )  # fmt: skip
        return [e.position or 0 for e in page.items], page.head, page.next_after

    def expected(after: int, upto: int) -> list[int]:
        return [e.position for e in recorded if after < e.position <= upto and view.admits(e)]

    cursor = start
    checkpoints = [start]
    for limit, restart in steps:
        positions, page_head, next_after = await read(cursor, limit)
        assert page_head == head
        assert len(positions) <= limit
        assert cursor <= next_after <= max(cursor, head)
        # Exactly the matches in (cursor, next_after], in order: nothing skipped, nothing twice.
        assert positions == expected(cursor, next_after)
        if limit and cursor < head:
            assert next_after > cursor, "a read with something left to look at must make progress"
        cursor = next_after
        checkpoints.append(cursor)
        if restart is not None:
            cursor = checkpoints[restart % len(checkpoints)]  # resume from a checkpoint saved earlier
    # Draining from wherever it got to yields the rest, and ends at the head.
    resumed_from, seen = cursor, []
    while cursor < head:
        positions, _, cursor = await read(cursor, 7)
        seen += positions
    assert seen == expected(resumed_from, head)
    assert cursor == max(resumed_from, head)


async def test_a_page_reports_events_as_stored(pool: asyncpg.Pool, recorded: list[Recorded]) -> None:
    page = await read_events(pool, after=0, limit=1000, owner_uuid=None)
    assert [e.position for e in page.items] == [r.position for r in recorded]
    assert [e.id for e in page.items] == [r.id for r in recorded]
    assert page.next_after == page.head == len(recorded)
    first = page.items[0]
    assert (first.version, first.event_type, first.prev_hash) == (1, "submitted", "0" * 64)
    assert first.recorded_at.endswith("Z")
    assert len(first.recorded_at) == 27


async def test_sequence_pending_refuses_while_another_session_sequences(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as holder:
        lease, _ = await take_lease(holder, "another", 60_000)
        assert lease is not None
        with pytest.raises(SequencerBusy):
            await sequence_pending(pool)
        await release_lease(holder, lease)
    assert await sequence_pending(pool) == 0


# ---- who sees what, over HTTP ----------------------------------------------------------------------------
async def _everything(client: ApiClient, **params: Any) -> dict[str, Any]:
    """Long-poll from 0 to the head; the items, and the last answer."""
    items: list[dict[str, Any]] = []
    after = 0
    while True:
        got = await client.get("events", params={"after": after, "limit": 3, **params})
        assert got.status == 200, got.body
        items += got.body["items"]
        assert got.body["next_after"] >= after
        after = got.body["next_after"]
        if after >= got.body["head"]:
            return {"items": items, "last": got.body}


async def _sse_until(service: ServiceHarness, client: ApiClient, last_position: int, **params: str) -> SseClient:
    sse = SseClient(service.session, f"{service.base_url}/orvos/v1/events/stream", client.token or "", params=params)
    async with asyncio.timeout(10):
        while sse.last_id != str(last_position):
            await sse.run_once(max_seconds=0.5)
    return sse


async def test_a_user_sees_only_its_own_jobs_and_an_auditor_sees_all(service: ServiceHarness) -> None:
    alice, bob = await service.client("user"), await service.client("user")
    auditor, dispatcher = await service.client("auditor"), await service.client("dispatcher")
    alice_jobs = [(await alice.create_job(script_parameters={"n": n})).body["uuid"] for n in range(3)]
    bob_jobs = [(await bob.create_job(script_parameters={"n": n})).body["uuid"] for n in range(2)]
    assert (await dispatcher.post(f"jobs/{alice_jobs[0]}/lock")).status == 200
    assert (await dispatcher.post(f"jobs/{bob_jobs[0]}/lock")).status == 200
    assert (await bob.post(f"jobs/{bob_jobs[1]}/cancel")).status == 200
    head = await wait_until_sequenced(service.pool)
    owner_of = {uuid: "alice" for uuid in alice_jobs} | {uuid: "bob" for uuid in bob_jobs}

    everything = await _everything(auditor)
    assert [item["position"] for item in everything["items"]] == list(range(1, head + 1))
    alices = await _everything(alice)
    assert {owner_of[item["job_uuid"]] for item in alices["items"]} == {"alice"}
    assert len(alices["items"]) == 4  # three submissions and a lock
    assert (alices["last"]["head"], alices["last"]["next_after"]) == (head, head)
    # Asking for someone else's job by name shows nothing, and still moves the cursor on.
    snooping = await bob.get("events", params={"filters": json.dumps([["job_uuid", "=", alice_jobs[0]]]), "after": 0})
    assert (snooping.body["items"], snooping.body["next_after"]) == ([], head)

    bob_positions = [item["position"] for item in everything["items"] if owner_of[item["job_uuid"]] == "bob"]
    bob_sse = await _sse_until(service, bob, bob_positions[-1])
    assert [item["position"] for item in bob_sse.items] == bob_positions
    auditor_sse = await _sse_until(service, auditor, head)
    assert [item["position"] for item in auditor_sse.items] == list(range(1, head + 1))
    # Filters apply to the stream too: bob's cancellations only.
    cancels = await _sse_until(
        service, bob, bob_positions[-1], filters=json.dumps([["event_type", "in", ["cancelled"]]])
    )
    assert [(i["job_uuid"], i["event_type"]) for i in cancels.items] == [(bob_jobs[1], "cancelled")]


async def test_filters_and_parameters_are_validated(service: ServiceHarness) -> None:
    auditor = await service.client("auditor")
    bad = [
        ({"filters": "[["}, 400),
        ({"filters": json.dumps({"job_uuid": "x"})}, 422),
        ({"filters": json.dumps([["owner_uuid", "=", "x"]])}, 422),
        ({"filters": json.dumps([["event_type", "like", "s%"]])}, 422),
        ({"filters": json.dumps([["event_type", "in", "submitted"]])}, 422),
        ({"filters": json.dumps([["job_uuid", "=", ["a"]]])}, 422),
        ({"after": "-1"}, 422),
        ({"after": "x"}, 422),
        ({"wait": "-1"}, 422),
        ({"wait": "soon"}, 422),
        ({"limit": "-5"}, 422),
    ]
    for params, status in bad:
        got = await auditor.get("events", params=params)
        assert got.status == status, (params, got.body)
        assert got.body["errors"]
    assert (await service.anonymous().get("events")).status == 401
    assert (await service.anonymous().get("events/stream")).status == 401
    fine = await auditor.get(
        "events", params={"limit": "5000", "wait": "0", "filters": json.dumps([["event_type", "NOT IN", ["x"]]])}
    )
    assert fine.status == 200
    assert fine.body == {"kind": "orvos#eventList", "items": [], "head": 0, "next_after": 0}


async def test_a_counter_behind_the_ledger_is_refused(pool: asyncpg.Pool) -> None:
    """As after a logical restore onto a fresh cluster: new events would sort behind the cursor, so refuse."""
    async with pool.acquire() as conn:
        event_id = await conn.fetchval(
            "INSERT INTO events (job_uuid, version, event_type, data, actor_user_uuid, request_id, recorded_at, "
            "prev_hash, hash, tx) VALUES ('zzzzz-8i9sb-000000000000001', 1, 'submitted', '{}', 'u', 'r', now(), "
            "repeat('0', 64), repeat('a', 64), 1000000000000000) RETURNING id"
        )
        lease, _ = await take_lease(conn, "restorer", 60_000)
        assert lease is not None
        await conn.execute(
            "INSERT INTO event_positions (position, event_id, chain_hash, epoch) VALUES (1, $1, $2, $3)",
            event_id,
            chain_hash(GENESIS_HASH, 1, "a" * 64),
            lease.epoch,
        )
        await release_lease(conn, lease)
    with pytest.raises(CounterBehind):
        await sequence_pending(pool)


async def test_consumers_woken_together_see_only_their_own_view(service: ServiceHarness) -> None:
    """Consumers at the same cursor share reads when woken together; never across owners or filters."""
    alice, bob, auditor = await service.client("user"), await service.client("user"), await service.client("auditor")
    url = f"{service.base_url}/orvos/v1/events/stream"
    submitted_only = json.dumps([["event_type", "=", "submitted"]])
    views = {
        "alice": [SseClient(service.session, url, alice.token or "") for _ in range(3)],
        "bob": [SseClient(service.session, url, bob.token or "") for _ in range(3)],
        "all": [SseClient(service.session, url, auditor.token or "") for _ in range(3)],
        "bob-submitted": [SseClient(service.session, url, bob.token or "", params={"filters": submitted_only})],
    }
    expected = {"alice": 12, "bob": 12, "all": 24, "bob-submitted": 6}
    readers = [
        asyncio.create_task(c.run_once(max_events=expected[name], max_seconds=15))
        for name, clients in views.items()
        for c in clients
    ]
    owners = {}
    for n in range(6):
        for name, user in (("alice", alice), ("bob", bob)):
            created = await user.create_job(script_parameters={"n": n})
            owners[created.body["uuid"]] = name
            await user.post(f"jobs/{created.body['uuid']}/cancel")
    assert set(await asyncio.gather(*readers)) == {"count"}
    for name, clients in views.items():
        for client in clients:
            seen = [(owners[i["job_uuid"]], i["event_type"]) for i in client.items]
            if name == "all":
                assert len(seen) == 24
            elif name == "bob-submitted":
                assert seen == [("bob", "submitted")] * 6
            else:
                assert seen == [(name, "submitted"), (name, "cancelled")] * 6
