"""Identical submissions sent at once (CONTRACT §4): PostgreSQL decides, so exactly one job is created and every
other submission is answered with it (200) and leaves its ``reused`` event; across two service processes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from ledger.config import Settings
from ledger.database import create_pool
from ledger.users import create_token, create_user
from tests.contract import attributes
from tests.harness import ApiClient
from tests.process_support import ServiceProcess, ServiceProcesses

ROUNDS = 10
SUBMISSIONS = 20


@pytest.fixture
async def two_services(tmp_path: Path, database_dsn: str) -> AsyncIterator[tuple[ServiceProcess, ServiceProcess]]:
    """Two ``jobledger serve`` processes on the test's database, healthy."""
    async with ServiceProcesses(tmp_path, database_dsn, {"JOBLEDGER_POOL_MAX": "12"}) as processes:
        first = await processes.start("first")
        second = await processes.start("second")
        async with aiohttp.ClientSession() as session:
            await first.wait_healthy(session)
            await second.wait_healthy(session)
        yield first, second


async def _clients(
    pool: asyncpg.Pool, session: aiohttp.ClientSession, services: tuple[ServiceProcess, ...], name: str, prefix: str
) -> list[ApiClient]:
    user = await create_user(pool, name, "user", prefix)
    token = (await create_token(pool, user.uuid, prefix)).token
    return [ApiClient(session, service.base_url, token, user.uuid, "user") for service in services]


async def _submit_at_once(clients: list[ApiClient], count: int, parameters: dict[str, str]) -> list[tuple[int, str]]:
    """``count`` identical creates in parallel, alternating between ``clients``: (status, job uuid) of each."""

    async def one(index: int) -> tuple[int, str]:
        response = await clients[index % len(clients)].post(
            "jobs", json={"job": attributes(script_parameters=parameters)}
        )
        assert response.status in (200, 201), response.body
        return response.status, response.body["uuid"]

    return await asyncio.gather(*(one(i) for i in range(count)))


async def test_identical_parallel_submissions_make_one_job(
    two_services: tuple[ServiceProcess, ServiceProcess], database_dsn: str, settings: Settings
) -> None:
    pool = await create_pool(database_dsn, settings, min_size=1, max_size=3)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2 * SUBMISSIONS))
    try:
        clients = await _clients(pool, session, two_services, "racer", settings.uuid_prefix)
        duplicates = []
        for round_no in range(ROUNDS):
            answers = await _submit_at_once(clients, SUBMISSIONS, {"round": str(round_no)})
            jobs = {uuid for _, uuid in answers}
            duplicates.append(len(jobs) - 1)
            if len(jobs) != 1:
                continue
            assert sorted(status for status, _ in answers) == [200] * (SUBMISSIONS - 1) + [201]
            (uuid,) = jobs
            response = await clients[0].get(f"jobs/{uuid}/events")
            if response.status == 200:
                kinds = [item["event_type"] for item in response.body["items"]]
            else:  # no per-job events route: read the ledger directly
                rows = await pool.fetch("SELECT event_type FROM events WHERE job_uuid = $1 ORDER BY version", uuid)
                kinds = [row["event_type"] for row in rows]
            assert kinds.count("reused") == SUBMISSIONS - 1, kinds
        assert duplicates == [0] * ROUNDS, f"extra jobs per round: {duplicates}"
    finally:
        await session.close()
        await pool.close()


async def test_different_users_submitting_identically_get_their_own_jobs(
    two_services: tuple[ServiceProcess, ServiceProcess], database_dsn: str, settings: Settings
) -> None:
    pool = await create_pool(database_dsn, settings, min_size=1, max_size=3)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2 * SUBMISSIONS))
    try:
        users = [await _clients(pool, session, two_services, f"user-{n}", settings.uuid_prefix) for n in range(4)]
        for round_no in range(3):
            per_user = await asyncio.gather(
                *(_submit_at_once(clients, SUBMISSIONS // 4, {"shared": str(round_no)}) for clients in users)
            )
            owners: dict[str, str] = {}
            for clients, answers in zip(users, per_user, strict=True):
                assert len({uuid for _, uuid in answers}) == 1, answers
                uuid = answers[0][1]
                owners[uuid] = clients[0].user_uuid
                job = (await clients[0].get(f"jobs/{uuid}")).body
                assert job["owner_uuid"] == clients[0].user_uuid
            assert len(owners) == len(users)  # a user's unfinished job never goes to another user
    finally:
        await session.close()
        await pool.close()
