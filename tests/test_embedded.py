"""``jobledger serve`` with no ``DATABASE_URL``: the embedded PostgreSQL is started on ``JOBLEDGER_DATA``, reused
by the next start, stopped on exit, and recovered after the service was killed with SIGKILL.

These run the real console entry point in a subprocess, always on a throwaway embedded server of their own
(whatever ``DATABASE_URL`` the suite itself uses).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
START_LIMIT_SECONDS = 60.0

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _postmaster_pid(pgdata: Path) -> int | None:
    """The pid of the PostgreSQL server running on ``pgdata``, or None if none is."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (FileNotFoundError, ValueError):
        return None
    return pid if psutil.pid_exists(pid) else None


class Served:
    """One ``jobledger serve`` process on the embedded server."""

    def __init__(self, process: asyncio.subprocess.Process, port: int, stdout: Path) -> None:
        self.process = process
        self.base_url = f"http://127.0.0.1:{port}"
        self.stdout = stdout

    def printed(self) -> list[dict[str, str]]:
        """The JSON objects the service printed on stdout (the first start's admin token)."""
        return [json.loads(line) for line in self.stdout.read_text().splitlines() if line.startswith("{")]

    async def wait_healthy(self, session: aiohttp.ClientSession) -> None:
        """Until ``/healthz`` says the database is reachable."""
        deadline = asyncio.get_running_loop().time() + START_LIMIT_SECONDS
        while True:
            assert self.process.returncode is None, f"serve exited: {self.stdout.read_text()[-2000:]}"
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(self.base_url + "/healthz", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200 and (await resp.json())["database"] == "ok":
                        return
            assert asyncio.get_running_loop().time() < deadline, "the service did not become healthy"
            await asyncio.sleep(0.2)

    async def stop(self, sig: signal.Signals) -> int:
        """Send ``sig`` and wait for the process to exit; its exit code."""
        self.process.send_signal(sig)
        return await asyncio.wait_for(self.process.wait(), timeout=30)


@pytest.fixture
async def data_dir(tmp_path: Path) -> AsyncIterator[Path]:
    """A data folder for the embedded server; whatever is left running on it is stopped afterwards."""
    folder = tmp_path / "jobledger-data"
    yield folder
    from ledger.embedded import EmbeddedPostgres

    EmbeddedPostgres(folder).force_stop()


async def _serve(data_dir: Path, log: Path) -> Served:
    port = _free_port()
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    env["JOBLEDGER_DATA"] = str(data_dir)
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "api.cli", "serve", "--port", str(port),
            cwd=ROOT, env=env, stdout=out, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    return Served(process, port, log)


async def test_embedded_server_is_started_reused_stopped_and_recovered(data_dir: Path, tmp_path: Path) -> None:
    pgdata = data_dir / "pgdata"
    job = {"job": {"script_name": "hash.py", "script_version": "main", "script_parameters": {"n": 1}}}
    async with aiohttp.ClientSession() as session:
        # First start: a new cluster, an admin whose token is printed once.
        first = await _serve(data_dir, tmp_path / "first.log")
        await first.wait_healthy(session)
        (announced,) = first.printed()
        auth = {"Authorization": f"Bearer {announced['token']}"}
        async with session.post(first.base_url + "/orvos/v1/jobs", json=job, headers=auth) as resp:
            assert resp.status == 201
            job_uuid = (await resp.json())["uuid"]
        assert _postmaster_pid(pgdata) is not None
        assert await first.stop(signal.SIGTERM) == 0
        assert _postmaster_pid(pgdata) is None, "the last process using the server stops it"

        # Second start: the same cluster and data; no second admin.
        second = await _serve(data_dir, tmp_path / "second.log")
        await second.wait_healthy(session)
        assert second.printed() == []
        async with session.get(f"{second.base_url}/orvos/v1/jobs/{job_uuid}", headers=auth) as resp:
            assert resp.status == 200
        server_pid = _postmaster_pid(pgdata)
        assert server_pid is not None
        # Killed with SIGKILL: nothing stops the server, which keeps running.
        await second.stop(signal.SIGKILL)
        assert _postmaster_pid(pgdata) == server_pid

        # Third start: attaches to the orphaned server, serves the same data, and stops it on exit.
        third = await _serve(data_dir, tmp_path / "third.log")
        await third.wait_healthy(session)
        assert _postmaster_pid(pgdata) == server_pid, "the running server is reused, not replaced"
        async with session.get(f"{third.base_url}/orvos/v1/jobs/{job_uuid}", headers=auth) as resp:
            assert resp.status == 200
            assert (await resp.json())["script_parameters"] == {"n": 1}
        assert await third.stop(signal.SIGTERM) == 0
        assert _postmaster_pid(pgdata) is None
