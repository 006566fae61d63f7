"""Provenance performance: as-of reads of a long history, and ``verify`` throughput beside a raw table scan.

Usage::

    python -m bench.provenance [--events 1000000] [--history 10000] [--repeat 20]

Three measurements, the first two each in a scratch database of its own:

* **as-of** (target: under 50 ms): one job with ``--history`` events (a submission and then priority
  updates), served by the real aiohttp app over loopback HTTP: ``GET jobs/{uuid}?as_of_version=N`` for the
  last and the middle version, ``?as_of=T`` at the last event's time, and the whole ``jobs/{uuid}/events``
  for comparison. Reports the median and p95 of ``--repeat`` requests each, after one warm-up request.
* **verify** (target: at least 100,000 events/s): a ledger of ``--events`` events (jobs of five events each:
  submitted, updated, locked, started, finished, interleaved across jobs as concurrent work would be),
  verified by ``ledger.verify.verify_ledger`` (one pass, split over a worker process per CPU, and in one
  process for comparison), and for comparison by ``verify_job_chains`` and
  ``check_read_model`` alone, beside a raw page scan of the same ``events`` table in the same run: a cursor
  fetching every column of every row into Python (the floor for any verifier written in Python) and
  PostgreSQL scanning it alone (``count(*)``).
* **fold** (target: at least 500,000 events/s): ``projections.job.fold`` over the same kind of ledger (at most
  200,000 events), decoded beforehand, by process CPU time.

The ledger is loaded with COPY, with triggers switched off for the load only (``session_replication_role``,
so the role must be a superuser, as it is for the tests); every hash is computed exactly as the service
computes it, and the read model is then rebuilt from the events, so ``verify`` must (and does) pass.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, Final

import aiohttp
import asyncpg
from aiohttp import web

from bench.common import markdown_table, postgres_server, scratch_database, server_version
from ledger.config import Settings
from ledger.database import create_pool
from ledger.hashing import GENESIS_HASH, canonical_json, chain_hash, event_hash
from ledger.rebuild import check_read_model, rebuild_read_model, verify_job_chains
from ledger.store import EventStore
from ledger.users import IssuedToken
from ledger.verify import verify_ledger
from projections.job import Recorded, decode_event, fold
from projections.timefmt import format_ts

PREFIX: Final = "zzzzz"
OWNER: Final = f"{PREFIX}-tpzed-000000000000001"
DISPATCHER: Final = f"{PREFIX}-tpzed-000000000000002"
CLIENT: Final = f"{PREFIX}-ozdt8-000000000000001"
COMMIT: Final = "0123456789abcdef0123456789abcdef01234567"
EVENT_COLUMNS: Final = (
    "job_uuid", "version", "event_type", "data", "actor_user_uuid", "actor_client_uuid", "request_id",
    "recorded_at", "prev_hash", "hash",
)  # fmt: skip
LIFECYCLE: Final = 5
INTERLEAVE: Final = 1000  # jobs in flight at once: their events alternate in the global order
START: Final = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)


# ---- building ledgers ------------------------------------------------------------------------------------
def _uuid(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    for _ in range(15):
        number, rest = divmod(number, 36)
        out = digits[rest] + out
    return f"{PREFIX}-8i9sb-{out}"


def _row(job: str, version: int, kind: str, data: dict[str, Any], actor: str, at: datetime, prev: str) -> tuple:
    digest = event_hash(
        job_uuid=job,
        version=version,
        event_type=kind,
        data=data,
        actor_user_uuid=actor,
        actor_client_uuid=CLIENT,
        request_id=f"req-{job[-8:]}-{version}",
        recorded_at=format_ts(at),
        prev_hash=prev,
    )
    return (
        job,
        version,
        kind,
        canonical_json(data).decode(),
        actor,
        CLIENT,
        f"req-{job[-8:]}-{version}",
        at,
        prev,
        digest,
    )


def _lifecycle(number: int) -> list[tuple[str, dict[str, Any], str]]:
    return [
        ("submitted", {"owner_uuid": OWNER, "script_name": "hash.py", "script_version": "main",
                       "script_parameters": {"input": f"{number:040x}", "chunk": 64}, "priority": 1,
                       "resource_limits": {"min_nodes": 1}, "submit_id": None}, OWNER),
        ("updated", {"priority": 2}, OWNER),
        ("locked", {}, DISPATCHER),
        ("started", {"script_version": COMMIT}, DISPATCHER),
        ("finished", {"success": True, "output": f"out-{number}", "log": None}, DISPATCHER),
    ]  # fmt: skip


def ledger_rows(events: int) -> Iterator[tuple]:
    """Rows of ``events`` events: jobs of five, ``INTERLEAVE`` jobs at a time alternating event by event."""
    jobs = events // LIFECYCLE
    tick = 0
    for block in range(0, jobs, INTERLEAVE):
        numbers = range(block, min(block + INTERLEAVE, jobs))
        previous = dict.fromkeys(numbers, GENESIS_HASH)
        plans = {n: _lifecycle(n) for n in numbers}
        for step in range(LIFECYCLE):
            for n in numbers:
                kind, data, actor = plans[n][step]
                tick += 1
                row = _row(_uuid(n), step + 1, kind, data, actor, START + timedelta(microseconds=tick), previous[n])
                previous[n] = row[-1]
                yield row


def long_history_rows(length: int, number: int) -> Iterator[tuple]:
    """One job: submitted, then ``length - 1`` priority updates."""
    job = _uuid(number)
    kind, data, actor = _lifecycle(number)[0]
    prev = GENESIS_HASH
    for version in range(1, length + 1):
        if version > 1:
            kind, data, actor = "updated", {"priority": version % 10}, OWNER
        row = _row(job, version, kind, data, actor, START + timedelta(milliseconds=version), prev)
        prev = row[-1]
        yield row


async def load(dsn: str, rows: Iterator[tuple], pool: asyncpg.Pool) -> int:
    """COPY ``rows`` into events (triggers off for the load), give them positions, rebuild the read model."""
    conn = await asyncpg.connect(dsn)  # jsonb as text here: COPY gets the canonical JSON as written
    count = 0
    try:
        await conn.execute("SET session_replication_role = replica; SET statement_timeout = 0")
        while batch := [row for _, row in zip(range(50_000), rows, strict=False)]:
            await conn.copy_records_to_table("events", records=batch, columns=EVENT_COLUMNS)
            count += len(batch)
        head = await conn.fetchval("SELECT coalesce(max(position), 0) FROM event_positions")
        chain = await conn.fetchval("SELECT chain_hash FROM event_positions WHERE position = $1", head) or GENESIS_HASH
        ids = await conn.fetch(
            "SELECT e.id, e.hash FROM events e WHERE NOT EXISTS "
            "(SELECT 1 FROM event_positions p WHERE p.event_id = e.id) ORDER BY e.id"
        )
        positions = []
        for position, row in enumerate(ids, start=head + 1):
            chain = chain_hash(chain, position, row["hash"])
            positions.append((position, row["id"], chain))
        await conn.copy_records_to_table(
            "event_positions", records=positions, columns=("position", "event_id", "chain_hash")
        )
        await conn.execute("ANALYZE events; ANALYZE event_positions")
    finally:
        await conn.close()
    await rebuild_read_model(pool)
    return count


# ---- measuring -------------------------------------------------------------------------------------------
async def timed(call: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    began = time.perf_counter()
    result = await call()
    return time.perf_counter() - began, result


async def bench_as_of(server: str, length: int, repeat: int) -> list[list[object]]:
    with TemporaryDirectory() as folder:
        return await _bench_as_of(server, length, repeat, Path(folder))


async def _bench_as_of(server: str, length: int, repeat: int, folder: Path) -> list[list[object]]:
    async with scratch_database(server) as dsn:
        settings = Settings(data_dir=folder, pool_min_size=1, pool_max_size=4)
        # Loaded (with positions) before the service starts, so its sequencer finds nothing left to do.
        loader = await create_pool(dsn, settings)
        try:
            await load(dsn, long_history_rows(length, 10**9), loader)
        finally:
            await loader.close()
        issued: list[IssuedToken] = []
        from api.app import create_app

        app = create_app(settings, dsn, admin_token_sink=issued.append)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            from api.context import POOL

            pool = app[POOL]
            uuid = _uuid(10**9)
            last = await pool.fetchval("SELECT max(recorded_at) FROM events WHERE job_uuid = $1", uuid)
            base = f"http://127.0.0.1:{runner.addresses[0][1]}/orvos/v1/jobs/{uuid}"
            headers = {"Authorization": f"Bearer {issued[0].token}"}
            cases = [
                (f"as_of_version={length}", base, {"as_of_version": str(length)}),
                (f"as_of_version={length // 2}", base, {"as_of_version": str(length // 2)}),
                ("as_of=<last event's time>", base, {"as_of": format_ts(last)}),
                ("current (read model)", base, {}),
                (f"events ({length} items)", base + "/events", {}),
            ]
            rows: list[list[object]] = []
            async with aiohttp.ClientSession() as session:
                for name, url, params in cases:
                    samples = []
                    for attempt in range(repeat + 1):
                        began = time.perf_counter()
                        async with session.get(url, params=params, headers=headers) as response:
                            assert response.status == 200, await response.text()
                            await response.read()
                        if attempt:  # the first is a warm-up
                            samples.append((time.perf_counter() - began) * 1000)
                    samples.sort()
                    p95 = samples[min(len(samples) - 1, int(0.95 * len(samples)))]
                    rows.append([name, statistics.median(samples), p95])
            # Where the time goes, in process: the query, and the fold.
            store = EventStore(pool)
            load_s, events = await timed(lambda: store.load_events(uuid))
            began = time.perf_counter()
            fold(event.to_recorded() for event in events)
            fold_ms = (time.perf_counter() - began) * 1000
            rows.append([f"  in process: load_events ({length})", load_s * 1000, float("nan")])
            rows.append([f"  in process: fold ({length})", fold_ms, float("nan")])
            return rows
        finally:
            await runner.cleanup()


async def raw_scan(pool: asyncpg.Pool) -> int:
    """Every column of every event into Python through a cursor, as the verifier reads them."""
    count = 0
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        await conn.execute("SET LOCAL statement_timeout = 0")
        cursor = await conn.cursor("SELECT * FROM events ORDER BY job_uuid, version")
        while batch := await cursor.fetch(10_000):
            count += len(batch)
    return count


async def bench_verify(server: str, events: int) -> tuple[list[list[object]], dict[str, float]]:
    async with scratch_database(server) as dsn:
        pool = await create_pool(dsn, Settings(pool_min_size=1, pool_max_size=4, statement_timeout_ms=0))
        try:
            began = time.perf_counter()
            count = await load(dsn, ledger_rows(events), pool)
            load_seconds = time.perf_counter() - began

            async def verify_all(workers: int | None = None) -> Any:
                report = await verify_ledger(pool, workers=workers)
                assert report.ok, report.findings
                return report

            async def no_break(check: Callable[[asyncpg.Pool], Awaitable[Any]]) -> Any:
                result = await check(pool)
                assert result is None, result

            async def server_scan() -> Any:
                return await pool.fetchval("SELECT count(*) FROM events")

            cases: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
                ("raw page scan: every row into Python", lambda: raw_scan(pool)),
                ("raw page scan: PostgreSQL alone (count(*))", server_scan),
                ("verify_ledger (both chains and the read model; a worker process per CPU)", verify_all),
                ("verify_ledger in one process (workers=1)", lambda: verify_all(workers=1)),
                ("for comparison: job chains alone (verify_job_chains)", lambda: no_break(verify_job_chains)),
                ("for comparison: read model alone (check_read_model)", lambda: no_break(check_read_model)),
            ]
            rows: list[list[object]] = []
            for name, call in cases:
                seconds, _ = await timed(call)
                rows.append([name, seconds, count / seconds])
            return rows, {"events": count, "load_seconds": load_seconds}
        finally:
            await pool.close()


def fold_rate(events: int, repeat: int = 3) -> tuple[float, float]:
    """The in-memory fold over ``events`` events of five-event jobs: (best events/s, its CPU µs per event).

    The events are decoded once beforehand (as a reader hands them to ``fold``); only ``fold`` is timed, by
    process CPU time, which a shared box disturbs less than wall time.
    """
    histories: dict[str, list[Recorded]] = {}
    for row in ledger_rows(events):
        job, version, kind, data, actor, client, request, at, *_ = row
        event = decode_event(kind, json.loads(data))
        histories.setdefault(job, []).append(
            Recorded(job_uuid=job, version=version, event=event, actor_user_uuid=actor,
                     actor_client_uuid=client, request_id=request, recorded_at=format_ts(at))
        )  # fmt: skip
    count = sum(len(history) for history in histories.values())
    best = math.inf
    for _ in range(repeat):
        began = time.process_time()
        for history in histories.values():
            fold(history)
        best = min(best, time.process_time() - began)
    return count / best, best / count * 1e6


async def benchmark(server: str, args: argparse.Namespace) -> str:
    out = [f"PostgreSQL: {await server_version(server)}", f"Python: {sys.version.split()[0]}, CPUs: {os.cpu_count()}"]
    as_of = await bench_as_of(server, args.history, args.repeat)
    out += ["", f"## as-of on one job of {args.history:,} events (HTTP, loopback; target < 50 ms)", ""]
    out.append(markdown_table(["request", "median ms", "p95 ms"], as_of))
    rate, cpu = fold_rate(min(args.events, 200_000))
    out += ["", f"## fold in memory (target >= 500,000 events/s): {rate:,.0f} events/s, {cpu:.2f} µs CPU per event"]
    verify, facts = await bench_verify(server, args.events)
    out += ["", f"## verify over {int(facts['events']):,} events (target >= 100,000 events/s)", ""]
    out.append(markdown_table(["pass", "seconds", "events/s"], verify))
    out.append(f"\n(loading the ledger took {facts['load_seconds']:.0f} s)")
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m bench.provenance", description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events in the ledger verify reads")
    parser.add_argument("--history", type=int, default=10_000, help="events of the job as-of reads")
    parser.add_argument("--repeat", type=int, default=20, help="requests per as-of case")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print a markdown report."""
    args = parse_args(argv)
    with postgres_server() as server:
        print(asyncio.run(benchmark(server, args)))


if __name__ == "__main__":
    main()
