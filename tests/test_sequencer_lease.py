"""The sequencer lease (issue 10 item 4): a leader frozen with SIGSTOP keeps its connection open, but loses the
lead once its lease runs out; another process sequences within the lease plus a margin; when the frozen one
wakes it stands down without writing another batch (PostgreSQL refuses a stale epoch); consumers still see
1..N exactly once and ``jobledger verify`` passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from ledger.config import Settings
from ledger.database import create_pool
from ledger.sequencer import LeaseLost, load_cursor, release_lease, sequence_batch, take_lease
from ledger.users import create_token, create_user
from tests.harness import ApiClient
from tests.process_support import ServiceProcess, ServiceProcesses, jobledger
from tests.stream_support import assert_exactly_once, eventually, long_poll_consumer, wait_until_sequenced

LEASE_SECONDS = Settings().sequencer_lease_ms / 1000
# Lease, plus a follower's poll and a pass: the longest the stream may stall with a frozen leader.
STALL_LIMIT_SECONDS = LEASE_SECONDS + 2.0
FREEZE_SECONDS = 10.0


@pytest.fixture
async def spawn(tmp_path: Path, database_dsn: str) -> AsyncIterator[Any]:
    """Start service processes; every one is SIGCONTed, killed and reaped afterwards, whatever happened."""
    async with ServiceProcesses(tmp_path, database_dsn) as processes:
        try:
            yield processes.start
        finally:
            for service in processes.processes:
                if service.process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        service.process.send_signal(signal.SIGCONT)


async def _insert_event(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "INSERT INTO events (job_uuid, version, event_type, data, actor_user_uuid, request_id, recorded_at, "
        "prev_hash, hash) VALUES ('zzzzz-8i9sb-000000000000001', 1, 'submitted', '{}', 'u', 'r', now(), "
        "repeat('0', 64), repeat('a', 64))"
    )


async def test_a_stale_epoch_is_refused_by_postgresql(database_dsn: str) -> None:
    """After a takeover the old epoch's writes fail in the database: through the batch and written by hand."""
    conn = await asyncpg.connect(database_dsn)
    try:
        await _insert_event(conn)
        old, _ = await take_lease(conn, "old", 60_000)
        assert old is not None
        # Another holder may not take a live lease...
        assert (await take_lease(conn, "new", 60_000))[0] is None
        # ...but takes it once it expired (as if the old holder had been frozen past it).
        await conn.execute("UPDATE sequencer_lease SET expires_at = clock_timestamp() - interval '1 s'")
        new, _ = await take_lease(conn, "new", 60_000)
        assert new is not None
        assert new.epoch == old.epoch + 1
        cursor = await load_cursor(conn)

        async def settled() -> bool:
            rows = await conn.fetchval(
                "SELECT count(*) FROM events WHERE tx < pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
            )
            return bool(rows)

        await eventually(settled, "the event settled")
        with pytest.raises(LeaseLost):
            await sequence_batch(conn, cursor, old)
        assert await conn.fetchval("SELECT count(*) FROM event_positions") == 0
        event_id = await conn.fetchval("SELECT id FROM events")
        insert = (
            "INSERT INTO event_positions (position, event_id, chain_hash, epoch) VALUES (1, $1, repeat('b', 64), $2)"
        )
        for epoch in (old.epoch, None):
            with pytest.raises(asyncpg.CheckViolationError, match="refused"):
                await conn.execute(insert, event_id, epoch)
        # The current epoch, once its lease has expired, is refused too.
        await conn.execute("UPDATE sequencer_lease SET expires_at = clock_timestamp() - interval '1 s'")
        with pytest.raises(asyncpg.CheckViolationError, match="expired"):
            await conn.execute(insert, event_id, new.epoch)
        # The epoch never goes back, and the lease row cannot be deleted.
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("UPDATE sequencer_lease SET epoch = 0")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("DELETE FROM sequencer_lease")
        newest, _ = await take_lease(conn, "newest", 60_000)
        assert newest is not None
        assert (await sequence_batch(conn, cursor, newest)).sequenced == 1
        await release_lease(conn, newest)
    finally:
        await conn.close()


@pytest.mark.slow
async def test_a_frozen_sequencer_loses_the_lead_and_stands_down(
    spawn: Any, database_dsn: str, settings: Settings, tmp_path: Path
) -> None:
    rng = random.Random(11)
    pool = await create_pool(database_dsn, settings, min_size=1, max_size=5)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=60))
    tasks: list[asyncio.Task[Any]] = []
    try:
        prefix = settings.uuid_prefix
        tokens = {}
        for role in ("user", "auditor"):
            user = await create_user(pool, f"lease-{role}", role, prefix)
            tokens[role] = (user.uuid, (await create_token(pool, user.uuid, prefix)).token)
        first = await spawn("first")
        await first.wait_for(session, "sequencer")
        second: ServiceProcess = await spawn("second")
        await second.wait_for(session, "listening")
        assert (await second.health(session) or {})["stream"]["sequencer"] is False
        first_epoch = await pool.fetchval("SELECT epoch FROM sequencer_lease")
        assert f":{first.process.pid}:" in await pool.fetchval("SELECT holder FROM sequencer_lease")

        stop, done = asyncio.Event(), asyncio.Event()
        target = [0]
        uuid, token = tokens["user"]
        writer_client = ApiClient(session, second.base_url, token, uuid, "user")

        async def writer(index: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                created = await writer_client.create_job(script_parameters={"input": f"w{index}-{n}"})
                assert created.status == 201, created.body

        # The stall as a consumer sees it: the longest time the head stood still while writes kept coming.
        stall = [0.0]

        async def watch_head() -> None:
            head, since = -1, time.monotonic()
            while not stop.is_set():
                now_head = await pool.fetchval("SELECT COALESCE(max(position), 0) FROM event_positions")
                now = time.monotonic()
                if now_head != head:
                    head, since = now_head, now
                stall[0] = max(stall[0], now - since)
                await asyncio.sleep(0.02)

        tasks = [
            asyncio.create_task(
                long_poll_consumer(session, second.base_url, tokens["auditor"][1], done=done, target=target, rng=rng)
            ),
            asyncio.create_task(watch_head()),
            *(asyncio.create_task(writer(i)) for i in range(4)),
        ]
        await asyncio.sleep(2.0)
        assert (await pool.fetchval("SELECT max(position) FROM event_positions") or 0) > 20, "nothing sequenced"
        frozen_at = time.monotonic()
        first.process.send_signal(signal.SIGSTOP)
        try:
            await second.wait_for(session, "sequencer", within=STALL_LIMIT_SECONDS + 2)
            takeover = time.monotonic() - frozen_at
            # The old epoch's last position is final now: PostgreSQL refuses anything later under it.
            old_last = await pool.fetchval("SELECT max(position) FROM event_positions WHERE epoch = $1", first_epoch)
            lease = await pool.fetchrow("SELECT holder, epoch FROM sequencer_lease")
            assert lease["epoch"] > first_epoch
            assert f":{second.process.pid}:" in lease["holder"]
            await asyncio.sleep(max(FREEZE_SECONDS - (time.monotonic() - frozen_at), 0))
        finally:
            first.process.send_signal(signal.SIGCONT)
        # Awake again: it finds its lease gone, writes nothing, and says so.
        await eventually(lambda: "standing down" in first.stderr(), "the old leader standing down", 10)
        await asyncio.sleep(2.0)
        assert (await first.health(session) or {})["stream"]["sequencer"] is False
        assert (await second.health(session) or {})["stream"]["sequencer"] is True
        assert (
            await pool.fetchval("SELECT max(position) FROM event_positions WHERE epoch = $1", first_epoch) == old_last
        )
        later = await pool.fetchval("SELECT min(position) FROM event_positions WHERE epoch > $1", first_epoch)
        assert later == old_last + 1
        stop.set()
        for task in tasks[1:]:
            await task
        target[0] = await wait_until_sequenced(pool)
        done.set()
        async with asyncio.timeout(30):
            items = await tasks[0]
        await assert_exactly_once(pool, items, "long-poll consumer")
        print(f"\nfrozen leader: takeover after {takeover:.2f} s, longest stream stall {stall[0]:.2f} s")
        assert takeover < STALL_LIMIT_SECONDS
        assert stall[0] < STALL_LIMIT_SECONDS
        status, out, err = await jobledger("verify", data=tmp_path / "verify-data", dsn=database_dsn)
        assert status == 0, err
        assert json.loads(out)["ok"] is True
    finally:
        for task in tasks:
            task.cancel()
        await session.close()
        await pool.close()
