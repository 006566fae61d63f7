"""Shared helpers for the hand-run benchmarks: a server, scratch databases, a load driver and a table printer.

Benchmarks are run by hand (``python -m bench.<name>``), never from the test suite. They use the server named
by ``DATABASE_URL`` when it is set, and otherwise start the embedded PostgreSQL in a throwaway folder and
stop it at the end. Each run works in scratch databases of its own (``bench_*``), dropped when it is done.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from ledger.database import apply_schema, with_database
from ledger.embedded import temporary_server

_scratch_counter = itertools.count()


# ---- the server and scratch databases ----------------------------------------------------------------------
@contextmanager
def postgres_server() -> Iterator[str]:
    """Yield a DSN for a server to benchmark: ``DATABASE_URL`` if set, else a fresh embedded PostgreSQL."""
    with temporary_server(os.environ.get("DATABASE_URL"), prefix="jobledger-bench-") as dsn:
        yield dsn


@asynccontextmanager
async def scratch_database(server_dsn: str, *, schema: bool = True) -> AsyncIterator[str]:
    """Yield a DSN for a new, empty ``bench_*`` database (with ``schema.sql`` applied); drop it afterwards."""
    name = f"bench_{os.getpid()}_{next(_scratch_counter)}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        dsn = with_database(server_dsn, name)
        try:
            if schema:
                conn = await asyncpg.connect(dsn)
                try:
                    await apply_schema(conn)
                finally:
                    await conn.close()
            yield dsn
        finally:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


async def server_version(dsn: str) -> str:
    """The server's ``version()`` string, e.g. ``PostgreSQL 15.20 (Debian ...) on x86_64-pc-linux-gnu, ...``."""
    conn = await asyncpg.connect(dsn)
    try:
        version: str = await conn.fetchval("SELECT version()")
        return version
    finally:
        await conn.close()


async def checkpoint(conn: asyncpg.Connection) -> None:
    """Force a checkpoint (needs superuser or ``pg_checkpoint``), so that each measured run starts alike.

    Without it, runs that happen to follow a checkpoint pay full-page writes that others do not. Silently does
    nothing when the role may not checkpoint.
    """
    with suppress(asyncpg.InsufficientPrivilegeError):
        await conn.execute("CHECKPOINT")


async def checkpoint_server(dsn: str) -> None:
    """``checkpoint`` on a connection of its own to ``dsn`` (a CHECKPOINT is cluster-wide)."""
    conn = await asyncpg.connect(dsn)
    try:
        await checkpoint(conn)
    finally:
        await conn.close()


# ---- the load driver -------------------------------------------------------------------------------------
async def backend_pids(conn: asyncpg.Connection) -> list[int]:
    """Process ids of the other server backends connected to ``conn``'s database."""
    rows = await conn.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    return [row["pid"] for row in rows]


_CLOCK_TICKS: float = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a server the benchmark starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def process_cpu(pids: Iterable[int]) -> dict[int, float]:
    """CPU seconds used so far by each of ``pids`` that this host's ``/proc`` can show.

    Reads the scheduler's exact run time (``/proc/PID/schedstat``), falling back to the tick-sampled user +
    system time of ``/proc/PID/stat``, which misattributes short bursts. Works only when the server runs on this
    machine (always so for 127.0.0.1 and the embedded server) and its processes are readable; others are left out.
    """
    seconds = {}
    for pid in pids:
        try:
            seconds[pid] = int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
            continue
        except (OSError, ValueError, IndexError):
            pass
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seconds[pid] = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    return seconds


CpuProbe = Callable[[], Awaitable[dict[int, float]]]
"""Cumulative CPU seconds of some processes by pid (e.g. server backends), read before and after a run."""


@dataclass(frozen=True, slots=True)
class RunResult:
    """What one load run measured. Latencies are in seconds, one per completed operation.

    ``client_cpu`` is this process's CPU time during the run; ``server_cpu`` that of the probed processes alive
    at its end (NaN without a probe). On a machine the client shares with the server, CPU per
    operation is a steadier measure than throughput, which other load on the machine shifts.
    """

    workers: int
    ops: int
    elapsed: float
    latencies: tuple[float, ...]
    client_cpu: float = math.nan
    server_cpu: float = math.nan

    @property
    def ops_per_s(self) -> float:
        """Completed operations per second of wall time."""
        return self.ops / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def client_us_per_op(self) -> float:
        """Client CPU microseconds per operation."""
        return self.client_cpu / self.ops * 1e6 if self.ops else math.nan

    @property
    def server_us_per_op(self) -> float:
        """Server CPU microseconds per operation (probed processes only)."""
        return self.server_cpu / self.ops * 1e6 if self.ops else math.nan

    def percentile_ms(self, fraction: float) -> float:
        """The latency at ``fraction`` (0 < fraction <= 1, nearest rank), in milliseconds."""
        if not self.latencies:
            return math.nan
        ordered = sorted(self.latencies)
        return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)] * 1000

    @property
    def p50_ms(self) -> float:
        """Median latency, in milliseconds."""
        return self.percentile_ms(0.50)

    @property
    def p99_ms(self) -> float:
        """99th-percentile latency, in milliseconds."""
        return self.percentile_ms(0.99)


Operation = Callable[[int], Awaitable[object]]
"""One unit of work; it is given the index of the worker running it (0 .. workers-1)."""


async def run_workers(
    op: Operation,
    workers: int,
    *,
    seconds: float | None = None,
    count: int | None = None,
    warmup: float = 0.0,
    server_cpu: CpuProbe | None = None,
) -> RunResult:
    """Run ``op`` in ``workers`` concurrent asyncio tasks, each calling it back to back, and time every call.

    Stops after ``seconds`` of wall time (no new operation starts after the deadline; those in flight finish
    and count) or after ``count`` operations in total; exactly one of the two must be given. ``warmup``
    seconds of the same load run first and are not measured (prepared statements, caches, pool). An
    exception in any operation ends the run and propagates. ``server_cpu``, if given, is read after the
    warm-up and at the end (see ``RunResult``).
    """
    if (seconds is None) == (count is None):
        raise ValueError("give exactly one of seconds and count")
    if workers < 1:
        raise ValueError("at least one worker")

    if warmup > 0:
        await _drive(op, workers, deadline=time.perf_counter() + warmup, tickets=None)
    tickets = None if count is None else iter(range(count))
    server_before = await server_cpu() if server_cpu is not None else None
    client_before = time.process_time()
    start = time.perf_counter()
    deadline = None if seconds is None else start + seconds
    per_worker = await _drive(op, workers, deadline=deadline, tickets=tickets)
    elapsed = time.perf_counter() - start
    client = time.process_time() - client_before
    server = math.nan
    if server_cpu is not None and server_before is not None:
        server_after = await server_cpu()
        # A process that started during the run counts whole; one that ended during it is lost.
        server = sum(after - server_before.get(pid, 0.0) for pid, after in server_after.items())
    latencies = tuple(itertools.chain.from_iterable(per_worker))
    return RunResult(
        workers=workers, ops=len(latencies), elapsed=elapsed, latencies=latencies, client_cpu=client, server_cpu=server
    )


async def _drive(
    op: Operation, workers: int, *, deadline: float | None, tickets: Iterator[int] | None
) -> list[list[float]]:
    clock = time.perf_counter

    async def worker(index: int) -> list[float]:
        latencies: list[float] = []
        while True:
            if deadline is not None and clock() >= deadline:
                break
            if tickets is not None and next(tickets, None) is None:
                break
            began = clock()
            await op(index)
            latencies.append(clock() - began)
        return latencies

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(worker(i)) for i in range(workers)]
    return [task.result() for task in tasks]


def median(values: Sequence[float]) -> float:
    """The median of ``values`` (NaN when empty)."""
    return statistics.median(values) if values else math.nan


# ---- output ----------------------------------------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table; numbers are right-aligned, floats shown with sensible precision."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            if math.isnan(value):
                return "–"
            return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        return str(value)

    text = [[cell(v) for v in row] for row in rows]
    numeric = [
        all(isinstance(row[i], int | float) and not isinstance(row[i], bool) for row in rows) if rows else False
        for i in range(len(headers))
    ]
    widths = [max([len(h), *(len(r[i]) for r in text)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric, strict=True)]
        return "| " + " | ".join(padded) + " |"

    dashes = ["-" * (w + 1) + ":" if num else "-" * (w + 2) for w, num in zip(widths, numeric, strict=True)]
    return "\n".join([line(headers), "|" + "|".join(dashes) + "|", *(line(r) for r in text)])


def report_header(module: str, version: str, shared_by: str) -> list[str]:
    """A report's first lines: the date, the exact command and its target, the server and the CPUs."""
    command = f"python -m bench.{module} " + " ".join(sys.argv[1:])
    target = "DATABASE_URL" if os.environ.get("DATABASE_URL") else "embedded PostgreSQL"
    return [
        f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  ",
        f"Command: `{command}` against {target}  ",
        f"Server: {version}; CPUs: {os.cpu_count()} (shared by {shared_by})  ",
    ]


# ---- the command line ------------------------------------------------------------------------------------
def int_list(text: str) -> list[int]:
    """``1,8,32`` → ``[1, 8, 32]``, for comma-separated options."""
    return [int(part) for part in text.split(",")]


def add_run_options(parser: argparse.ArgumentParser, *, seconds: float = 5.0, repeat: int = 3) -> None:
    """``--seconds``, ``--repeat`` and ``--warmup``, as every load benchmark takes them."""
    parser.add_argument(
        "--seconds", type=float, default=seconds, help=f"measured seconds per run (default {seconds:g})"
    )
    parser.add_argument(
        "--repeat", type=int, default=repeat, help=f"repeats; the median is reported (default {repeat})"
    )
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each run (default 1)")


def bench_main(benchmark: Callable[[str, argparse.Namespace], Awaitable[str]], args: argparse.Namespace) -> None:
    """Run ``benchmark`` on the benchmark server (``postgres_server``) and print its report."""
    with postgres_server() as dsn:
        print(asyncio.run(benchmark(dsn, args)))
