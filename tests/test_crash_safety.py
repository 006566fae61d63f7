"""Crash safety: SIGKILL the service under a parallel write load, start it again, and nothing acknowledged is
lost, nothing is half-written, and a request that got no answer was done entirely or not at all.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from ledger.config import Settings
from ledger.database import create_pool
from ledger.users import create_token, create_user
from tests.fault_support import WriteLoad, assert_ledger_whole, lost_acknowledged_writes
from tests.harness import ApiClient
from tests.process_support import ServiceProcesses
from tests.stream_support import eventually, wait_until_sequenced

CLIENTS = 16
LOAD_SECONDS = 3.0


@pytest.mark.slow
async def test_sigkill_under_write_load_loses_nothing_acknowledged(
    tmp_path: Path, database_dsn: str, settings: Settings
) -> None:
    pool = await create_pool(database_dsn, settings, min_size=1, max_size=4)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4 * CLIENTS))
    try:
        tokens = {}
        for role in ("user", "dispatcher"):
            user = await create_user(pool, f"crash-{role}", role, settings.uuid_prefix)
            tokens[role] = (user.uuid, (await create_token(pool, user.uuid, settings.uuid_prefix)).token)
        async with ServiceProcesses(tmp_path, database_dsn, {"JOBLEDGER_POOL_MAX": "10"}) as services:
            first = await services.start("first")
            await first.wait_for(session, "sequencer")

            def clients(base_url: str) -> tuple[ApiClient, ApiClient]:
                (user_uuid, user_token), (dispatcher_uuid, dispatcher_token) = tokens["user"], tokens["dispatcher"]
                return (
                    ApiClient(session, base_url, user_token, user_uuid, "user"),
                    ApiClient(session, base_url, dispatcher_token, dispatcher_uuid, "dispatcher"),
                )

            load = WriteLoad(*clients(first.base_url), timeout=10.0)
            stop = asyncio.Event()
            writers = asyncio.create_task(load.run(CLIENTS, stop))
            await eventually(lambda: len(load.created) >= 50, "the load getting going", 15.0)
            await asyncio.sleep(LOAD_SECONDS)
            acknowledged_before_kill = len(load.acknowledged)
            killed_at = time.monotonic()
            first.process.send_signal(signal.SIGKILL)
            await first.process.wait()
            stop.set()
            await asyncio.wait_for(writers, timeout=15)
            in_flight = load.during(killed_at, killed_at)

            second = await services.start("second")
            await second.wait_for(session, "sequencer")
            recovered = time.monotonic() - killed_at

            # A create that got no answer is retried with its submit_id: the original job if it committed,
            # else a new one; either way exactly one job for it, and a second retry agrees.
            user, _ = clients(second.base_url)
            for submit_id, job in load.unanswered.items():
                first_retry = await user.post("jobs", json={"job": job}, params={"allow_duplicate": "true"})
                assert first_retry.status in (200, 201), first_retry.body
                again = await user.post("jobs", json={"job": job}, params={"allow_duplicate": "true"})
                assert again.status == 200, again.body
                assert again.body["uuid"] == first_retry.body["uuid"]
                count = await pool.fetchval("SELECT count(*) FROM jobs WHERE submit_id = $1", submit_id)
                assert count == 1, f"{count} jobs for submit_id {submit_id}"
            # The acknowledged creates too: a retry returns the job the first answer named, and adds nothing.
            events_before = await pool.fetchval("SELECT count(*) FROM events")
            for answer in list(load.created.values())[:: max(len(load.created) // 20, 1)]:
                retry = await user.post(
                    "jobs",
                    json={"job": {k: answer[k] for k in ("script_name", "script_version", "script_parameters",
                                                        "submit_id")}},
                    params={"allow_duplicate": "true"},
                )  # fmt: skip
                assert retry.status == 200, retry.body
                assert retry.body["uuid"] == answer["uuid"]
            assert await pool.fetchval("SELECT count(*) FROM events") == events_before

            await wait_until_sequenced(pool)
            lost = await lost_acknowledged_writes(pool, load.acknowledged)
            assert lost == [], f"{len(lost)} acknowledged writes lost: {lost[:5]}"
            assert load.bad == [], load.bad[:5]
            head = await assert_ledger_whole(pool, database_dsn, tmp_path / "cli")
        unanswered = [o for o in in_flight if o.status is None]
        print(
            f"\ncrash safety: {CLIENTS} clients, 1 SIGKILL; {acknowledged_before_kill} writes acknowledged before "
            f"it, {len(in_flight)} in flight at the kill ({len(unanswered)} never answered); "
            f"{len(load.unanswered)} unanswered creates retried; lost acknowledged writes: {len(lost)}; "
            f"{head} events, dense; restarted and sequencing again {recovered:.2f} s after the kill"
        )
        assert unanswered, "the kill caught no request in flight: the test proved nothing about them"
    finally:
        await session.close()
        await pool.close()
