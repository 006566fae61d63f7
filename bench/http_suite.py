"""HTTP figures: jobledger's create, get and list against bare aiohttp handlers doing the same SQL, and a ping.

The servers are ``bench.http_api``'s (``jobledger serve`` and its bare app, each its own process, on one
scratch database); every measured run is a separate ``bench.loadgen`` process (``wrk`` when installed,
else an aiohttp client). While jobledger is under load its resident memory is sampled with psutil.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Final

import psutil

from bench.common import checkpoint_server
from bench.http_api import Load, Servers, scratch_http_database, seed_bare_table
from bench.loadgen import wrk_available
from bench.plan import RunConfig
from bench.report import Results

ROOT: Final = Path(__file__).resolve().parent.parent
# Each jobledger variant is followed by the bare handler doing its SQL, so both see the same outside load.
VARIANTS: Final = ["create", "insert", "get", "select", "list", "ping"]
NAMES: Final = {
    "create": "HTTP create",
    "insert": "bare insert handler",
    "get": "HTTP get",
    "select": "bare select handler",
    "list": "HTTP list",
    "ping": "bare ping handler",
}
LEDGER_VARIANTS: Final = frozenset({"create", "get", "list"})
RSS_SAMPLE_SECONDS: Final = 0.2


class HttpSuite:
    """Every variant at each connection count, through a load generator process per run."""

    title = "HTTP"

    def __init__(self, server: str, config: RunConfig, results: Results) -> None:
        self.server, self.config, self.results = server, config, results
        self.servers: Servers | None = None
        self.uuids = config.out / "http-job-uuids.txt"
        self.tool = "wrk" if wrk_available() else "aiohttp"

    async def setup(self, stack: AsyncExitStack) -> None:
        """Scratch database, both servers, a user's token and the jobs ``get`` reads."""
        dsn = await stack.enter_async_context(scratch_http_database(self.server))
        await seed_bare_table(dsn)
        servers = Servers(dsn)
        stack.callback(servers.close)
        await servers.start()
        self.servers = servers
        load = Load(servers)
        await load.prepare()
        self.uuids.write_text("\n".join(load.job_uuids) + "\n")
        self.results.notes.append(
            f"HTTP load generator: {self.tool} in its own process"
            + ("" if self.tool == "wrk" else " (wrk not installed: aiohttp client, one asyncio worker per connection)")
        )

    async def _load(self, variant: str, connections: int) -> tuple[dict[str, Any], float]:
        """One load process; returns its result and the service's largest RSS (MiB) seen meanwhile."""
        assert self.servers is not None
        cfg = self.config
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.loadgen", "--tool", self.tool, "--variant", variant,
            "--ledger-url", self.servers.ledger_url, "--bare-url", self.servers.bare_url,
            "--token", self.servers.user_token, "--uuids", str(self.uuids), "--connections", str(connections),
            "--seconds", str(cfg.seconds), "--warmup", str(cfg.warmup),
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        service = psutil.Process(self.servers.ledger_pid)
        rss = 0
        communicate = asyncio.ensure_future(process.communicate())
        while not communicate.done():
            rss = max(rss, service.memory_info().rss)
            await asyncio.wait([communicate], timeout=RSS_SAMPLE_SECONDS)
        out, err = communicate.result()
        if process.returncode != 0:
            raise RuntimeError(f"load generator failed ({variant}@{connections}): {err.decode()[-2000:]}")
        result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        if result["errors"]:
            raise RuntimeError(f"{variant}@{connections}: {result['errors']} failed requests ({result.get('detail')})")
        return result, rss / 2**20

    async def round(self, index: int) -> None:
        """Each connection count: every variant once, forwards in even rounds and backwards in odd ones."""
        for connections in self.config.connections:
            rss = 0.0
            for variant in VARIANTS if index % 2 == 0 else VARIANTS[::-1]:
                # Every measured write run of the benchmark starts right after a CHECKPOINT, so that none pays
                # (or escapes) the full-page writes that follow one.
                await checkpoint_server(self.server)
                result, seen = await self._load(variant, connections)
                if variant in LEDGER_VARIANTS:
                    rss = max(rss, seen)
                rate = result["requests"] / result["seconds"] if result["seconds"] else math.nan
                p50, p99 = (math.nan if result[k] is None else result[k] for k in ("p50_ms", "p99_ms"))
                self.results.add(f"{NAMES[variant]}@{connections}", rate, "req/s", p50_ms=p50, p99_ms=p99)
                print(f"  {variant}@{connections}: {rate:,.0f} req/s p99 {p99:.1f} ms", file=sys.stderr, flush=True)
            self.results.add("service RSS under load", rss, "MiB")
