"""``jobledger serve`` as a real subprocess, for the tests of workers, shutdown and process-level logging."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.stream_support import eventually

ROOT = Path(__file__).resolve().parent.parent
STARTUP_SECONDS = 60.0


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ServeProcess:
    """A running ``jobledger serve``: its process, URL, standard output lines and standard error file."""

    process: asyncio.subprocess.Process
    port: int
    stderr_path: Path
    stdout_lines: list[str] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        """Everything the process wrote to standard error so far."""
        return self.stderr_path.read_text(errors="replace")

    def admin_tokens(self) -> list[str]:
        """The admin tokens announced on standard output (a first start on an empty database prints one)."""
        return [json.loads(line)["token"] for line in self.stdout_lines if '"admin_user_uuid"' in line]

    async def health(self, session: aiohttp.ClientSession) -> dict[str, Any] | None:
        """The ``/healthz`` report, or None while nothing answers."""
        try:
            async with session.get(self.base_url + "/healthz", timeout=aiohttp.ClientTimeout(total=2)) as response:
                return await response.json() if response.status == 200 else None
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def wait_healthy(self, session: aiohttp.ClientSession) -> None:
        """Wait until ``/healthz`` answers 200 (failing at once if the process exits)."""

        async def healthy() -> bool:
            assert self.process.returncode is None, f"serve exited {self.process.returncode}: {self.stderr()[-3000:]}"
            return await self.health(session) is not None

        await eventually(healthy, "jobledger serve answers /healthz", STARTUP_SECONDS)

    async def wait_exit(self, within: float) -> int:
        """Wait for the process to exit; its status."""
        code = await asyncio.wait_for(self.process.wait(), within)
        if self._reader is not None:
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


async def _collect(stream: asyncio.StreamReader, lines: list[str]) -> None:
    while line := await stream.readline():
        lines.append(line.decode(errors="replace").rstrip("\n"))


@contextlib.asynccontextmanager
async def serve(
    tmp_path: Path, database_dsn: str | None, *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[ServeProcess]:
    """Run ``jobledger serve --port <free> <args>`` on ``database_dsn`` (None: no ``DATABASE_URL``, so the
    embedded PostgreSQL in ``JOBLEDGER_DATA``); killed (and reaped) on the way out."""
    port = free_port()
    stderr_path = tmp_path / f"serve-{port}.stderr"
    full_env = {
        **os.environ,
        "JOBLEDGER_DATA": str(tmp_path / f"data-{port}"),
        "JOBLEDGER_POOL_MIN": "1",
        "JOBLEDGER_POOL_MAX": "8",
        **(env or {}),
    }
    full_env.pop("DATABASE_URL", None)
    if database_dsn is not None:
        full_env["DATABASE_URL"] = database_dsn
    with stderr_path.open("wb") as err:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "api.cli", "serve", "--port", str(port), *args,
            cwd=ROOT, env=full_env, stdout=asyncio.subprocess.PIPE, stderr=err,
        )  # fmt: skip
    assert process.stdout is not None
    served = ServeProcess(process, port, stderr_path)
    served._reader = asyncio.create_task(_collect(process.stdout, served.stdout_lines))
    try:
        yield served
    finally:
        if process.returncode is None:
            # Kill the whole family: with --workers the children are in process groups of their own.
            for child in _children(process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, 9)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        await asyncio.wait_for(process.wait(), 20)
        await served._reader


def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
