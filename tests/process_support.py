"""Real processes for tests: ``jobledger serve`` in subprocesses (started, watched, signalled, killed with their
workers, reaped) and one-shot ``jobledger`` commands (``verify``, ``rebuild --check``...) run as a user would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import psutil

from tests.stream_support import eventually

ROOT = Path(__file__).resolve().parent.parent
STARTUP_SECONDS = 60.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServiceProcess:
    """``jobledger serve`` in a subprocess of its own: standard output collected line by line (the first
    start's admin token is printed there), standard error (the logs) in ``<name>.log``."""

    def __init__(
        self, name: str, process: asyncio.subprocess.Process, port: int, log: Path, scheme: str = "http"
    ) -> None:
        self.name = name
        self.process = process
        self.port = port
        self.base_url = f"{scheme}://127.0.0.1:{port}"
        self.log = log
        self.stdout_lines: list[str] = []
        assert process.stdout is not None
        self._reader = asyncio.create_task(self._collect(process.stdout))

    async def _collect(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.stdout_lines.append(line.decode(errors="replace").rstrip("\n"))

    def stderr(self) -> str:
        """Everything the process logged so far."""
        return self.log.read_text(errors="replace")

    def admin_tokens(self) -> list[str]:
        """The admin tokens announced on standard output (a first start on an empty database prints one)."""
        return [json.loads(line)["token"] for line in self.stdout_lines if '"admin_user_uuid"' in line]

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

    def _assert_running(self) -> None:
        assert self.process.returncode is None, f"{self.name} exited {self.process.returncode}: {self.stderr()[-3000:]}"

    async def wait_healthy(self, session: aiohttp.ClientSession, within: float = STARTUP_SECONDS) -> None:
        """Wait until ``/healthz`` answers 200 (failing at once if the process exits)."""

        async def healthy() -> bool:
            self._assert_running()
            return await self.health(session) is not None

        await eventually(healthy, f"{self.name} answers /healthz", within)

    async def wait_for(self, session: aiohttp.ClientSession, what: str, within: float = 20.0) -> None:
        """Wait until ``/healthz`` says ``stream.<what>`` is true."""

        async def reported() -> bool:
            self._assert_running()
            report = await self.health(session)
            return report is not None and bool(report["stream"][what])

        await eventually(reported, f"{self.name}: stream.{what}", within)

    async def wait_exit(self, within: float) -> int:
        """Wait for the process to exit; its status."""
        code = await asyncio.wait_for(self.process.wait(), within)
        await self._reader
        return code

    async def refuses_connections(self) -> bool:
        """True when a new TCP connection to the port is refused."""
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except ConnectionRefusedError:
            return True
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        return False

    async def kill(self) -> None:
        """SIGKILL the process and its workers (in process groups of their own), and reap it."""
        if self.process.returncode is None:
            try:
                children = [child.pid for child in psutil.Process(self.process.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                children = []
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        with contextlib.suppress(ProcessLookupError):
            await asyncio.wait_for(self.process.wait(), timeout=20)
        await self._reader


class ServiceProcesses:
    """Starts service processes on a database (``dsn`` None: no ``DATABASE_URL``, so the embedded PostgreSQL in
    ``JOBLEDGER_DATA``); on exit every one still running is killed, and all are reaped.

    ``async with ServiceProcesses(folder, dsn) as services: first = await services.start("first")``.
    """

    def __init__(self, folder: Path, dsn: str | None, env: dict[str, str] | None = None) -> None:
        self.folder = folder
        self.dsn = dsn
        self.env = {"JOBLEDGER_POOL_MIN": "1", "JOBLEDGER_POOL_MAX": "6", **(env or {})}
        self.processes: list[ServiceProcess] = []

    async def start(self, name: str, *args: str) -> ServiceProcess:
        """``jobledger serve --port <free> <args>``; its data folder (unless ``env`` names one) and its log
        (``<name>-<port>.log``) go in ``folder``."""
        port = free_port()
        log = self.folder / f"{name}-{port}.log"
        env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
        env.update({"JOBLEDGER_DATA": str(self.folder / f"{name}-{port}"), **self.env})
        if self.dsn is not None:
            env["DATABASE_URL"] = self.dsn
        with log.open("wb") as err:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "api.cli", "serve", "--port", str(port), *args,
                cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=err,
            )  # fmt: skip
        service = ServiceProcess(name, process, port, log, "https" if "--tls-cert" in args else "http")
        self.processes.append(service)
        return service

    async def close(self) -> None:
        """Kill every process still running and reap them all."""
        for service in self.processes:
            await service.kill()

    async def __aenter__(self) -> ServiceProcesses:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()


@contextlib.asynccontextmanager
async def serve(
    folder: Path, dsn: str | None, *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[ServiceProcess]:
    """One ``jobledger serve <args>`` on ``dsn`` (see ``ServiceProcesses``); killed and reaped on the way out."""
    async with ServiceProcesses(folder, dsn, {"JOBLEDGER_POOL_MAX": "8", **(env or {})}) as services:
        yield await services.start("serve", *args)


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
