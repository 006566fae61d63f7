"""``jobledger serve`` with no ``DATABASE_URL``: the embedded PostgreSQL is started on ``JOBLEDGER_DATA``, reused
by the next start, stopped on exit, and recovered after the service was killed with SIGKILL.

These run the real console entry point in a subprocess, always on a throwaway embedded server of their own
(whatever ``DATABASE_URL`` the suite itself uses).
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import psutil
import pytest

from ledger.embedded import EmbeddedPostgres
from tests.process_support import ServiceProcesses

pytestmark = pytest.mark.slow


def _postmaster_pid(pgdata: Path) -> int | None:
    """The pid of the PostgreSQL server running on ``pgdata``, or None if none is."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (FileNotFoundError, ValueError):
        return None
    return pid if psutil.pid_exists(pid) else None


@pytest.fixture
async def data_dir(tmp_path: Path) -> AsyncIterator[Path]:
    """A data folder for the embedded server; whatever is left running on it is stopped afterwards."""
    folder = tmp_path / "jobledger-data"
    yield folder
    EmbeddedPostgres(folder).force_stop()


async def test_embedded_server_is_started_reused_stopped_and_recovered(data_dir: Path, tmp_path: Path) -> None:
    pgdata = data_dir / "pgdata"
    job = {"job": {"script_name": "hash.py", "script_version": "main", "script_parameters": {"n": 1}}}
    async with (
        aiohttp.ClientSession() as session,
        ServiceProcesses(tmp_path, None, {"JOBLEDGER_DATA": str(data_dir)}) as services,
    ):
        # First start: a new cluster, an admin whose token is printed once.
        first = await services.start("first")
        await first.wait_healthy(session)
        (token,) = first.admin_tokens()
        auth = {"Authorization": f"Bearer {token}"}
        async with session.post(first.base_url + "/orvos/v1/jobs", json=job, headers=auth) as resp:
            assert resp.status == 201
            job_uuid = (await resp.json())["uuid"]
        assert _postmaster_pid(pgdata) is not None
        first.process.send_signal(signal.SIGTERM)
        assert await first.wait_exit(30) == 0
        assert _postmaster_pid(pgdata) is None, "the last process using the server stops it"

        # Second start: the same cluster and data; no second admin.
        second = await services.start("second")
        await second.wait_healthy(session)
        assert second.admin_tokens() == []
        async with session.get(f"{second.base_url}/orvos/v1/jobs/{job_uuid}", headers=auth) as resp:
            assert resp.status == 200
        server_pid = _postmaster_pid(pgdata)
        assert server_pid is not None
        # Killed with SIGKILL: nothing stops the server, which keeps running.
        await second.kill()
        assert _postmaster_pid(pgdata) == server_pid

        # Third start: attaches to the orphaned server, serves the same data, and stops it on exit.
        third = await services.start("third")
        await third.wait_healthy(session)
        assert _postmaster_pid(pgdata) == server_pid, "the running server is reused, not replaced"
        async with session.get(f"{third.base_url}/orvos/v1/jobs/{job_uuid}", headers=auth) as resp:
            assert resp.status == 200
            assert (await resp.json())["script_parameters"] == {"n": 1}
        third.process.send_signal(signal.SIGTERM)
        assert await third.wait_exit(30) == 0
        assert _postmaster_pid(pgdata) is None
