"""Store-level figures and their physical limit: ``EventStore.append`` against raw asyncpg INSERT and SELECT.

The variants are ``bench.store_append``'s (``store`` and ``raw``); this suite adds the raw single-row SELECT
by primary key, on a connection each worker holds, over the rows the raw INSERTs wrote.
"""

from __future__ import annotations

import random
from contextlib import AsyncExitStack
from typing import Any, Final

import asyncpg

from bench.common import backend_pids, checkpoint, process_cpu, run_workers, scratch_database
from bench.plan import RunConfig
from bench.report import Results
from bench.store_append import RAW_TABLE, Bench, SwitchableReset
from ledger.config import Settings
from ledger.database import create_pool

SELECT_BY_KEY: Final = "SELECT * FROM bench_raw_events WHERE id = $1"


class StoreSuite:
    """store append@N, raw INSERT@N and raw SELECT by key@N, at each of the configured writer counts."""

    title = "store level"

    def __init__(self, server: str, config: RunConfig, results: Results) -> None:
        self.server, self.config, self.results = server, config, results
        self.dsn = ""
        self.bench: Bench | None = None
        self.monitor: asyncpg.Connection | None = None

    async def setup(self, stack: AsyncExitStack) -> None:
        """A scratch database with the raw table, and one pool of ``max(writers)`` never-recycled connections."""
        db = await stack.enter_async_context(scratch_database(self.server))
        self.monitor = await asyncpg.connect(db)
        stack.push_async_callback(self.monitor.close)
        await self.monitor.execute(RAW_TABLE)
        await self.monitor.execute("ALTER TABLE bench_raw_events ADD PRIMARY KEY (id)")
        self.dsn = db

    async def _open(self) -> Bench:
        # Opened per round and closed after it: the suites share the server's max_connections (often 100).
        size = max(self.config.writers)
        options: dict[str, Any] = {"max_inactive_connection_lifetime": 0, "max_queries": 2**62}
        reset = SwitchableReset()
        pool = await create_pool(self.dsn, Settings(pool_min_size=size, pool_max_size=size), reset=reset, **options)
        return Bench(pool, reset)

    async def _server_cpu(self) -> dict[int, float]:
        assert self.monitor is not None
        return process_cpu(await backend_pids(self.monitor))

    async def _select(self, writers: int) -> None:
        assert self.bench is not None
        assert self.monitor is not None
        top = await self.monitor.fetchval("SELECT max(id) FROM bench_raw_events")
        held = [await self.bench.pool.acquire() for _ in range(writers)]
        try:

            async def op(worker: int) -> None:
                await held[worker].fetchrow(SELECT_BY_KEY, random.randint(1, top))

            result = await run_workers(op, writers, seconds=self.config.seconds, warmup=self.config.warmup)
        finally:
            for conn in held:
                await self.bench.pool.release(conn)
        self.results.add_run(f"raw SELECT by key@{writers}", result)

    async def round(self, index: int) -> None:
        """Each writer count: store append and raw INSERT back to back (order alternating), then raw SELECT."""
        assert self.monitor is not None
        cfg = self.config
        self.bench = await self._open()
        try:
            for writers in cfg.writers:
                order = ["store", "raw"] if (index + writers) % 2 == 0 else ["raw", "store"]
                for variant in order:
                    await checkpoint(self.monitor)
                    result = await self.bench.run(variant, writers, cfg.seconds, cfg.warmup, self._server_cpu)
                    name = "store append" if variant == "store" else "raw INSERT"
                    self.results.add_run(f"{name}@{writers}", result)
                await self._select(writers)
        finally:
            await self.bench.pool.close()
            self.bench = None
