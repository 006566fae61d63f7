"""Graceful shutdown of a real ``jobledger serve`` (alone, and with ``--workers 2``): on SIGTERM a create held
in flight by a table lock completes with 201, a waiting long-poll answers at once with a proper page, an SSE
stream ends cleanly, new connections are refused meanwhile, and the process exits 0. The process's standard
error carries the access log as bare JSON lines, without the token that was sent in the query string.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ledger.config import Settings
from ledger.database import create_pool
from ledger.rebuild import check_read_model
from ledger.users import create_token, create_user
from tests.harness import ApiClient
from tests.process_support import ServiceProcess, serve
from tests.stream_support import SseClient, eventually

# The held create must outlast the test's checks, not the service's own bounds on waiting for a lock.
HOLD_SECONDS = 1.5
SLOW_ENV = {"JOBLEDGER_LOCK_TIMEOUT_MS": "30000", "JOBLEDGER_STATEMENT_TIMEOUT_MS": "30000"}


async def _consumers(server: ServiceProcess, session: aiohttp.ClientSession) -> dict[str, float]:
    async with session.get(server.base_url + "/metrics") as response:
        text = await response.text()
    return {
        sample.labels["kind"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "jobledger_stream_consumers"
    }


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_lets_requests_in_flight_finish(
    tmp_path: Path, database_dsn: str, settings: Settings, workers: int
) -> None:
    pool = await create_pool(database_dsn, settings, min_size=1, max_size=3)
    session = aiohttp.ClientSession()
    blocker = await asyncpg.connect(database_dsn)
    args = ["--shutdown-timeout", "20", "--workers", str(workers)]
    try:
        async with serve(tmp_path, database_dsn, *args, env=SLOW_ENV) as server:
            await server.wait_healthy(session)
            prefix = settings.uuid_prefix
            user = await create_user(pool, "shutdown-user", "user", prefix)
            auditor = await create_user(pool, "shutdown-auditor", "auditor", prefix)
            user_token = (await create_token(pool, user.uuid, prefix)).token
            auditor_token = (await create_token(pool, auditor.uuid, prefix)).token
            client = ApiClient(session, server.base_url, user_token, user.uuid, "user")
            reader = ApiClient(session, server.base_url, auditor_token, auditor.uuid, "auditor")
            # The token in the query string (and nothing in the header): it must not reach the log.
            assert (
                await ApiClient(session, server.base_url, None).get("jobs", params={"api_token": user_token})
            ).status == 200

            sse = SseClient(session, server.base_url + "/orvos/v1/events/stream", auditor_token)
            sse_ended = asyncio.create_task(sse.run_once(max_seconds=60))
            long_poll = asyncio.create_task(reader.get("events", params={"wait": "60"}))
            await eventually(
                lambda: _consumers_are(server, session, {"sse": 1, "long_poll": 1}), "both streams open", 20
            )

            # A create held in flight: its append waits for the table lock this test holds.
            held = blocker.transaction()
            await held.start()
            await blocker.execute("LOCK TABLE events IN EXCLUSIVE MODE")
            create = asyncio.create_task(client.create_job(script_parameters={"held": True}))

            async def create_waits_for_the_lock() -> bool:
                waiting: int = await pool.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND query LIKE '%INSERT%'"
                )
                return waiting == 1

            await eventually(create_waits_for_the_lock, "the create waits for the lock", 20)

            server.process.send_signal(signal.SIGTERM)
            answered = await asyncio.wait_for(long_poll, 10)
            assert answered.status == 200
            assert answered.body["kind"] == "orvos#eventList"
            assert answered.body["items"] == []
            assert await asyncio.wait_for(sse_ended, 10) == "eof"  # the stream ended, cleanly
            await eventually(server.refuses_connections, "new connections refused", 10)
            # The slow request: held well past the moment shutdown began (a shutdown that cancels what is in
            # flight after a short grace would cut it off here), then let go.
            await asyncio.sleep(HOLD_SECONDS)
            assert not create.done()
            assert server.process.returncode is None

            await held.rollback()
            created = await asyncio.wait_for(create, 20)
            assert created.status == 201, created.body
            assert await server.wait_exit(30) == 0, server.stderr()[-3000:]

            assert await pool.fetchval("SELECT count(*) FROM jobs WHERE uuid = $1", created.body["uuid"]) == 1
            assert await check_read_model(pool) is None
            log = server.stderr()
            assert user_token not in log
            assert auditor_token not in log
            access = [json.loads(line) for line in log.splitlines() if line.startswith('{"time"')]
            summary = [
                (line["method"], line["path"], line["query"], line["status"], line["user_uuid"]) for line in access
            ]
            assert ("GET", "/orvos/v1/jobs", "", 200, user.uuid) in summary  # the query's token, removed
            assert ("POST", "/orvos/v1/jobs", "allow_duplicate=true", 201, user.uuid) in summary  # the held create
    finally:
        await blocker.close()
        await session.close()
        await pool.close()


async def _consumers_are(server: ServiceProcess, session: aiohttp.ClientSession, expected: dict[str, float]) -> bool:
    return await _consumers(server, session) == expected
