"""Stream figures: catch-up over HTTP long-poll beside a raw page scan, and delivery latency over SSE.

Both use ``bench.stream``'s pieces against ``jobledger serve`` in its own process, on a scratch database
holding a sequenced backlog of ``RunConfig.backlog`` events (plus whatever the latency runs append).
"""

from __future__ import annotations

import tempfile
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil

from bench.common import scratch_database
from bench.plan import RunConfig
from bench.report import Results
from bench.stream import delivery_latency, load_backlog, long_poll_rate, raw_scan_rate, served


class StreamSuite:
    """stream catch-up (raw page scan, HTTP long-poll) and delivery latency with one SSE consumer."""

    title = "stream"

    def __init__(self, server: str, config: RunConfig, results: Results) -> None:
        self.server, self.config, self.results = server, config, results
        self.dsn = ""
        self.base_url = self.token = ""
        self.pool: asyncpg.Pool | None = None
        self.process: psutil.Process | None = None
        self.session: aiohttp.ClientSession | None = None

    async def setup(self, stack: AsyncExitStack) -> None:
        """The service on a scratch database with the backlog loaded and sequenced."""
        self.dsn = await stack.enter_async_context(scratch_database(self.server))
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="jobledger-bench-stream-")))
        served_ = await stack.enter_async_context(served(self.dsn, folder))
        self.base_url, self.process, self.pool, self.token = served_
        await load_backlog(self.pool, self.config.backlog)
        self.session = await stack.enter_async_context(aiohttp.ClientSession())

    async def round(self, index: int) -> None:
        """Raw scan and long-poll back to back (order alternating), then one delivery-latency run."""
        assert self.pool is not None
        assert self.session is not None
        assert self.process is not None
        total: int = await self.pool.fetchval("SELECT max(position) FROM event_positions")
        runs: list[tuple[str, Any]] = [
            ("stream catch-up raw page scan", lambda: raw_scan_rate(self.dsn)),
            ("stream catch-up HTTP long-poll", lambda: long_poll_rate(self.session, self.base_url, self.token, total)),
        ]
        for name, run in runs if index % 2 == 0 else runs[::-1]:
            self.results.add(name, await run(), "events/s")
        url = self.base_url + "/orvos/v1/events/stream"
        row = await delivery_latency(
            self.session, url, self.token, self.pool, self.process, 1, self.config.latency_rate, self.config.seconds
        )
        _, rate, p50, _, p99, _, missing, *_ = row
        if missing:
            raise AssertionError(f"the SSE consumer missed {missing} events")
        self.results.add("stream delivery latency (1 SSE consumer)", rate, "appends/s", p50_ms=p50, p99_ms=p99)
