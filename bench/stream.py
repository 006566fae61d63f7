"""The event stream: what sequencing costs appends, delivery latency, catch-up rate, and idle consumers' memory.

Usage::

    python -m bench.stream [--parts append,latency,catchup,memory] [--seconds 4] [--repeat 3]
                           [--rate 1000] [--backlog 50000] [--idle 100]

Each part runs in a scratch database of its own:

* **append**: ``EventStore.append`` of a new job (as ``bench.store_append``'s ``store`` variant) at 8 and 32
  writers, alone and with this process's ``Sequencer`` and ``StreamNotifier`` running (the store pokes the
  sequencer after each append, as in the service), interleaved; the backlog is sequenced (unmeasured)
  before every run so both start alike. Appends never NOTIFY; the sequencer NOTIFYs once per batch.
* **latency**: the real app in this process; paced store-level appends at ``--rate`` per second through the
  app's store (so they poke its sequencer, as the service's own appends do) and one SSE consumer; latency is
  from the append returning (committed) to the event's SSE frame arriving. Run again with ``--idle``
  consumers all attached and receiving, with the database's transaction rate.
* **catchup**: ``--backlog`` sequenced events read by one HTTP long-poll consumer (``limit=--page``) and one
  SSE consumer, beside a raw asyncpg page scan (the same join, ``--page`` rows a page, rows decoded) in the same run.
* **memory**: ``jobledger serve`` in a subprocess; its RSS before and after ``--idle`` SSE consumers attach
  and sit idle, and the database's transaction rate while they do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, Final

import aiohttp
import asyncpg
import msgspec
import psutil
from aiohttp import web

from bench.common import (
    RunResult,
    free_port,
    markdown_table,
    median,
    postgres_server,
    run_workers,
    scratch_database,
    server_version,
)
from ledger.config import Settings
from ledger.database import create_pool, init_connection
from ledger.hashing import GENESIS_HASH
from ledger.sequencer import Sequencer, SequencerBusy, sequence_pending
from ledger.service import new_uuid
from ledger.store import EventStore
from ledger.stream import StreamNotifier
from ledger.users import create_token, create_user
from projections.job import Recorded, Submitted, apply
from projections.timefmt import now_ts

OWNER: Final = "zzzzz-tpzed-000000000000001"
ROOT: Final = Path(__file__).resolve().parent.parent
RAW_PAGE: Final = (
    "SELECT p.position, e.id, e.job_uuid, e.version, e.event_type, e.data, e.actor_user_uuid, e.actor_client_uuid, "
    "e.request_id, e.recorded_at, e.prev_hash, e.hash FROM event_positions p JOIN events e ON e.id = p.event_id "
    "WHERE p.position > $1 ORDER BY p.position LIMIT $2"
)
# Events per page for catch-up, alike for the raw scan and the long-poll consumer.
CATCHUP_PAGE: Final = 5000
_counter = iter(range(10**12))


async def append_job(store: EventStore) -> str:
    """Append one new job's ``submitted`` event (and read-model row); return its uuid."""
    job_uuid = new_uuid("zzzzz", "8i9sb")
    rec = Recorded(
        job_uuid=job_uuid,
        version=1,
        event=Submitted(
            owner_uuid=OWNER,
            script_name="hash",
            script_version="main",
            script_parameters={"input": f"{next(_counter):040x}", "chunk_size": 64},
            resource_limits={"min_nodes": 1},
        ),
        actor_user_uuid=OWNER,
        actor_client_uuid=None,
        request_id="req-bench-stream",
        recorded_at=now_ts(),
    )
    await store.append(job_uuid, 0, GENESIS_HASH, [rec], apply(None, rec))
    return job_uuid


async def until(condition: Callable[[], bool | Awaitable[bool]], within: float = 60.0) -> bool:
    """Wait (polling every 10 ms) until ``condition()`` holds or ``within`` seconds pass; whether it held."""
    deadline = time.perf_counter() + within
    while time.perf_counter() < deadline:
        held = condition()
        if held if isinstance(held, bool) else await held:
            return True
        await asyncio.sleep(0.01)
    return False


async def sequence_backlog(pool: asyncpg.Pool) -> None:
    """Sequence everything committed, here or (while a running app leads) by the app's sequencer."""

    async def done() -> bool:
        with contextlib.suppress(SequencerBusy):
            await sequence_pending(pool)
        pending: bool = await pool.fetchval(
            "SELECT (SELECT count(*) FROM events) > (SELECT count(*) FROM event_positions)"
        )
        return not pending

    assert await until(done, 600), "the backlog was never sequenced"


async def transactions(pool: asyncpg.Pool) -> int:
    """The database's committed transactions so far (pg_stat_database; refreshed per transaction)."""
    await pool.execute("SELECT pg_stat_clear_snapshot()")
    count: int = await pool.fetchval("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
    return count


# ---- append cost -----------------------------------------------------------------------------------------
async def bench_append(dsn: str, args: argparse.Namespace) -> str:
    writers = [8, 32]
    settings = Settings(pool_min_size=max(writers) + 2, pool_max_size=max(writers) + 2)
    pool = await create_pool(dsn, settings)
    store = EventStore(pool)
    variants = ["alone", "sequenced"]
    results: dict[tuple[str, int], list[RunResult]] = {(v, w): [] for v in variants for w in writers}
    ratios: dict[int, list[float]] = {w: [] for w in writers}
    head_moves: dict[int, list[float]] = {w: [] for w in writers}
    try:
        for repeat in range(args.repeat):
            for count in writers:
                order = variants if repeat % 2 == 0 else variants[::-1]
                for variant in order:
                    await sequence_backlog(pool)
                    sequencer = notifier = None
                    if variant == "sequenced":
                        notifier = StreamNotifier(dsn, settings)
                        sequencer = Sequencer(dsn, settings, on_head=notifier.publish)  # timing from the environment
                        store.on_append = sequencer.poke
                        notifier.start()
                        sequencer.start()
                        assert await until(lambda s=sequencer, n=notifier: s.is_leader and n.listening)
                    generation = notifier.generation if notifier else 0
                    result = await run_workers(lambda _: append_job(store), count, seconds=args.seconds, warmup=0.5)
                    if sequencer is not None and notifier is not None:
                        head_moves[count].append((notifier.generation - generation) / result.elapsed)
                        store.on_append = None
                        await sequencer.stop()
                        await notifier.stop()
                    results[variant, count].append(result)
                    print(f"append {variant:>9} writers {count:>2}: {result.ops_per_s:,.0f}/s", file=sys.stderr)
                ratios[count].append(results["sequenced", count][-1].ops_per_s / results["alone", count][-1].ops_per_s)
    finally:
        await pool.close()
    rows = []
    for count in writers:
        for variant in variants:
            runs = results[variant, count]
            rows.append(
                [
                    count,
                    variant,
                    median([r.ops_per_s for r in runs]),
                    median([r.p50_ms for r in runs]),
                    median([r.p99_ms for r in runs]),
                    f"{median(ratios[count]):.0%}" if variant == "sequenced" else "",
                    median(head_moves[count]) if variant == "sequenced" else "",
                ]
            )
    headers = ["writers", "variant", "appends/s", "p50 ms", "p99 ms", "sequenced/alone", "head moves/s"]
    return markdown_table(headers, rows)


# ---- the app in this process -----------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def running_app(dsn: str, folder: Path) -> AsyncIterator[tuple[str, web.Application, str]]:
    """The service on a loopback port; yields its base URL, the app and an auditor's token."""
    from api.app import create_app
    from api.context import POOL, STORE

    settings = Settings(data_dir=folder, pool_min_size=2, pool_max_size=20)
    app = create_app(settings, dsn, admin_token_sink=lambda issued: None)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        pool = app[POOL]
        user = await create_user(pool, "bench-auditor", "auditor", "zzzzz")
        token = (await create_token(pool, user.uuid, "zzzzz")).token
        assert app[STORE] is not None
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", app, token
    finally:
        await runner.cleanup()


class SseReader:
    """Reads an SSE stream, noting when each job's event arrives."""

    def __init__(self, session: aiohttp.ClientSession, url: str, token: str, after: int) -> None:
        self.session, self.url, self.token, self.after = session, url, token, after
        self.arrived: dict[str, float] = {}
        self.count = 0
        self.last_id = after

    async def run(self, stop: asyncio.Event) -> None:
        headers = {"Authorization": f"Bearer {self.token}", "Last-Event-ID": str(self.after)}
        async with self.session.get(self.url, headers=headers, timeout=aiohttp.ClientTimeout(total=None)) as resp:
            buffer = b""
            while not stop.is_set():
                chunk = await resp.content.readany()
                if not chunk:
                    return
                buffer += chunk
                now = time.perf_counter()
                *frames, buffer = buffer.split(b"\n\n")
                for frame in frames:
                    if not frame.startswith(b"id: "):
                        continue
                    header, _, data = frame.partition(b"\ndata: ")
                    self.last_id = int(header[4 : header.index(b"\n")])
                    start = data.index(b'"job_uuid":"') + 12
                    self.arrived[data[start : start + 27].decode()] = now
                    self.count += 1


async def paced_appends(store: EventStore, rate: float, seconds: float, writers: int = 8) -> dict[str, float]:
    """Append ``rate`` events per second for ``seconds``; return each job's commit time (the append returned)."""
    committed: dict[str, float] = {}
    start = time.perf_counter()
    interval = writers / rate

    async def writer(index: int) -> None:
        k = 0
        while (due := start + index * interval / writers + k * interval) < start + seconds:
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            job_uuid = await append_job(store)
            committed[job_uuid] = time.perf_counter()
            k += 1

    await asyncio.gather(*(writer(i) for i in range(writers)))
    return committed


def _percentiles(values: list[float]) -> list[float]:
    ordered = sorted(values)

    def at(fraction: float) -> float:
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000

    return [at(0.5), at(0.9), at(0.99), ordered[-1] * 1000]


class Drainer:
    """An SSE consumer that reads everything and keeps nothing: it counts events (its ``event:`` lines)."""

    def __init__(self, session: aiohttp.ClientSession, url: str, token: str, after: int) -> None:
        self.session, self.url, self.token, self.after = session, url, token, after
        self.count = 0

    async def run(self, stop: asyncio.Event) -> None:
        headers = {"Authorization": f"Bearer {self.token}", "Last-Event-ID": str(self.after)}
        async with self.session.get(self.url, headers=headers, timeout=aiohttp.ClientTimeout(total=None)) as resp:
            tail = b""
            while not stop.is_set():
                chunk = await resp.content.readany()
                if not chunk:
                    return
                self.count += (tail + chunk).count(b"\nevent: ")
                tail = chunk[-8:]


async def delivery_latency(
    session: aiohttp.ClientSession,
    url: str,
    token: str,
    pool: asyncpg.Pool,
    process: psutil.Process,
    consumers: int,
    rate: float,
    seconds: float,
) -> list[Any]:
    """Paced appends for ``seconds`` while ``consumers`` SSE readers of ``url`` receive them.

    Returns ``[consumers, appends/s, p50, p90, p99, max ms, missing, db xact/s, server CPU]``: latency from
    an append returning (committed) to its frame arriving at the first reader.
    """
    store = EventStore(pool)
    head = await pool.fetchval("SELECT COALESCE(max(position), 0) FROM event_positions")
    stop = asyncio.Event()
    measured = SseReader(session, url, token, head)
    drainers = [Drainer(session, url, token, head) for _ in range(consumers - 1)]
    tasks = [asyncio.create_task(r.run(stop)) for r in (measured, *drainers)]
    await asyncio.sleep(1.0)  # every consumer connected and idle
    xact_before = await transactions(pool)
    cpu_before = sum(process.cpu_times()[:2])
    began = time.perf_counter()
    committed = await paced_appends(store, rate, seconds)
    elapsed = time.perf_counter() - began
    cpu = (sum(process.cpu_times()[:2]) - cpu_before) / elapsed
    xact = (await transactions(pool) - xact_before) / elapsed
    everyone = [measured, *drainers]
    await until(lambda c=committed, rs=everyone: all(r.count >= len(c) for r in rs), 30)
    stop.set()
    for task in tasks:
        task.cancel()
    latencies = [max(0.0, measured.arrived[u] - at) for u, at in committed.items() if u in measured.arrived]
    missing = sum(max(0, len(committed) - r.count) for r in everyone)
    return [consumers, len(committed) / elapsed, *_percentiles(latencies), missing, xact, f"{cpu:.0%}"]


async def bench_latency(dsn: str, args: argparse.Namespace, folder: Path) -> str:
    rows = []
    async with served(dsn, folder) as (base_url, process, pool, token):
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        url = base_url + "/orvos/v1/events/stream"
        try:
            for consumers in (1, args.idle):
                rows.append(
                    await delivery_latency(session, url, token, pool, process, consumers, args.rate, args.seconds)
                )
                print(f"latency with {consumers} consumers: {rows[-1]}", file=sys.stderr)
        finally:
            await session.close()
    headers = [
        "SSE consumers",
        "appends/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "missing",
        "db xact/s",
        "server CPU",
    ]
    return markdown_table(headers, rows)


# ---- catch-up --------------------------------------------------------------------------------------------
async def load_backlog(pool: asyncpg.Pool, count: int) -> None:
    """``count`` submitted events of distinct jobs, like the service writes (about 250 bytes of data each)."""
    async with pool.acquire() as conn:
        await conn.execute(
            """INSERT INTO events (job_uuid, version, event_type, data, actor_user_uuid, actor_client_uuid,
                   request_id, recorded_at, prev_hash, hash)
               SELECT 'zzzzz-8i9sb-' || lpad(to_hex(g), 15, '0'), 1, 'submitted',
                   jsonb_build_object('owner_uuid', $2::text, 'script_name', 'hash', 'script_version', 'main',
                       'script_parameters', jsonb_build_object('input', md5(g::text), 'chunk_size', 64),
                       'priority', 0, 'resource_limits', jsonb_build_object('min_nodes', 1), 'submit_id', null),
                   $2, 'zzzzz-ozdt8-000000000000001', 'req-bench-' || g, clock_timestamp(), repeat('0', 64),
                   md5(g::text) || md5((g + 1)::text)
               FROM generate_series(1, $1) g""",
            count,
            OWNER,
        )
    await sequence_backlog(pool)


async def raw_scan_rate(dsn: str, page: int = CATCHUP_PAGE) -> float:
    """Events/s of a raw page scan of the stream's join (rows decoded, ``page`` rows a query): the floor for any
    reader in Python."""
    conn = await asyncpg.connect(dsn)
    try:
        await init_connection(conn)
        began, after, seen = time.perf_counter(), 0, 0
        while rows := await conn.fetch(RAW_PAGE, after, page):
            after, seen = rows[-1]["position"], seen + len(rows)
        return seen / (time.perf_counter() - began)
    finally:
        await conn.close()


async def long_poll_rate(
    session: aiohttp.ClientSession, base_url: str, token: str, total: int, page: int = CATCHUP_PAGE
) -> float:
    """Events/s of one HTTP long-poll consumer (``limit=page``, bodies decoded) reading positions 1..``total``."""
    headers = {"Authorization": f"Bearer {token}"}
    began, after, seen = time.perf_counter(), 0, 0
    while after < total:
        async with session.get(
            base_url + "/orvos/v1/events", params={"after": after, "limit": page}, headers=headers
        ) as resp:
            body = msgspec.json.decode(await resp.read())
        after, seen = body["next_after"], seen + len(body["items"])
    return seen / (time.perf_counter() - began)


async def bench_catchup(dsn: str, args: argparse.Namespace, folder: Path) -> str:
    from api.context import POOL

    rows = []
    async with running_app(dsn, folder) as (base_url, app, token):
        pool = app[POOL]
        began = time.perf_counter()
        await load_backlog(pool, args.backlog)
        load_seconds = time.perf_counter() - began
        total = await pool.fetchval("SELECT max(position) FROM event_positions")
        session = aiohttp.ClientSession()
        try:
            for _ in range(args.repeat):
                raw = await raw_scan_rate(dsn, args.page)
                http = await long_poll_rate(session, base_url, token, total, args.page)
                # One SSE consumer.
                reader = SseReader(session, base_url + "/orvos/v1/events/stream", token, 0)
                stop = asyncio.Event()
                began = time.perf_counter()
                task = asyncio.create_task(reader.run(stop))
                assert await until(lambda r=reader: r.last_id >= total, 600)
                sse = reader.count / (time.perf_counter() - began)
                stop.set()
                task.cancel()
                rows.append([total, raw, http, f"{http / raw:.0%}", sse, f"{sse / raw:.0%}"])
                print(f"catch-up: {rows[-1]}", file=sys.stderr)
        finally:
            await session.close()
    headers = ["events", "raw scan/s", "HTTP long-poll/s", "of raw", "SSE/s", "of raw"]
    return markdown_table(headers, rows) + f"\n\n(backlog loaded and sequenced in {load_seconds:.1f} s)"


# ---- idle consumers' memory ------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def served(dsn: str, folder: Path) -> AsyncIterator[tuple[str, psutil.Process, asyncpg.Pool, str]]:
    """``jobledger serve`` in a subprocess; yields its URL, the process, a pool of ours and an auditor's token."""
    pool = await create_pool(dsn, Settings(pool_min_size=1, pool_max_size=12))
    user = await create_user(pool, "bench-auditor", "auditor", "zzzzz")
    token = (await create_token(pool, user.uuid, "zzzzz")).token
    port = free_port()
    env = {**os.environ, "DATABASE_URL": dsn, "JOBLEDGER_DATA": str(folder / "serve")}
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "api.cli", "serve", "--port", str(port), cwd=ROOT, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    base_url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:

            async def healthy() -> bool:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(base_url + "/healthz") as resp:
                        return resp.status == 200 and bool((await resp.json())["stream"]["sequencer"])
                return False

            assert await until(healthy, 30), "the service did not start"
            for _ in range(20):  # warm up the handlers and the pool
                async with session.get(base_url + "/orvos/v1/events", headers={"Authorization": f"Bearer {token}"}):
                    pass
        yield base_url, psutil.Process(server.pid), pool, token
    finally:
        if server.returncode is None:
            server.terminate()
        await server.wait()
        await pool.close()


async def bench_memory(dsn: str, args: argparse.Namespace, folder: Path) -> str:
    stop = asyncio.Event()
    async with served(dsn, folder) as (base_url, process, pool, token):
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        try:
            await asyncio.sleep(1)
            before = process.memory_info().rss
            url = base_url + "/orvos/v1/events/stream"
            readers = [Drainer(session, url, token, 0) for _ in range(args.idle)]
            tasks = [asyncio.create_task(r.run(stop)) for r in readers]
            await asyncio.sleep(3)
            xact_before = await transactions(pool)
            cpu_before = sum(process.cpu_times()[:2])
            await asyncio.sleep(5)
            idle_xact = (await transactions(pool) - xact_before) / 5
            idle_cpu = (sum(process.cpu_times()[:2]) - cpu_before) / 5
            after = process.memory_info().rss
            stop.set()
            for task in tasks:
                task.cancel()
        finally:
            await session.close()
    rows = [
        [args.idle, before / 2**20, after / 2**20, (after - before) / args.idle / 1024, idle_xact, f"{idle_cpu:.1%}"]
    ]
    headers = ["idle SSE consumers", "server RSS before MiB", "after MiB", "KiB per consumer", "db xact/s", "CPU"]
    return markdown_table(headers, rows)


# ---- the driver ------------------------------------------------------------------------------------------
async def benchmark(server: str, args: argparse.Namespace) -> str:
    parts: list[str] = args.parts
    version = await server_version(server)
    sections = [
        f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  ",
        f"Command: `python -m bench.stream {' '.join(sys.argv[1:])}`  ",
        f"Server: {version}; client CPUs: {os.cpu_count()}",
    ]
    runs: dict[str, Callable[[str, Path], Any]] = {
        "append": lambda db, folder: bench_append(db, args),
        "latency": lambda db, folder: bench_latency(db, args, folder),
        "catchup": lambda db, folder: bench_catchup(db, args, folder),
        "memory": lambda db, folder: bench_memory(db, args, folder),
    }
    for part in parts:
        with TemporaryDirectory(prefix="jobledger-bench-") as folder:
            async with scratch_database(server) as db:
                sections += ["", f"### {part}", "", await runs[part](db, Path(folder))]
    return "\n".join(sections)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.stream", description=__doc__.split("\n")[0])
    parser.add_argument("--parts", type=lambda t: t.split(","), default=["append", "latency", "catchup", "memory"])
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per run (default 4)")
    parser.add_argument("--repeat", type=int, default=3, help="repeats of append and catch-up (default 3)")
    parser.add_argument("--rate", type=float, default=1000.0, help="appends/s for the latency part (default 1000)")
    parser.add_argument("--backlog", type=int, default=50_000, help="events for the catch-up part (default 50000)")
    parser.add_argument("--page", type=int, default=CATCHUP_PAGE,
                        help="events per page for catch-up, raw scan and long-poll alike (default 5000)")  # fmt: skip
    parser.add_argument("--idle", type=int, default=100, help="SSE consumers for latency and memory (default 100)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    args = parse_args(argv)
    with postgres_server() as dsn:
        print(asyncio.run(benchmark(dsn, args)))


if __name__ == "__main__":
    main()
