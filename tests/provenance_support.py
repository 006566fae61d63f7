"""Helpers shared by the provenance tests: sequencing, a lifecycle workload over HTTP, a small tamperable ledger."""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from ledger.access import Caller
from ledger.config import Settings
from ledger.database import init_connection
from ledger.export import export_lines
from ledger.sequencer import CHANNEL, SequencerBusy, sequence_pending
from ledger.service import JobService
from ledger.signing import SigningKey, load_or_create_signing_key
from ledger.store import EventStore
from ledger.users import create_token, create_user
from ledger.verify import verify_ledger
from tests.harness import ApiClient, Response

COMMIT = "0123456789abcdef0123456789abcdef01234567"


UNSEQUENCED = "SELECT count(*) FROM events e WHERE NOT EXISTS (SELECT 1 FROM event_positions p WHERE p.event_id = e.id)"
HEAD = "SELECT coalesce(max(position), 0) FROM event_positions"


async def sequence_all(pool: asyncpg.Pool) -> int:
    """Return the head once every committed event has a position (call it when nothing is writing).

    Sequences them here; or, while a running service's sequencer holds the lead (``SequencerBusy``), waits
    for it: it is poked by every append, and each batch it commits is NOTIFYed on ``CHANNEL``. Every wait
    re-checks the database, so a missed notification costs a tenth of a second, not the test.
    """
    moved = asyncio.Event()

    def heard(*_: object) -> None:
        moved.set()

    async with pool.acquire() as conn, asyncio.timeout(10):
        await conn.add_listener(CHANNEL, heard)
        try:
            while True:
                moved.clear()
                with contextlib.suppress(SequencerBusy):
                    await sequence_pending(conn)
                if await conn.fetchval(UNSEQUENCED) == 0:
                    return await conn.fetchval(HEAD)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(moved.wait(), 0.1)
        finally:
            await conn.remove_listener(CHANNEL, heard)


async def lifecycle(user: ApiClient, dispatcher: ApiClient, *, outcome: str = "finish", **attrs: Any) -> str:
    """Create a job and take it through lock, start and ``outcome`` (finish, cancel or none); return its uuid."""
    created = await user.create_job(**attrs)
    assert created.status == 201, created.body
    uuid = created.body["uuid"]
    await ok(dispatcher.post(f"jobs/{uuid}/lock"))
    await ok(dispatcher.post(f"jobs/{uuid}/start", json={"script_version": COMMIT}))
    if outcome == "finish":
        await ok(dispatcher.post(f"jobs/{uuid}/finish", json={"success": True, "output": "out", "log": "log"}))
    elif outcome == "cancel":
        await ok(user.post(f"jobs/{uuid}/cancel"))
    return uuid


async def ok(pending: Any) -> Response:
    """Await a request and insist on 200."""
    response = await pending
    assert response.status == 200, (response.status, response.body)
    return response


def seeded(seed: int) -> random.Random:
    """A reproducible random source (the seed is in the test id, so a failure can be replayed)."""
    return random.Random(seed)


EVENTS = (
    "SELECT e.id, e.job_uuid, e.version, e.event_type, p.position "
    "FROM events e JOIN event_positions p ON p.event_id = e.id ORDER BY p.position"
)


@dataclass
class Ledger:
    """A small sequenced ledger in the test's own database."""

    pool: asyncpg.Pool
    dsn: str
    key: SigningKey
    jobs: list[str]
    events: list[asyncpg.Record]  # id, job_uuid, version, event_type, position; in position order
    dispatcher: str

    def event(self, job: int, version: int) -> asyncpg.Record:
        return next(e for e in self.events if e["job_uuid"] == self.jobs[job] and e["version"] == version)

    async def tamper(self, *statements: tuple[Any, ...]) -> None:
        """Run ``(sql, *args)`` statements in one transaction as the superuser, triggers and foreign keys off."""
        conn = await asyncpg.connect(self.dsn)
        await init_connection(conn)  # jsonb as Python values, like the service's pool
        try:
            async with conn.transaction():
                await conn.execute("SET LOCAL session_replication_role = replica")
                for sql, *args in statements:
                    await conn.execute(sql, *args)
        finally:
            await conn.close()

    async def export(self) -> list[str]:
        return [line async for line in export_lines(self.pool)]


async def build_ledger(pool: asyncpg.Pool, dsn: str, data_dir: Path) -> Ledger:
    """Three jobs through ``JobService`` (13 events, interleaved), sequenced, verified, and a signing key."""
    owner = await create_user(pool, "owner", "user", "zzzzz")
    dispatcher = await create_user(pool, "dispatcher", "dispatcher", "zzzzz")
    owner_client = (await create_token(pool, owner.uuid, "zzzzz", client_name="workbench")).api_client_uuid
    dispatch_client = (await create_token(pool, dispatcher.uuid, "zzzzz", client_name="crunch")).api_client_uuid
    as_owner = Caller(owner.uuid, "user", owner_client, request_id="req-owner")
    as_dispatcher = Caller(dispatcher.uuid, "dispatcher", dispatch_client, request_id="req-dispatch")
    service = JobService(EventStore(pool))
    jobs = []
    for n in range(3):
        job, _ = await service.create(
            as_owner, script_name="hash.py", script_version="main", script_parameters={"n": n}, reuse=False
        )
        jobs.append(job.uuid)
    await service.update(as_owner, jobs[0], {"priority": 4})
    for uuid in jobs:  # interleaved, so each job's events are spread over the global chain
        await service.lock(as_dispatcher, uuid)
    for uuid in jobs:
        await service.start(as_dispatcher, uuid, COMMIT)
    for uuid in jobs:
        await service.finish(as_dispatcher, uuid, success=True, output=f"out-{uuid}")
    await sequence_all(pool)
    key = load_or_create_signing_key(Settings(data_dir=data_dir))
    built = Ledger(pool, dsn, key, jobs, await pool.fetch(EVENTS), dispatcher.uuid)
    report = await verify_ledger(pool)
    assert report.ok, report.findings
    assert report.head == len(built.events) == 13
    return built
