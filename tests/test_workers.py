"""``jobledger serve --workers 2`` as a real subprocess on the test's database: both workers serve on one port,
one admin is bootstrapped, one lock wins across processes, the stream stays dense, the read model equals a
replay, ``/metrics`` sums both workers, and SIGTERM to the parent stops everything cleanly.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.observe import WORKER_HEADER
from ledger.config import Settings
from ledger.database import create_pool
from ledger.embedded import EmbeddedPostgres
from ledger.rebuild import check_read_model
from ledger.users import bootstrap_admin, create_token, create_user
from tests.process_support import ServiceProcess, serve
from tests.stream_support import wait_until_sequenced

JOBS = 60
RACES = 10
RACERS = 6
MAX_ROUNDS = 50  # bounded retries for "both workers answered": accept order is the kernel's choice


@pytest.mark.parametrize("isolation", ["read committed", "repeatable read", "serializable"])
async def test_bootstrap_admin_exactly_once_when_processes_start_together(
    database_dsn: str, settings: Settings, isolation: str
) -> None:
    admin = await asyncpg.connect(database_dsn)
    try:
        name = await admin.fetchval("SELECT current_database()")
        await admin.execute(f"ALTER DATABASE {name} SET default_transaction_isolation = '{isolation}'")
        pools = [await create_pool(database_dsn, settings, min_size=1, max_size=1) for _ in range(6)]
        try:
            issued = await asyncio.gather(*(bootstrap_admin(pool, settings.uuid_prefix) for pool in pools))
        finally:
            for pool in pools:
                await pool.close()
        winners = [token for token in issued if token is not None]
        assert len(winners) == 1
        assert await admin.fetchval("SELECT count(*) FROM users") == 1
        tokens = await admin.fetch("SELECT user_uuid FROM api_tokens")
        assert [row["user_uuid"] for row in tokens] == [winners[0].user_uuid]
    finally:
        await admin.close()


async def _until_both(answer: Callable[[], Awaitable[list[str]]], what: str) -> set[str]:
    """Call ``answer`` (one round of requests on fresh connections, returning the workers that answered) until
    both workers have answered; the kernel picks which worker accepts each connection."""
    seen: set[str] = set()
    for _ in range(MAX_ROUNDS):
        seen.update(await answer())
        if seen == {"0", "1"}:
            return seen
    raise AssertionError(f"{what}: only workers {sorted(seen)} answered in {MAX_ROUNDS} rounds")


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


@pytest.mark.slow
async def test_two_workers_share_the_port_and_every_guarantee_holds(
    tmp_path: Path, database_dsn: str, settings: Settings
) -> None:
    pool = await create_pool(database_dsn, settings, min_size=1, max_size=4)
    # A connection per request, so that the kernel hands requests to either worker.
    fresh = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=32))
    try:
        async with serve(tmp_path, database_dsn, "--workers", "2", "--shutdown-timeout", "10") as server:
            await server.wait_healthy(fresh)
            pids: dict[str, int] = {}

            async def health_round() -> list[str]:
                reports = await asyncio.gather(*(server.health(fresh) for _ in range(8)))
                for report in reports:
                    if report is not None:
                        pids[str(report["process"]["worker"])] = report["process"]["pid"]
                return list(pids)

            await _until_both(health_round, "/healthz")  # both workers are up (and past their bootstrap)
            assert len(server.admin_tokens()) == 1, server.stdout_lines
            assert await pool.fetchval("SELECT count(*) FROM users WHERE role = 'admin'") == 1
            assert set(pids.values()) == {child.pid for child in psutil.Process(server.process.pid).children()}

            await _creates_and_lock_races(server, fresh, pool, settings)
            await _stream_is_dense_and_read_model_replays(server, fresh, pool)
            await _metrics_sum_both_workers(server, fresh, pool)

            server.process.send_signal(signal.SIGTERM)
            assert await server.wait_exit(30) == 0, server.stderr()[-3000:]
            assert not any(psutil.pid_exists(pid) for pid in pids.values())
            assert await server.refuses_connections()
    finally:
        await fresh.close()
        await pool.close()


async def _creates_and_lock_races(
    server: ServiceProcess, session: aiohttp.ClientSession, pool: asyncpg.Pool, settings: Settings
) -> None:
    prefix = settings.uuid_prefix
    user = await create_user(pool, "workers-user", "user", prefix)
    user_token = (await create_token(pool, user.uuid, prefix)).token
    dispatchers = []
    for n in range(3):
        dispatcher = await create_user(pool, f"workers-dispatcher-{n}", "dispatcher", prefix)
        dispatchers.append((await create_token(pool, dispatcher.uuid, prefix)).token)
    jobs_url = server.base_url + "/orvos/v1/jobs"

    async def create(n: int) -> tuple[str, str]:
        body = {"job": {"script_name": "w.py", "script_version": "main", "script_parameters": {"n": n}}}
        async with session.post(
            jobs_url, json=body, params={"allow_duplicate": "true"}, headers={"Authorization": f"Bearer {user_token}"}
        ) as response:
            assert response.status == 201, await response.text()
            return (await response.json())["uuid"], response.headers[WORKER_HEADER]

    created = await asyncio.gather(*(create(n) for n in range(JOBS)))
    uuids = [uuid for uuid, _ in created]
    by_worker = Counter(worker for _, worker in created)
    next_job = iter(range(JOBS, JOBS * 10))
    if set(by_worker) != {"0", "1"}:  # rare: one worker accepted every connection; go on until both have
        await _until_both(lambda: asyncio.gather(*(_worker_of(create(next(next_job))) for _ in range(8))), "creates")

    spanning = 0
    for uuid in uuids[:RACES]:

        async def lock(token: str, uuid: str = uuid) -> tuple[int, str]:
            async with session.post(
                f"{jobs_url}/{uuid}/lock", headers={"Authorization": f"Bearer {token}"}
            ) as response:
                await response.read()
                return response.status, response.headers[WORKER_HEADER]

        results = await asyncio.gather(*(lock(dispatchers[i % len(dispatchers)]) for i in range(RACERS)))
        statuses = sorted(status for status, _ in results)
        assert statuses == [200] + [422] * (RACERS - 1), results
        spanning += len({worker for _, worker in results}) == 2
        holders = await pool.fetchval("SELECT count(*) FROM events WHERE job_uuid = $1 AND event_type = 'locked'", uuid)
        assert holders == 1
    assert spanning > 0, "no lock race had racers on both workers"


async def _worker_of(request: Awaitable[tuple[str, str]]) -> str:
    return (await request)[1]


async def _stream_is_dense_and_read_model_replays(
    server: ServiceProcess, session: aiohttp.ClientSession, pool: asyncpg.Pool
) -> None:
    head = await wait_until_sequenced(pool)
    assert head == await pool.fetchval("SELECT count(*) FROM events")
    admin = {"Authorization": f"Bearer {server.admin_tokens()[0]}"}
    positions: list[int] = []
    after = 0
    while after < head:
        async with session.get(
            server.base_url + "/orvos/v1/events", params={"after": str(after), "limit": "1000"}, headers=admin
        ) as response:
            assert response.status == 200
            page: dict[str, Any] = await response.json()
        positions.extend(item["position"] for item in page["items"])
        after = page["next_after"]
    assert positions == list(range(1, head + 1))
    assert await check_read_model(pool) is None


async def _metrics_sum_both_workers(server: ServiceProcess, session: aiohttp.ClientSession, pool: asyncpg.Pool) -> None:
    events = await pool.fetchval("SELECT count(*) FROM events")
    scrapes: dict[str, str] = {}

    async def scrape_round() -> list[str]:
        async def one() -> None:
            async with session.get(server.base_url + "/metrics") as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith("text/plain")
                text = await response.text()
            # Each worker refreshes its sequencer flag every second: keep a scrape once both flags are in.
            if sorted(value for _, value in _samples(text, "jobledger_sequencer_leader")) == [0.0, 1.0]:
                scrapes[response.headers[WORKER_HEADER]] = text

        await asyncio.gather(*(one() for _ in range(4)))
        return list(scrapes)

    await _until_both(scrape_round, "/metrics")
    for worker, text in scrapes.items():
        # Whichever worker answers, it reports both workers' requests and appends (multiprocess mode).
        created = sum(
            value
            for labels, value in _samples(text, "jobledger_http_requests_total")
            if labels["route"] == "/orvos/v1/jobs" and labels["method"] == "POST" and labels["status"] == "201"
        )
        assert created >= JOBS, worker
        assert _samples(text, "jobledger_events_appended_total") == [({}, float(events))], worker
        leaders = _samples(text, "jobledger_sequencer_leader")
        assert sorted(value for _, value in leaders) == [0.0, 1.0], (worker, leaders)
        assert len({labels["pid"] for labels, _ in leaders}) == 2
        assert _samples(text, "jobledger_stream_head_position") == [({}, float(events))]


@pytest.mark.slow
async def test_without_database_url_the_parent_runs_the_embedded_postgres_once(tmp_path: Path) -> None:
    # A folder of its own under the system temporary folder, as ledger.embedded.temporary_server uses: as root,
    # pgserver makes the parents of its data folder world-readable.
    data = Path(tempfile.mkdtemp(prefix="jobledger-workers-"))
    fresh = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
    try:
        async with serve(tmp_path, None, "--workers", "2", env={"JOBLEDGER_DATA": str(data)}) as server:
            await server.wait_healthy(fresh)

            async def health_round() -> list[str]:
                reports = await asyncio.gather(*(server.health(fresh) for _ in range(8)))
                return [str(report["process"]["worker"]) for report in reports if report is not None]

            await _until_both(health_round, "/healthz")
            assert len(server.admin_tokens()) == 1
            # pgserver records every process that started (or attached to) the server: only the parent did.
            assert json.loads((data / "pgdata" / ".handle_pids.json").read_text()) == [server.process.pid]
            server.process.send_signal(signal.SIGTERM)
            assert await server.wait_exit(60) == 0, server.stderr()[-3000:]
            assert not (data / "pgdata" / "postmaster.pid").exists()  # and the parent stopped it
    finally:
        await fresh.close()
        if (data / "pgdata" / "postmaster.pid").exists():  # only if the test failed with the server up
            EmbeddedPostgres(data).force_stop()
        shutil.rmtree(data, ignore_errors=True)
