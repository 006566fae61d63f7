"""HTTP throughput of the jobledger service against a bare aiohttp + asyncpg app (the physical limit), one run.

Usage::

    python -m bench.http_api [--seconds S] [--repeat R] [--connections 1,32] [--warmup W]

Both servers run as separate processes on 127.0.0.1, on the same scratch database (``bench_http_*``):

* jobledger: ``python -m api.cli serve --port P`` with ``DATABASE_URL`` set to the scratch database; the admin
  token it prints on its first start is read from its stdout; a ``user`` and a token are made with the CLI.
* bare: this module with ``--bare-server``: an aiohttp app with ``POST /insert`` (decode the JSON body, one
  asyncpg INSERT of an events-like row, answer its id as JSON) and ``GET /select/{id}`` (one SELECT by primary
  key, answer the row as JSON), through a pool of the same size as the service's.

The load generator is this process: ``N`` asyncio workers sharing one aiohttp session limited to ``N``
connections (``wrk`` is not installed here), each sending requests back to back for a fixed time. Variants,
interleaved at each connection count (forwards in even repeats, backwards in odd ones, so each pair runs back
to back): ``create`` (POST jobs, ``allow_duplicate=true``, distinct parameters), ``insert`` (bare), ``get``
(GET jobs/{uuid} over pre-created jobs), ``select`` (bare), ``list`` (GET jobs?limit=20). Medians over the
repeats; ratios are medians of the per-repeat ratios. Server CPU per request is read from ``/proc`` for the
server process (not its database backends).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import aiohttp
import asyncpg
import msgspec
from aiohttp import web

from bench.common import (
    Operation,
    RunResult,
    free_port,
    markdown_table,
    median,
    postgres_server,
    process_cpu,
    run_workers,
    server_version,
)
from bench.store_append import RAW_INSERT, RAW_TABLE
from ledger.config import Settings
from ledger.database import apply_schema, create_pool, with_database

VARIANTS: Final = ["create", "insert", "get", "select", "list"]
PRECREATED_JOBS: Final = 500
PRESEEDED_ROWS: Final = 1000
FAKE_HASH: Final = "ab" * 32
BARE_USER: Final = "zzzzz-tpzed-000000000000001"
STARTUP_TIMEOUT: Final = 60.0


# ---- the bare server (runs in its own process) -----------------------------------------------------------
BARE_POOL: Final = web.AppKey("bare_pool", asyncpg.Pool)
_bare_sequence = itertools.count()


async def _bare_insert(request: web.Request) -> web.Response:
    """One INSERT of an events-like row built from the posted job; answer ``{"id": ..., "job_uuid": ...}``."""
    body = msgspec.json.decode(await request.read())
    job = body.get("job", body)
    job_uuid = f"zzzzz-8i9sb-{random.getrandbits(60):015x}"
    row_id = await request.app[BARE_POOL].fetchval(
        RAW_INSERT + " RETURNING id",
        job_uuid,
        1,
        "submitted",
        job,  # the pool's jsonb codec encodes it (msgspec), as the service's does
        BARE_USER,
        None,
        f"req-bare-{next(_bare_sequence)}",
        datetime.now(UTC),
        FAKE_HASH,
        FAKE_HASH,
    )
    return web.Response(
        status=201, body=msgspec.json.encode({"id": row_id, "job_uuid": job_uuid}), content_type="application/json"
    )


async def _bare_select(request: web.Request) -> web.Response:
    """One SELECT by primary key; answer the row as JSON (404 if absent)."""
    row = await request.app[BARE_POOL].fetchrow(
        "SELECT * FROM bench_raw_events WHERE id = $1", int(request.match_info["id"])
    )
    if row is None:
        return web.Response(status=404, body=b'{"errors": ["not found"]}', content_type="application/json")
    return web.Response(body=msgspec.json.encode(dict(row)), content_type="application/json")


async def _bare_health(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status": "ok"}', content_type="application/json")


def bare_app(dsn: str) -> web.Application:
    """The bare app: a pool sized like the service's (``JOBLEDGER_POOL_*``), and the two handlers."""

    async def lifecycle(app: web.Application) -> Any:
        pool = await create_pool(dsn, Settings.from_env())
        app[BARE_POOL] = pool
        try:
            yield
        finally:
            await pool.close()

    app = web.Application()
    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/insert", _bare_insert)
    app.router.add_get("/select/{id}", _bare_select)
    app.router.add_get("/healthz", _bare_health)
    return app


# ---- the servers, as subprocesses ------------------------------------------------------------------------
class Servers:
    """The two server processes and what the load needs of them (URLs, token, pids); ``close`` ends them."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.folder = Path(tempfile.mkdtemp(prefix="jobledger-bench-http-"))
        self.env = {**os.environ, "DATABASE_URL": dsn, "JOBLEDGER_DATA": str(self.folder)}
        self.processes: list[subprocess.Popen[bytes]] = []
        self.ledger_url = ""
        self.bare_url = ""
        self.admin_token = ""
        self.user_token = ""
        self.ledger_pid = 0
        self.bare_pid = 0

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(self.folder / log, "wb") as stderr:
            process = subprocess.Popen(
                [sys.executable, *args], env=self.env, stdout=subprocess.PIPE, stderr=stderr, cwd=os.getcwd()
            )
        self.processes.append(process)
        return process

    def _cli(self, *args: str) -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-m", "api.cli", *args], env=self.env, capture_output=True, check=True, timeout=60
        )
        value: dict[str, Any] = json.loads(out.stdout.decode().strip().splitlines()[-1])
        return value

    async def start_ledger(self, serve_args: Sequence[str], user_name: str) -> None:
        """Start ``jobledger serve <serve_args>``, read the admin token it prints, wait until it answers, and
        make a user (``user_name``) and its token for the load."""
        port = free_port()
        ledger = self._spawn(["-m", "api.cli", "serve", "--port", str(port), *serve_args], "jobledger.log")
        self.ledger_pid, self.ledger_url = ledger.pid, f"http://127.0.0.1:{port}"
        assert ledger.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(ledger.stdout.readline), STARTUP_TIMEOUT)
        if not line:
            raise RuntimeError(f"jobledger exited without an admin token; see {self.folder / 'jobledger.log'}")
        self.admin_token = json.loads(line)["token"]
        await _wait_healthy(self.ledger_url + "/healthz", ledger)
        user = await asyncio.to_thread(self._cli, "user", "create", user_name, "--role", "user")
        token = await asyncio.to_thread(self._cli, "token", "create", "--user", user["uuid"])
        self.user_token = token["token"]

    async def start(self) -> None:
        """Start both servers, read the admin token, make a user and its token, wait until both answer."""
        bare_port = free_port()
        bare = self._spawn(["-m", "bench.http_api", "--bare-server", "--port", str(bare_port)], "bare.log")
        self.bare_pid, self.bare_url = bare.pid, f"http://127.0.0.1:{bare_port}"
        await self.start_ledger([], "bench-http")
        await _wait_healthy(self.bare_url + "/healthz", bare)

    def close(self) -> None:
        """Terminate both servers (kill after 10 s), and remove their data folder."""
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
        shutil.rmtree(self.folder, ignore_errors=True)


async def _wait_healthy(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited ({process.returncode}) before answering {url}")
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {STARTUP_TIMEOUT:g} s")


@asynccontextmanager
async def scratch_http_database(server_dsn: str) -> AsyncIterator[str]:
    """A new ``bench_http_<pid>`` database with the schema applied; dropped afterwards.

    ``bench.common.scratch_database`` names its databases ``bench_<pid>_<n>`` and takes no prefix; this run's
    database must be recognisably ``bench_http_*``.
    """
    name = f"bench_http_{os.getpid()}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        try:
            dsn = with_database(server_dsn, name)
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


async def seed_bare_table(dsn: str) -> None:
    """Create the bare app's table (``RAW_TABLE`` with a primary key) and the rows its SELECTs read."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(RAW_TABLE)
        await conn.execute("ALTER TABLE bench_raw_events ADD PRIMARY KEY (id)")
        await conn.executemany(
            RAW_INSERT,
            [
                (f"zzzzz-8i9sb-{i:015x}", 1, "submitted", '{"script_name": "hash"}', BARE_USER, None,
                 f"req-seed-{i}", datetime.now(UTC), FAKE_HASH, FAKE_HASH)
                for i in range(PRESEEDED_ROWS)
            ],
        )  # fmt: skip
    finally:
        await conn.close()


# ---- the load --------------------------------------------------------------------------------------------
class Load:
    """The five request kinds, on one client session per run (its connector limited to the worker count)."""

    def __init__(self, servers: Servers) -> None:
        self.servers = servers
        self.auth = {"Authorization": f"Bearer {servers.user_token}"}
        self.job_uuids: list[str] = []
        self.sequence = itertools.count()
        self.session: aiohttp.ClientSession | None = None

    def _job(self) -> bytes:
        job = {
            "script_name": "hash",
            "script_version": "main",
            "script_parameters": {"input": f"{next(self.sequence):040x}", "chunk_size": 64},
            "resource_limits": {"min_nodes": 1, "max_tasks_per_node": 1},
        }
        return msgspec.json.encode({"job": job})

    async def _request(self, method: str, url: str, expect: int, body: bytes | None = None, auth: bool = True) -> bytes:
        assert self.session is not None
        headers = dict(self.auth) if auth else {}
        if body is not None:
            headers["Content-Type"] = "application/json"
        async with self.session.request(method, url, data=body, headers=headers) as response:
            payload = await response.read()
            if response.status != expect:
                raise RuntimeError(f"{method} {url}: {response.status} {payload[:300]!r}")
            return payload

    async def create(self, worker: int) -> None:
        await self._request("POST", self.servers.ledger_url + "/orvos/v1/jobs?allow_duplicate=true", 201, self._job())

    async def get(self, worker: int) -> None:
        await self._request("GET", f"{self.servers.ledger_url}/orvos/v1/jobs/{random.choice(self.job_uuids)}", 200)

    async def list(self, worker: int) -> None:
        await self._request("GET", self.servers.ledger_url + "/orvos/v1/jobs?limit=20", 200)

    async def insert(self, worker: int) -> None:
        await self._request("POST", self.servers.bare_url + "/insert", 201, self._job(), auth=False)

    async def select(self, worker: int) -> None:
        await self._request(
            "GET", f"{self.servers.bare_url}/select/{random.randint(1, PRESEEDED_ROWS)}", 200, auth=False
        )

    async def ping(self, worker: int) -> None:
        await self._request("GET", self.servers.bare_url + "/healthz", 200, auth=False)

    async def prepare(self) -> None:
        """Pre-create the jobs that ``get`` reads."""
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=8)) as self.session:

            async def one() -> str:
                body = await self._request(
                    "POST", self.servers.ledger_url + "/orvos/v1/jobs?allow_duplicate=true", 201, self._job()
                )
                uuid: str = msgspec.json.decode(body)["uuid"]
                return uuid

            self.job_uuids = list(await asyncio.gather(*(one() for _ in range(PRECREATED_JOBS))))
        self.session = None

    async def run(self, variant: str, connections: int, seconds: float, warmup: float) -> RunResult:
        """One measured run of ``variant`` over ``connections`` concurrent connections."""
        op: Operation = {
            "create": self.create,
            "insert": self.insert,
            "get": self.get,
            "select": self.select,
            "list": self.list,
            "ping": self.ping,
        }[variant]
        pid = self.servers.bare_pid if variant in ("insert", "select") else self.servers.ledger_pid

        async def server_cpu() -> dict[int, float]:
            return process_cpu([pid])

        connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections)
        async with aiohttp.ClientSession(connector=connector) as self.session:
            try:
                return await run_workers(op, connections, seconds=seconds, warmup=warmup, server_cpu=server_cpu)
            finally:
                self.session = None


# ---- results ---------------------------------------------------------------------------------------------
PAIRS: Final = {"create": "insert", "get": "select"}
TARGETS: Final = {"create": 0.60, "get": 0.80}
P99_TARGET_MS: Final = 25.0


class Measurements:
    """Every run's result by (variant, connections), and per-repeat ratios of each pair."""

    def __init__(self, connections: list[int]) -> None:
        self.connections = connections
        self.results: dict[tuple[str, int], list[RunResult]] = {(v, c): [] for v in VARIANTS for c in connections}
        self.ratios: dict[tuple[str, int], list[float]] = {(v, c): [] for v in PAIRS for c in connections}

    def add_repeat(self, count: int, repeat: dict[str, RunResult]) -> None:
        """Record one repeat of every variant at ``count`` connections."""
        for variant, result in repeat.items():
            self.results[variant, count].append(result)
        for variant, bare in PAIRS.items():
            limit = repeat[bare].ops_per_s
            self.ratios[variant, count].append(repeat[variant].ops_per_s / limit if limit else float("nan"))

    def stat(self, variant: str, count: int, get: Callable[[RunResult], float]) -> float:
        """The median of ``get`` over the repeats."""
        return median([get(r) for r in self.results[variant, count]])

    def table(self) -> str:
        """Every variant at every connection count."""
        headers = ["connections", "variant", "req/s", "p50 ms", "p99 ms", "server CPU µs/req", "client CPU µs/req"]
        rows = [
            [
                count,
                variant,
                self.stat(variant, count, lambda r: r.ops_per_s),
                self.stat(variant, count, lambda r: r.p50_ms),
                self.stat(variant, count, lambda r: r.p99_ms),
                self.stat(variant, count, lambda r: r.server_us_per_op),
                self.stat(variant, count, lambda r: r.client_us_per_op),
            ]
            for count in self.connections
            for variant in VARIANTS
        ]
        return markdown_table(headers, rows)

    def ratio_table(self) -> str:
        """The targets: throughput ratios to the bare app, and p99 at the highest connection count."""
        top = max(self.connections)
        rows: list[list[object]] = []
        for variant, bare in PAIRS.items():
            for count in self.connections:
                value = median(self.ratios[variant, count])
                target = f"≥ {TARGETS[variant]:.2f}" if count == top else ""
                verdict = ("met" if value >= TARGETS[variant] else "MISSED") if count == top else ""
                rows.append([f"{variant}@{count} ÷ {bare}@{count}", f"{value:.2f}", target, verdict])
        for variant in VARIANTS:
            p99 = self.stat(variant, top, lambda r: r.p99_ms)
            target = f"< {P99_TARGET_MS:g} ms" if variant in ("create", "get", "list") else "(reference)"
            verdict = ("met" if p99 < P99_TARGET_MS else "MISSED") if variant in ("create", "get", "list") else ""
            rows.append([f"p99 {variant}@{top}", f"{p99:.2f} ms", target, verdict])
        return markdown_table(["measure", "value", "target", ""], rows)


def _progress(prefix: str, variant: str, result: RunResult) -> None:
    print(
        f"{prefix} conns {result.workers:>3} {variant:<7} {result.ops_per_s:>8,.0f} req/s  "
        f"p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms  "
        f"CPU/req server {result.server_us_per_op:7.1f} us client {result.client_us_per_op:6.1f} us",
        file=sys.stderr,
        flush=True,
    )


async def benchmark(server_dsn: str, args: argparse.Namespace) -> str:
    """Start both servers on a scratch database, run every variant ``args.repeat`` times; return the report."""
    version = await server_version(server_dsn)
    measured = Measurements(args.connections)
    async with scratch_http_database(server_dsn) as dsn:
        await seed_bare_table(dsn)
        servers = Servers(dsn)
        try:
            await servers.start()
            print(f"servers up: jobledger pid {servers.ledger_pid}, bare pid {servers.bare_pid}", file=sys.stderr)
            load = Load(servers)
            await load.prepare()
            for repeat in range(args.repeat):
                for count in args.connections:
                    results: dict[str, RunResult] = {}
                    for variant in VARIANTS if repeat % 2 == 0 else VARIANTS[::-1]:
                        results[variant] = await load.run(variant, count, args.seconds, args.warmup)
                        _progress(f"repeat {repeat + 1}/{args.repeat}", variant, results[variant])
                    measured.add_repeat(count, results)
            conn = await asyncpg.connect(dsn)
            try:
                jobs = await conn.fetchval("SELECT count(*) FROM jobs")
            finally:
                await conn.close()
        finally:
            servers.close()

    command = "python -m bench.http_api " + " ".join(sys.argv[1:])
    target = "DATABASE_URL" if os.environ.get("DATABASE_URL") else "embedded PostgreSQL"
    return "\n".join(
        [
            f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  ",
            f"Command: `{command}` against {target}  ",
            f"Server: {version}; CPUs: {os.cpu_count()} (shared by PostgreSQL, both servers and the load client)  ",
            f"Median of {args.repeat} repeats of {args.seconds:g} s per variant and connection count "
            f"(after {args.warmup:g} s warm-up each); load: aiohttp client, one worker per connection; "
            f"jobs in the read model at the end: {jobs:,}.",
            "",
            measured.table(),
            "",
            measured.ratio_table(),
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.http_api", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run (default 5)")
    parser.add_argument("--repeat", type=int, default=3, help="repeats; the median is reported (default 3)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each run (default 1)")
    parser.add_argument(
        "--connections",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[1, 32],
        help="comma-separated connection counts (default 1,32)",
    )
    parser.add_argument("--bare-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point (or, with ``--bare-server``, the bare app on ``DATABASE_URL``)."""
    args = parse_args(argv)
    if args.bare_server:
        web.run_app(bare_app(os.environ["DATABASE_URL"]), host="127.0.0.1", port=args.port, print=None, access_log=None)
        return
    with postgres_server() as dsn:
        print(asyncio.run(benchmark(dsn, args)))


if __name__ == "__main__":
    main()
