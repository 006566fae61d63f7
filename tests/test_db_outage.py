"""A real database outage: PostgreSQL stops (``pg_ctl stop -m fast``) under a write load and two stream
consumers, and starts again a few seconds later. Meanwhile every request gets an answer in time, a 503 with
``Retry-After`` or a normal one; afterwards the service recovers by itself, the consumers resume and see
every committed event exactly once, in order, and no acknowledged write is lost.

The server is a throwaway embedded PostgreSQL of this test's own, even when ``DATABASE_URL`` names another:
that one is shared and must never be stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ledger.config import Settings
from ledger.database import create_pool
from ledger.embedded import EmbeddedPostgres
from ledger.users import create_token, create_user
from tests.fault_support import (
    StreamFaults,
    WriteLoad,
    assert_ledger_whole,
    lost_acknowledged_writes,
    resilient_long_poll,
    resilient_sse,
)
from tests.harness import ApiClient
from tests.process_support import ServiceProcess, ServiceProcesses
from tests.stream_support import SseClient, assert_exactly_once, eventually, wait_until_sequenced

CLIENTS = 16
OUTAGE_SECONDS = 3.0
# A request must be answered within this long, outage or not: anything slower counts as a hang.
CLIENT_TIMEOUT = 5.0
# After PostgreSQL is back, the service must be fully itself again (healthy, sequencing, listening) within this.
RECOVERY_LIMIT = 10.0


class HealthLog:
    """``/healthz`` polled every 100 ms: (time, status, body) of every answer, or the error instead."""

    def __init__(self, session: aiohttp.ClientSession, service: ServiceProcess) -> None:
        self.session = session
        self.service = service
        self.answers: list[tuple[float, int | None, Any]] = []
        self.bad: list[str] = []

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop``."""
        while not stop.is_set():
            try:
                async with (
                    asyncio.timeout(CLIENT_TIMEOUT),
                    self.session.get(self.service.base_url + "/healthz") as answer,
                ):
                    body = await answer.json(content_type=None)
                    self.answers.append((time.monotonic(), answer.status, body))
                    if answer.status == 503 and not answer.headers.get("Retry-After", "").isdigit():
                        self.bad.append("/healthz 503 without Retry-After")
                    elif answer.status not in (200, 503):
                        self.bad.append(f"/healthz {answer.status}: {body!r}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.answers.append((time.monotonic(), None, type(exc).__name__))
                self.bad.append(f"/healthz: no answer ({type(exc).__name__})")
            await asyncio.sleep(0.1)

    def first_after(self, moment: float, status: int) -> float | None:
        """When ``/healthz`` first answered ``status`` after ``moment``."""
        return next((at for at, got, _ in self.answers if at >= moment and got == status), None)


@pytest.fixture
def outage_server() -> Any:
    """A throwaway embedded PostgreSQL for this test alone (its DSN and handle), stopped and deleted after."""
    # Not under tmp_path: pytest keeps its base folder private (0700), and any pytest starting meanwhile resets
    # it so, which would lock out the server's own user (as root, pgserver runs PostgreSQL as another user).
    folder = Path(tempfile.mkdtemp(prefix="jobledger-outage-"))
    server = EmbeddedPostgres(folder)
    dsn = server.start()
    try:
        yield server, dsn
    finally:
        server.stop()
        server.force_stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
async def test_database_outage_503s_then_recovers_by_itself(
    tmp_path: Path, outage_server: tuple[EmbeddedPostgres, str], settings: Settings
) -> None:
    server, dsn = outage_server
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=CLIENT_TIMEOUT, sock_read=CLIENT_TIMEOUT + 3)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4 * CLIENTS), timeout=timeout)
    stop, done = asyncio.Event(), asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []
    try:
        async with ServiceProcesses(tmp_path, dsn, {"JOBLEDGER_POOL_MAX": "10"}) as services:
            service = await services.start("service")
            await service.wait_for(session, "sequencer", within=30.0)  # it applied the schema
            pool = await create_pool(dsn, settings, min_size=1, max_size=2)
            try:
                tokens = {}
                for role in ("user", "dispatcher", "auditor"):
                    user = await create_user(pool, f"outage-{role}", role, settings.uuid_prefix)
                    tokens[role] = (user.uuid, (await create_token(pool, user.uuid, settings.uuid_prefix)).token)
            finally:
                await pool.close()
            user = ApiClient(session, service.base_url, tokens["user"][1], tokens["user"][0], "user")
            dispatcher = ApiClient(session, service.base_url, tokens["dispatcher"][1], tokens["dispatcher"][0])
            load = WriteLoad(user, dispatcher, timeout=CLIENT_TIMEOUT)
            health = HealthLog(session, service)
            target = [0]
            sse_faults, poll_faults = StreamFaults(), StreamFaults()
            sse = SseClient(session, service.base_url + "/orvos/v1/events/stream", tokens["auditor"][1])
            tasks = [
                asyncio.create_task(load.run(CLIENTS, stop)),
                asyncio.create_task(health.run(stop)),
                asyncio.create_task(resilient_sse(sse, done=done, target=target, faults=sse_faults)),
                asyncio.create_task(
                    resilient_long_poll(
                        session, service.base_url, tokens["auditor"][1], done=done, target=target, faults=poll_faults
                    )
                ),
            ]
            await eventually(lambda: len(load.created) >= 50, "the load getting going", 15.0)
            await asyncio.sleep(1.0)

            down_at = time.monotonic()
            await asyncio.to_thread(server.force_stop)
            await asyncio.sleep(OUTAGE_SECONDS)
            restart_at = time.monotonic()
            await asyncio.to_thread(server.start_again, dsn)
            up_at = time.monotonic()

            # Recovery, with no restart of the service: healthy, sequencing and listening again, and writing.
            await service.wait_for(session, "sequencer", within=RECOVERY_LIMIT)
            await service.wait_for(session, "listening", within=RECOVERY_LIMIT)
            recovered_at = time.monotonic()
            await eventually(
                lambda: any(o.started >= up_at and o.status in (200, 201) for o in load.outcomes),
                "a write acknowledged after the restart",
                RECOVERY_LIMIT,
            )
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.wait_for(asyncio.gather(tasks[0], tasks[1]), timeout=15)

            pool = await create_pool(dsn, settings, min_size=1, max_size=4)
            try:
                target[0] = await wait_until_sequenced(pool)
                done.set()
                async with asyncio.timeout(30):
                    await tasks[2]
                    long_poll_items = await tasks[3]
                await assert_exactly_once(pool, long_poll_items, "long-poll consumer across the outage")
                await assert_exactly_once(pool, sse.items, "SSE consumer across the outage")
                lost = await lost_acknowledged_writes(pool, load.acknowledged)
                head = await assert_ledger_whole(pool, dsn, tmp_path / "cli")
            finally:
                await pool.close()
            assert service.process.returncode is None, "the service did not survive the outage"

        during = load.during(down_at, up_at)
        statuses = Counter(o.status if o.status is not None else o.error for o in during)
        problems = load.bad + health.bad + sse_faults.bad + poll_faults.bad
        problems += [f"no answer within {CLIENT_TIMEOUT} s: {o.error}" for o in load.outcomes if o.status is None]
        # The service stayed up: a stream may end (and be resumed), but no connection may break or hang.
        problems += [f"stream connection broken: {kind}" for kind in sse_faults.broken + poll_faults.broken]
        assert problems == [], problems[:10]
        assert lost == [], f"{len(lost)} acknowledged writes lost: {lost[:5]}"
        assert statuses[503] > 0, f"no request saw the outage: {statuses}"
        # /healthz: unavailable during the outage, then healthy again.
        unhealthy = health.first_after(down_at, 503)
        assert unhealthy is not None, "/healthz never reported the outage"
        assert unhealthy < up_at, "/healthz reported the outage only after it"
        healthy = health.first_after(up_at, 200)
        assert healthy is not None, "/healthz never reported recovery"
        assert healthy - up_at < RECOVERY_LIMIT
        print(
            f"\ndatabase outage: {CLIENTS} clients, 1 SSE and 1 long-poll consumer; PostgreSQL down "
            f"{restart_at - down_at:.1f} s (+{up_at - restart_at:.1f} s to start); {len(during)} requests during "
            f"it: {dict(statuses)}; stream consumers refused {sse_faults.statuses + poll_faults.statuses}, "
            f"broken {sse_faults.broken + poll_faults.broken}; lost acknowledged writes: {len(lost)}; "
            f"healthy {healthy - up_at:.2f} s and fully recovered (sequencing, listening) "
            f"{recovered_at - up_at:.2f} s after PostgreSQL was back; {head} events, each seen once by both consumers"
        )
    finally:
        stop.set()
        done.set()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        await session.close()
