"""Two service processes on one database: one sequences; kill it with SIGKILL mid-run and the other takes over
within a few seconds, and every consumer still sees every committed event exactly once, in order.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from ledger.access import Caller
from ledger.config import Settings
from ledger.database import create_pool
from ledger.rebuild import check_read_model
from ledger.service import JobService
from ledger.store import EventStore
from ledger.users import create_token, create_user
from tests.harness import ApiClient
from tests.process_support import ServiceProcess, ServiceProcesses
from tests.stream_support import (
    SseClient,
    assert_exactly_once,
    eventually,
    long_poll_consumer,
    wait_until_sequenced,
)

TAKEOVER_LIMIT_SECONDS = 5.0
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def spawn(tmp_path: Path, database_dsn: str) -> AsyncIterator[Any]:
    """Start service processes on the test's database; every one is killed and reaped afterwards."""
    async with ServiceProcesses(tmp_path, database_dsn) as processes:
        yield processes.start


async def test_kill_the_sequencer_and_the_other_process_takes_over(
    spawn: Any, database_dsn: str, settings: Settings
) -> None:
    rng = random.Random(7)
    pool = await create_pool(database_dsn, settings, min_size=1, max_size=5)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=60))
    consumers: list[asyncio.Task[Any]] = []
    try:
        prefix = settings.uuid_prefix
        tokens = {}
        for role in ("user", "dispatcher", "auditor"):
            user = await create_user(pool, f"takeover-{role}", role, prefix)
            tokens[role] = (user.uuid, (await create_token(pool, user.uuid, prefix)).token)

        first = await spawn("first")
        await first.wait_for(session, "sequencer")  # started alone, so it leads
        second = await spawn("second")
        await second.wait_for(session, "listening")
        assert (await second.health(session) or {})["stream"]["sequencer"] is False

        stop = asyncio.Event()
        killed = asyncio.Event()

        def client(role: str, service: ServiceProcess) -> ApiClient:
            uuid, token = tokens[role]
            return ApiClient(session, service.base_url, token, uuid, role)

        async def http_writer(index: int) -> None:
            home = first if index % 2 == 0 else second
            n = 0
            while not stop.is_set():
                target = second if killed.is_set() else home
                user, dispatcher = client("user", target), client("dispatcher", target)
                n += 1
                try:
                    created = await user.create_job(script_parameters={"input": f"w{index}-{n}"})
                    if created.status == 201:
                        await dispatcher.post(f"jobs/{created.body['uuid']}/lock")
                except aiohttp.ClientError:
                    continue  # the first process died mid-request: whether it committed, the ledger says

        direct = JobService(EventStore(pool))
        user_caller = Caller(user_uuid=tokens["user"][0], role="user", request_id="req-takeover")

        async def direct_writer(index: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                await direct.create(
                    user_caller, script_name="x", script_version="main",
                    script_parameters={"input": f"d{index}-{n}"}, reuse=False,
                )  # fmt: skip

        # Consumers: a long-poller and an SSE reader on the survivor, and an SSE reader on the process that dies,
        # which resumes on the survivor with Last-Event-ID.
        done = asyncio.Event()
        target = [0]
        auditor_token = tokens["auditor"][1]
        survivor_sse = SseClient(session, second.base_url + "/orvos/v1/events/stream", auditor_token)
        failover_sse = SseClient(session, first.base_url + "/orvos/v1/events/stream", auditor_token)

        async def sse_consumer(sse: SseClient) -> None:
            while not (done.is_set() and sse.last_id == str(target[0])):
                try:
                    await sse.run_once(max_events=rng.randint(50, 500), max_seconds=1.0)
                except (aiohttp.ClientError, AssertionError):
                    sse.url = second.base_url + "/orvos/v1/events/stream"  # its process is gone: resume elsewhere

        consumers = [
            asyncio.create_task(
                long_poll_consumer(session, second.base_url, auditor_token, done=done, target=target, rng=rng)
            ),
            asyncio.create_task(sse_consumer(survivor_sse)),
            asyncio.create_task(sse_consumer(failover_sse)),
        ]
        async with asyncio.TaskGroup() as group:
            for i in range(6):
                group.create_task(http_writer(i))
            for i in range(4):
                group.create_task(direct_writer(i))
            await asyncio.sleep(2.0)
            head_before = await pool.fetchval("SELECT max(position) FROM event_positions")
            assert (head_before or 0) > 50, "the first process was not sequencing"
            killed_at = time.monotonic()
            first.process.send_signal(signal.SIGKILL)
            killed.set()
            await first.process.wait()
            await second.wait_for(session, "sequencer", within=TAKEOVER_LIMIT_SECONDS)
            takeover = time.monotonic() - killed_at

            # ...and it really sequences: the head moves on while the writers keep going.
            async def moved_on() -> bool:
                return await pool.fetchval("SELECT max(position) FROM event_positions") > head_before + 50

            # (Generous: on a shared server, other sessions' write transactions can hold the horizon a while.)
            await eventually(moved_on, "the head moving on under the new sequencer", 3 * TAKEOVER_LIMIT_SECONDS)
            await asyncio.sleep(1.5)
            stop.set()

        target[0] = await wait_until_sequenced(pool)
        done.set()
        async with asyncio.timeout(30):
            long_poll_items = await consumers[0]
            await asyncio.gather(*consumers[1:])
        assert takeover < TAKEOVER_LIMIT_SECONDS
        await assert_exactly_once(pool, long_poll_items, "long-poll consumer on the survivor")
        await assert_exactly_once(pool, survivor_sse.items, "SSE consumer on the survivor")
        await assert_exactly_once(pool, failover_sse.items, "SSE consumer that failed over")
        assert failover_sse.url.startswith(second.base_url)
        assert await check_read_model(pool) is None
    finally:
        for task in consumers:
            task.cancel()
        await session.close()
        await pool.close()


async def test_positions_are_never_given_twice_even_if_two_sequencers_ran(database_dsn: str) -> None:
    """The lease keeps a second sequencer out; if one ran anyway, the primary key and event_id UNIQUE refuse."""
    from ledger.sequencer import load_cursor, sequence_batch, take_lease

    conn = await asyncpg.connect(database_dsn)
    try:
        await conn.execute(
            "INSERT INTO events (job_uuid, version, event_type, data, actor_user_uuid, request_id, recorded_at, "
            "prev_hash, hash) VALUES ('zzzzz-8i9sb-000000000000001', 1, 'submitted', '{}', 'u', 'r', now(), "
            "repeat('0', 64), repeat('a', 64))"
        )
        stale = await load_cursor(conn)
        lease, _ = await take_lease(conn, "test", 60_000)
        assert lease is not None
        sequenced = []

        async def settled() -> bool:
            # The horizon is cluster-wide: wait out any write transaction another session has open.
            sequenced.append((await sequence_batch(conn, stale, lease)).sequenced)
            return sequenced[-1] == 1

        await eventually(settled, "the event settled")
        # A second sequencer with the same (now stale) view tries to give the event a position again.
        with pytest.raises(asyncpg.UniqueViolationError):
            await sequence_batch(conn, stale, lease)
        assert await conn.fetchval("SELECT count(*) FROM event_positions") == 1
    finally:
        await conn.close()
