"""Real processes for tests: ``jobledger serve`` in subprocesses (started, watched, killed, reaped) and one-shot
``jobledger`` commands (``verify``, ``rebuild --check``...) run as a user would run them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from tests.stream_support import eventually

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServiceProcess:
    """``jobledger serve`` in a subprocess of its own."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, port: int, log: Path) -> None:
        self.name = name
        self.process = process
        self.base_url = f"http://127.0.0.1:{port}"
        self.log = log

    async def health(self, session: aiohttp.ClientSession) -> dict[str, Any] | None:
        """The ``/healthz`` report, or None while it does not answer 200."""
        try:
            async with session.get(self.base_url + "/healthz", timeout=aiohttp.ClientTimeout(total=2)) as response:
                if response.status != 200:
                    return None
                body: dict[str, Any] = await response.json()
                return body
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def wait_for(self, session: aiohttp.ClientSession, what: str, within: float = 20.0) -> None:
        """Wait until ``/healthz`` says ``stream.<what>`` is true."""

        async def reported() -> bool:
            assert self.process.returncode is None, f"{self.name} exited: {self.log.read_text()[-2000:]}"
            report = await self.health(session)
            return report is not None and bool(report["stream"][what])

        await eventually(reported, f"{self.name}: stream.{what}", within)


class ServiceProcesses:
    """Starts service processes on a database; on exit every one still running is killed, and all are reaped.

    ``async with ServiceProcesses(folder, dsn) as services: first = await services.start("first")``.
    """

    def __init__(self, folder: Path, dsn: str, env: dict[str, str] | None = None) -> None:
        self.folder = folder
        self.dsn = dsn
        self.env = {"JOBLEDGER_POOL_MIN": "1", "JOBLEDGER_POOL_MAX": "6", **(env or {})}
        self.processes: list[ServiceProcess] = []

    async def start(self, name: str) -> ServiceProcess:
        """``jobledger serve`` on a free port; its data folder and log (``<name>.log``) go in ``folder``."""
        port = free_port()
        log = self.folder / f"{name}.log"
        env = {**os.environ, "DATABASE_URL": self.dsn, "JOBLEDGER_DATA": str(self.folder / name), **self.env}
        with log.open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "api.cli", "serve", "--port", str(port),
                cwd=ROOT, env=env, stdout=out, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
        service = ServiceProcess(name, process, port, log)
        self.processes.append(service)
        return service

    async def close(self) -> None:
        """Kill every process still running and reap them all."""
        for service in self.processes:
            if service.process.returncode is None:
                service.process.kill()
            with contextlib.suppress(ProcessLookupError):
                await asyncio.wait_for(service.process.wait(), timeout=10)

    async def __aenter__(self) -> ServiceProcesses:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()


async def jobledger(*args: str, data: Path, dsn: str | None) -> tuple[int, str, str]:
    """Run the ``jobledger`` CLI in another process; return (exit status, stdout, stderr).

    Only ``dsn`` (None: none, so the embedded server in ``data``) and ``data`` come from the caller: the
    test's own ``DATABASE_URL`` and signing key never leak into the command.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "JOBLEDGER_SIGNING_KEY")}
    env["JOBLEDGER_DATA"] = str(data)
    if dsn is not None:
        env["DATABASE_URL"] = dsn
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "api.cli", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()
