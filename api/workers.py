"""``jobledger serve --workers N``: N service processes answering on one listening socket.

The parent binds the socket once and hands it to N spawned children (``python -m api.cli serve --listen-fd``),
which all accept on it; it serves nothing itself. Chosen over ``SO_REUSEPORT`` (every worker binding its own
socket) because:

* a bind error (port taken, bad address) is reported once, by the parent, before anything starts, and
  ``--port 0`` means one port, not N different ones;
* no other process can join the port: with ``SO_REUSEPORT`` any process of the same user binding it with the
  option gets a share of the connections;
* connections waiting in the accept queue belong to the one socket, so a worker that stops or dies leaves
  them to the others; with ``SO_REUSEPORT`` each socket has its own queue, and a closing worker drops the
  connections that the kernel had already hashed to it;
* it works the same on every Unix (``SO_REUSEPORT`` does not balance on macOS or the BSDs).

The cost: the kernel wakes the workers waiting in ``accept`` and whichever is first takes the connection,
so the spread is not exactly even (it is close to even under load; see ``bench/workers.py``).

Children are spawned, not forked: each is a fresh interpreter with nothing inherited but the socket, a pipe
and the environment. With no ``DATABASE_URL`` the parent starts the embedded PostgreSQL once and passes its
address to the children. The children run ``prometheus_client`` in multiprocess mode in a folder the parent
makes and removes, so any worker's ``/metrics`` describes all of them (``api.metrics``).

Lifecycle: SIGTERM or SIGINT to the parent is forwarded once (as SIGTERM) to every worker, which shuts down gracefully
(``api.cli``: in-flight requests finish, streams end, new connections are refused); a worker still running
``KILL_GRACE_SECONDS`` after the shutdown timeout is killed. Nothing is restarted: a worker that exits on its
own (crash, failed start) is logged, the others are stopped gracefully, and the parent exits non-zero, so
that the service manager (systemd, Kubernetes, ...) that owns restart policy sees the failure instead of a
silently degraded service. The children run in their own process group, so a terminal's Ctrl-C reaches them
once (forwarded), not twice; and each watches a pipe from the parent, so if the parent is killed outright
the workers stop themselves instead of lingering on the port.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Final

from aiohttp import web

from api.metrics import MULTIPROCESS_ENV

_log = logging.getLogger("jobledger.workers")

KILL_GRACE_SECONDS: Final = 10.0
_POLL_SECONDS: Final = 0.1
BACKLOG: Final = 128  # aiohttp's default for a site it binds itself


def bind(host: str, port: int) -> socket.socket:
    """The listening socket every worker accepts on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=BACKLOG)


@dataclass
class Worker:
    """One child process."""

    index: int
    process: subprocess.Popen[bytes]
    reported: bool = False


class Supervisor:
    """Spawns the workers, forwards the stop signals, reaps them, and decides the exit status."""

    def __init__(self, workers: int, command: Sequence[str], env: dict[str, str], shutdown_timeout: float) -> None:
        self.count = workers
        self.command = list(command)
        self.env = env
        self.shutdown_timeout = shutdown_timeout
        self.workers: list[Worker] = []
        self.stopping = False
        self.kill_at: float | None = None
        self.status = 0

    def run(self, sock: socket.socket) -> int:
        """Start the workers on ``sock`` and wait until every one has exited; the exit status."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        watch_read, watch_write = os.pipe()  # the children see EOF on it when this process ends, however
        try:
            for index in range(self.count):
                if self.stopping:
                    break
                self.workers.append(self._spawn(index, sock.fileno(), watch_read))
            os.close(watch_read)
            sock.close()  # the workers hold it now; once they have all closed theirs, connections are refused
            _log.info(
                "serving with %d workers (pids %s)", self.count, ", ".join(str(w.process.pid) for w in self.workers)
            )
            self._wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(watch_write)
        return self.status

    def _spawn(self, index: int, listen_fd: int, watch_fd: int) -> Worker:
        argv = [
            *self.command,
            "--listen-fd",
            str(listen_fd),
            "--parent-fd",
            str(watch_fd),
            "--worker-index",
            str(index),
        ]
        process = subprocess.Popen(argv, env=self.env, pass_fds=(listen_fd, watch_fd), process_group=0)
        return Worker(index, process)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping:
            _log.info("already stopping; waiting for the workers (they are killed after the shutdown timeout)")
            return
        _log.info("received %s: stopping the workers", signal.Signals(signum).name)
        self._stop()

    def _stop(self) -> None:
        # Always SIGTERM, whatever the parent got: the workers shut down the same way on either, and one still
        # starting (before run_app handles signals) simply ends, where SIGINT would print a KeyboardInterrupt.
        self.stopping = True
        self.kill_at = time.monotonic() + self.shutdown_timeout + KILL_GRACE_SECONDS
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)

    def _wait(self) -> None:
        while True:
            live = 0
            for worker in self.workers:
                code = worker.process.poll()
                if code is None:
                    live += 1
                elif not worker.reported:
                    worker.reported = True
                    self._exited(worker, code)
            if not live:
                return
            if self.kill_at is not None and time.monotonic() > self.kill_at:
                for worker in self.workers:
                    if worker.process.poll() is None:
                        _log.error(
                            "worker %d (pid %d) did not stop in time: killing it", worker.index, worker.process.pid
                        )
                        worker.process.kill()
                self.kill_at = None
                self.status = self.status or 1
            time.sleep(_POLL_SECONDS)

    def _exited(self, worker: Worker, code: int) -> None:
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(worker.process.pid, self.env[MULTIPROCESS_ENV])  # its live gauges leave the scrape
        status = 128 - code if code < 0 else code  # killed by a signal: the shell's 128 + signal number
        if self.stopping:
            stopped = code in (0, -signal.SIGTERM)  # shut down, or ended by our SIGTERM before it could handle it
            log = _log.info if stopped else _log.warning
            log("worker %d (pid %d) exited with status %d", worker.index, worker.process.pid, status)
            if not stopped:
                self.status = self.status or status
            return
        _log.error(
            "worker %d (pid %d) exited on its own with status %d: stopping the others (nothing is restarted)",
            worker.index,
            worker.process.pid,
            status,
        )
        self.status = status or 1
        self._stop()


def serve_workers(workers: int, argv: Sequence[str], sock: socket.socket, dsn: str, shutdown_timeout: float) -> int:
    """Run ``workers`` children of ``jobledger <argv>`` on ``sock`` and the database at ``dsn``; exit status."""
    with tempfile.TemporaryDirectory(prefix="jobledger-metrics-") as metrics_dir:
        env = {**os.environ, "DATABASE_URL": dsn, MULTIPROCESS_ENV: metrics_dir}
        # The children run the same command line: the last --workers wins, so each serves by itself.
        command = [sys.executable, "-m", "api.cli", *argv, "--workers", "1"]
        return Supervisor(workers, command, env, shutdown_timeout).run(sock)


def watch_parent(app: web.Application, fd: int) -> None:
    """In a worker: stop gracefully, as on SIGTERM, when the parent's end of the pipe ``fd`` closes."""

    async def start_watching(app: web.Application) -> None:
        loop = asyncio.get_running_loop()

        def readable() -> None:
            if os.read(fd, 1):
                return  # the parent never writes; nothing to do
            loop.remove_reader(fd)
            _log.error("the supervising process is gone: stopping")
            os.kill(os.getpid(), signal.SIGTERM)  # run_app's handler: the same graceful exit

        loop.add_reader(fd, readable)

    app.on_startup.append(start_watching)
