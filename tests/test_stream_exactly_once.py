"""The global stream under concurrent writes: every consumer sees positions 1..N exactly once, in order, and
they are exactly the committed events — with rollbacks, lost races, a transaction that takes its id early
and appends late, a write transaction held open for seconds, and consumers that hang up and resume.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from ledger.access import Caller
from ledger.config import Settings
from ledger.database import create_pool, init_connection
from ledger.service import JobService
from ledger.store import EventStore
from tests.harness import ApiClient, ServiceHarness
from tests.stream_support import SseClient, assert_exactly_once, long_poll_consumer, wait_until_sequenced

WRITE_SECONDS = 6.0
HOLD_SECONDS = 3.0


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """The service's pool kept small: the writers queue for connections rather than crowd a shared server."""
    return Settings(data_dir=tmp_path / "data", pool_min_size=1, pool_max_size=12)


class _Rollback(Exception):
    """Raised inside a transaction on purpose, after it appended."""


async def _connect(dsn: str) -> asyncpg.Connection:
    """A connection of its own, with the service's JSON codecs but none of its timeouts."""
    conn = await asyncpg.connect(dsn)
    await init_connection(conn)
    return conn


def _params(tag: str, n: int) -> dict[str, Any]:
    return {"input": f"{tag}-{n}"}


async def test_every_consumer_sees_every_committed_event_once_in_order(
    service: ServiceHarness, database_dsn: str, settings: Settings
) -> None:
    rng = random.Random(4)
    users = [await service.client("user") for _ in range(4)]
    dispatchers = [await service.client("dispatcher") for _ in range(2)]
    auditor = await service.client("auditor")
    stop = asyncio.Event()
    counts = {"rolled_back": 0, "lost_races": 0, "late_id": 0}
    held: dict[str, Any] = {}

    async def until_stopped(step: Callable[[int], Awaitable[None]]) -> None:
        n = 0
        while not stop.is_set():
            await step(n)
            n += 1

    # ---- writers over HTTP: create, then two dispatchers race for the lock (the loser's append is refused) --
    async def http_writer(index: int) -> None:
        user = users[index % len(users)]
        d1, d2 = dispatchers

        async def step(n: int) -> None:
            created = await user.create_job(script_parameters=_params(f"http{index}", n))
            assert created.status == 201, created.body
            uuid = created.body["uuid"]
            first, second = await asyncio.gather(d1.post(f"jobs/{uuid}/lock"), d2.post(f"jobs/{uuid}/lock"))
            assert sorted([first.status, second.status]) == [200, 422], (first.body, second.body)
            counts["lost_races"] += 1
            winner: ApiClient = d1 if first.status == 200 else d2
            if n % 3 == 0:
                assert (await user.post(f"jobs/{uuid}/cancel")).status == 200
                return
            assert (await winner.post(f"jobs/{uuid}/start", json={"script_version": "a" * 40})).status == 200
            finished = await winner.post(f"jobs/{uuid}/finish", json={"success": n % 2 == 0})
            assert finished.status == 200, finished.body

        await until_stopped(step)

    # ---- writers straight through JobService, on connections of their own (no in-process poke) -------------
    direct_pool = await create_pool(database_dsn, settings, min_size=1, max_size=4)
    direct = JobService(EventStore(direct_pool))

    def caller(client: ApiClient, n: int) -> Caller:
        return Caller(user_uuid=client.user_uuid, role=client.role, request_id=f"req-direct-{n}")  # type: ignore[arg-type]

    async def direct_writer(index: int) -> None:
        async def step(n: int) -> None:
            owner = caller(users[index % len(users)], n)
            job, _ = await direct.create(
                owner,
                script_name="x",
                script_version="main",
                script_parameters=_params(f"direct{index}", n),
                reuse=False,
            )
            dispatcher = caller(dispatchers[index % 2], n)
            await direct.lock(dispatcher, job.uuid)
            if n % 2:
                await direct.start(dispatcher, job.uuid, "b" * 40)

        await until_stopped(step)

    # ---- transactions that append and then roll back ----------------------------------------------------------
    async def rollback_writer(index: int) -> None:
        conn = await _connect(database_dsn)
        try:

            async def step(n: int) -> None:
                try:
                    async with conn.transaction():
                        in_tx = JobService(EventStore(conn))  # type: ignore[arg-type]
                        await in_tx.create(
                            caller(users[0], n), script_name="x", script_version="main",
                            script_parameters=_params(f"rollback{index}", n), reuse=False,
                        )  # fmt: skip
                        await asyncio.sleep(rng.random() * 0.005)
                        raise _Rollback
                except _Rollback:
                    counts["rolled_back"] += 1

            await until_stopped(step)
        finally:
            await conn.close()

    # ---- a transaction that takes its transaction id early and draws its event id late ------------------------
    async def late_id_writer() -> None:
        conn = await _connect(database_dsn)
        try:

            async def step(n: int) -> None:
                async with conn.transaction():
                    await conn.fetchval("SELECT pg_current_xact_id()")
                    await asyncio.sleep(rng.random() * 0.03)
                    await JobService(EventStore(conn)).create(  # type: ignore[arg-type]
                        caller(users[1], n), script_name="x", script_version="main",
                        script_parameters=_params("late", n), reuse=False,
                    )  # fmt: skip
                counts["late_id"] += 1

            await until_stopped(step)
        finally:
            await conn.close()

    # ---- one write transaction held open for seconds: delivered late, never lost -------------------------------
    async def held_writer() -> None:
        await asyncio.sleep(1.0)
        conn = await _connect(database_dsn)
        try:
            async with conn.transaction():
                job, _ = await JobService(EventStore(conn)).create(  # type: ignore[arg-type]
                    caller(users[2], 0), script_name="held", script_version="main",
                    script_parameters={"held": True}, reuse=False,
                )  # fmt: skip
                held["uuid"] = job.uuid
                await asyncio.sleep(HOLD_SECONDS)
        finally:
            await conn.close()

    # ---- consumers: a long-poller and two SSE readers, all hanging up and resuming now and then ---------------
    done = asyncio.Event()
    target = [0]
    stream_url = f"{service.base_url}/orvos/v1/events/stream"
    sse_clients = [
        SseClient(service.session, stream_url, auditor.token or ""),
        SseClient(service.session, stream_url, service.admin.token or "", params={"limit": "5"}),
    ]

    async def sse_consumer(client: SseClient) -> None:
        while not (done.is_set() and client.last_id == str(target[0])):
            await client.run_once(max_events=rng.randint(20, 400), max_seconds=rng.uniform(0.2, 1.5))

    consumers = [
        asyncio.create_task(
            long_poll_consumer(
                service.session, service.base_url, auditor.token or "", done=done, target=target, rng=rng
            )
        ),
        *(asyncio.create_task(sse_consumer(client)) for client in sse_clients),
    ]
    try:
        writers = [
            *(http_writer(i) for i in range(8)),
            *(direct_writer(i) for i in range(6)),
            *(rollback_writer(i) for i in range(2)),
            late_id_writer(),
        ]
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(w) for w in writers]
            holder = group.create_task(held_writer())
            await asyncio.sleep(WRITE_SECONDS)
            stop.set()
        assert len(tasks) >= 16
        assert holder.done()
        target[0] = await wait_until_sequenced(service.pool)
        done.set()
        async with asyncio.timeout(30):
            long_poll_items = await consumers[0]
            await asyncio.gather(*consumers[1:])
    finally:
        for task in consumers:
            task.cancel()
        await direct_pool.close()

    assert min(counts.values()) > 0, counts
    assert target[0] > 500, f"only {target[0]} events were written; the test proves little"
    await assert_exactly_once(service.pool, long_poll_items, "long-poll consumer")
    for index, client in enumerate(sse_clients):
        assert client.connections > 2, "the SSE consumer was meant to hang up and resume"
        await assert_exactly_once(service.pool, client.items, f"SSE consumer {index}")
    # The held transaction's event arrived (after it committed), in the same order for everyone.
    held_items = [item for item in long_poll_items if item["job_uuid"] == held["uuid"]]
    assert len(held_items) == 1
    rolled_back_jobs = await service.pool.fetchval(
        "SELECT count(*) FROM events WHERE data->>'script_parameters' LIKE '%rollback%'"
    )
    assert rolled_back_jobs == 0
