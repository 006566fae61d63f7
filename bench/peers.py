"""The peers, on the same PostgreSQL in the same run: the ``eventsourcing`` library and Message DB.

* **eventsourcing** (PyPI, its PostgreSQL application recorder over psycopg 3): ``Application.save`` of a
  new aggregate with one ``Submitted`` event (a job's worth of attributes) at each thread count. Its
  recorder takes ``LOCK TABLE ... IN EXCLUSIVE MODE`` per insert to keep notification ids gap-free, so
  writers serialise. Reading: the whole notification log, 1,000 a page, each notification decoded to a
  domain event (``mapper.to_domain_event``).
* **Message DB** (``@eventide/message-db`` from npm, its SQL applied to a scratch database in the order its
  ``install.sh`` gives, less the role and privileges, which are cluster-wide): ``write_message`` of a new
  stream's first message (``expected_version`` -1, the same check as a new job's) in one category ``job``,
  one held connection per writer (it takes an advisory lock on the category); reading:
  ``get_category_messages('job', position, 1000)``, data and metadata decoded.

Each read backlog is ``RunConfig.backlog`` events loaded in bulk before the first round, plus what the write
runs add.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg
import msgspec

from bench.common import RunResult, checkpoint_server, run_workers, scratch_database
from bench.plan import RunConfig, Skip
from bench.report import Results

MESSAGE_DB_PACKAGE: Final = "@eventide/message-db@1.3.1"
OWNER: Final = "zzzzz-tpzed-000000000000001"
_sequence = itertools.count()


def _parameters() -> dict[str, Any]:
    return {"input": f"{next(_sequence):040x}", "chunk_size": 64}


def run_threads(op: Callable[[], object], threads: int, seconds: float, warmup: float) -> RunResult:
    """``bench.common.run_workers`` for blocking code: ``threads`` OS threads calling ``op`` back to back."""

    def drive(until: float, out: list[float]) -> None:
        clock = time.perf_counter
        while clock() < until:
            began = clock()
            op()
            out.append(clock() - began)

    def phase(length: float) -> tuple[float, list[list[float]]]:
        until = time.perf_counter() + length
        per_thread: list[list[float]] = [[] for _ in range(threads)]
        workers = [threading.Thread(target=drive, args=(until, out)) for out in per_thread]
        began = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return time.perf_counter() - began, per_thread

    if warmup > 0:
        phase(warmup)
    elapsed, per_thread = phase(seconds)
    latencies = tuple(itertools.chain.from_iterable(per_thread))
    return RunResult(workers=threads, ops=len(latencies), elapsed=elapsed, latencies=latencies)


def psycopg_env(dsn: str) -> dict[str, str]:
    """eventsourcing's ``POSTGRES_*`` settings for an asyncpg-style DSN (TCP or a socket folder in ``?host=``)."""
    parts = urlsplit(dsn)
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": parts.path.lstrip("/"),
        "POSTGRES_HOST": query.get("host") or parts.hostname or "127.0.0.1",
        "POSTGRES_PORT": str(query.get("port") or parts.port or 5432),
        "POSTGRES_USER": unquote(parts.username or "postgres"),
        "POSTGRES_PASSWORD": unquote(parts.password or ""),
    }


# ---- eventsourcing ---------------------------------------------------------------------------------------
def _eventsourcing_types() -> tuple[type, type]:
    """The aggregate and application classes (imported late: the ``bench`` extra may not be installed)."""
    from eventsourcing.application import Application
    from eventsourcing.domain import Aggregate, event

    class BenchJob(Aggregate):
        """A job's worth of attributes in one creation event, like jobledger's ``submitted``."""

        @event("Submitted")
        def __init__(
            self,
            owner_uuid: str,
            script_name: str,
            script_version: str,
            script_parameters: dict[str, Any],
            priority: int,
            resource_limits: dict[str, int],
        ) -> None:
            self.owner_uuid = owner_uuid
            self.script_name = script_name
            self.script_version = script_version
            self.script_parameters = script_parameters
            self.priority = priority
            self.resource_limits = resource_limits

    class BenchJobs(Application):
        """An application with no snapshots, on the PostgreSQL recorder."""

    return BenchJob, BenchJobs


class EventsourcingSuite:
    """eventsourcing append@N (threads) and its notification-log read with decoding."""

    title = "eventsourcing"

    def __init__(self, server: str, config: RunConfig, results: Results) -> None:
        self.server, self.config, self.results = server, config, results
        self.app: Any = None
        self.job: Any = None
        self.application: Any = None
        self.env: dict[str, str] = {}

    # The application (and its connection pool) lives for one round only: the suites share the server's
    # max_connections.
    async def _open(self) -> None:
        self.app = await asyncio.to_thread(self.application, env=self.env)

    def _close(self) -> None:
        self.app.close()
        self.app = None

    async def setup(self, stack: AsyncExitStack) -> None:
        """A scratch database, the application (its tables created), and the read backlog."""
        try:
            import eventsourcing  # noqa: F401
        except ImportError:
            raise Skip("eventsourcing is not installed (pip install -e '.[bench]')") from None
        dsn = await stack.enter_async_context(scratch_database(self.server, schema=False))
        self.job, application = _eventsourcing_types()
        size = str(max(self.config.peer_writers))
        self.env = {**psycopg_env(dsn), "POSTGRES_POOL_SIZE": size, "POSTGRES_MAX_OVERFLOW": "0", "CREATE_TABLE": "y"}
        self.application = application
        await self._open()
        try:
            await asyncio.to_thread(self._preload, self.config.backlog)
        finally:
            self._close()
        from importlib.metadata import version

        self.results.notes.append(f"eventsourcing {version('eventsourcing')}, psycopg {version('psycopg')}")

    def _new(self) -> Any:
        return self.job(OWNER, "hash", "main", _parameters(), 0, {"min_nodes": 1, "max_tasks_per_node": 1})

    def _preload(self, count: int) -> None:
        for start in range(0, count, 500):
            self.app.save(*(self._new() for _ in range(min(500, count - start))))

    def _append(self) -> None:
        self.app.save(self._new())

    def _read_all(self) -> float:
        recorder, mapper = self.app.recorder, self.app.mapper
        began, start, seen = time.perf_counter(), 1, 0
        while batch := recorder.select_notifications(start, 1000):
            for notification in batch:
                mapper.to_domain_event(notification)
            seen, start = seen + len(batch), batch[-1].id + 1
        return seen / (time.perf_counter() - began)

    async def round(self, index: int) -> None:
        """Appends at each thread count, then one full read of the notification log."""
        cfg = self.config
        await self._open()
        try:
            for threads in cfg.peer_writers:
                await checkpoint_server(self.server)  # as before every store-level run: all start alike
                result = await asyncio.to_thread(run_threads, self._append, threads, cfg.seconds, cfg.warmup)
                self.results.add_run(f"eventsourcing append@{threads}", result)
            rate = await asyncio.to_thread(self._read_all)
        finally:
            self._close()
        self.results.add("eventsourcing notification read (decoded)", rate, "events/s")


# ---- Message DB ------------------------------------------------------------------------------------------
def fetch_message_db(folder: Path) -> Path:
    """``npm pack`` the Message DB package into ``folder`` and unpack it; returns its ``database`` folder."""
    if shutil.which("npm") is None:
        raise Skip("npm is not installed, so Message DB (an npm package) was not measured")
    try:
        out = subprocess.run(
            ["npm", "pack", MESSAGE_DB_PACKAGE, "--pack-destination", str(folder), "--silent"],
            capture_output=True, text=True, check=True, timeout=120,
        )  # fmt: skip
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise Skip(f"npm pack {MESSAGE_DB_PACKAGE} failed, so Message DB was not measured: {exc}") from None
    tarball = folder / out.stdout.strip().splitlines()[-1]
    with tarfile.open(tarball) as archive:
        archive.extractall(folder, filter="data")
    return folder / "package" / "database"


_SQL_FILE: Final = re.compile(r"\$base/(\S+\.sql)")
_SOURCED: Final = re.compile(r"^\s*source \$base/(\S+\.sh)")
_CLUSTER_WIDE: Final = ("roles/", "privileges/")


def install_order(database: Path, script: str = "install.sh") -> list[str]:
    """The SQL files ``install.sh`` applies, in its order (following ``source``), less roles and privileges.

    The install script's shell functions are defined in the order it calls them, so reading the file top to
    bottom gives the order.
    """
    files: list[str] = []
    for line in (database / script).read_text().splitlines():
        if sourced := _SOURCED.match(line):
            files += install_order(database, sourced.group(1))
        elif not line.lstrip().startswith("#"):
            files += [f for f in _SQL_FILE.findall(line) if not f.startswith(_CLUSTER_WIDE)]
    return files


MDB_SETTINGS: Final = {"search_path": "message_store,public"}
WRITE_MESSAGE: Final = "SELECT message_store.write_message($1, $2, 'Submitted', $3::jsonb, $4::jsonb, -1)"
GET_CATEGORY: Final = "SELECT * FROM message_store.get_category_messages('job', $1, 1000)"
PRELOAD_MESSAGES: Final = """
INSERT INTO message_store.messages (stream_name, position, type, data, metadata)
SELECT 'job-' || md5(g::text), 0, 'Submitted',
       jsonb_build_object('owner_uuid', $2::text, 'script_name', 'hash', 'script_version', 'main',
           'script_parameters', jsonb_build_object('input', md5(g::text), 'chunk_size', 64), 'priority', 0,
           'resource_limits', jsonb_build_object('min_nodes', 1, 'max_tasks_per_node', 1)),
       jsonb_build_object('actor_user_uuid', $2::text, 'request_id', 'req-bench-' || g)
FROM generate_series(1, $1) g"""


class MessageDbSuite:
    """Message DB write_message@N in one category and get_category_messages reads with decoding."""

    title = "Message DB"

    def __init__(self, server: str, config: RunConfig, results: Results) -> None:
        self.server, self.config, self.results = server, config, results
        self.dsn = ""
        self.pool: asyncpg.Pool | None = None
        self.held: list[Any] = []

    async def setup(self, stack: AsyncExitStack) -> None:
        """Fetch the package, install its SQL into a scratch database, load the read backlog."""
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="jobledger-bench-mdb-")))
        database = await asyncio.to_thread(fetch_message_db, folder)
        dsn = await stack.enter_async_context(scratch_database(self.server, schema=False))
        files = install_order(database)
        conn = await asyncpg.connect(dsn, server_settings=MDB_SETTINGS)
        try:
            for name in files:
                try:
                    await conn.execute((database / name).read_text())
                except asyncpg.FeatureNotSupportedError:
                    # Only pgcrypto, for gen_random_uuid(), which PostgreSQL has built in since version 13.
                    if not name.startswith("extensions/"):
                        raise
                    self.results.notes.append(f"Message DB: {name} skipped (extension not available on this server)")
            await conn.execute(PRELOAD_MESSAGES, self.config.backlog, OWNER)
            await conn.execute("ANALYZE message_store.messages")
        finally:
            await conn.close()
        self.dsn = dsn
        version = (database / "VERSION.txt").read_text().strip()
        self.results.notes.append(f"Message DB {version} ({MESSAGE_DB_PACKAGE}); applied: {', '.join(files)}")

    async def _write(self, worker: int) -> None:
        data = {
            "owner_uuid": OWNER, "script_name": "hash", "script_version": "main", "script_parameters": _parameters(),
            "priority": 0, "resource_limits": {"min_nodes": 1, "max_tasks_per_node": 1},
        }  # fmt: skip
        metadata = {"actor_user_uuid": OWNER, "request_id": f"req-bench-mdb-{next(_sequence)}"}
        stream = f"job-{uuid.uuid4().hex}"
        await self.held[worker].fetchval(
            WRITE_MESSAGE,
            str(uuid.uuid4()),
            stream,
            msgspec.json.encode(data).decode(),
            msgspec.json.encode(metadata).decode(),
        )

    async def _read_all(self) -> float:
        assert self.pool is not None
        decode = msgspec.json.decode
        async with self.pool.acquire() as conn:
            began, position, seen = time.perf_counter(), 1, 0
            while rows := await conn.fetch(GET_CATEGORY, position):
                for row in rows:
                    decode(row["data"])
                    decode(row["metadata"])
                seen, position = seen + len(rows), rows[-1]["global_position"] + 1
        return seen / (time.perf_counter() - began)

    async def round(self, index: int) -> None:
        """Writes at each connection count (each writer holding one), then one full category read."""
        cfg = self.config
        size = max(cfg.peer_writers)
        # One pool per round: the suites share the server's max_connections.
        self.pool = await asyncpg.create_pool(self.dsn, min_size=size, max_size=size, server_settings=MDB_SETTINGS)
        try:
            for writers in cfg.peer_writers:
                await checkpoint_server(self.server)  # as before every store-level run: all start alike
                self.held = [await self.pool.acquire() for _ in range(writers)]
                try:
                    result = await run_workers(self._write, writers, seconds=cfg.seconds, warmup=cfg.warmup)
                finally:
                    for conn in self.held:
                        await self.pool.release(conn)
                    self.held = []
                self.results.add_run(f"Message DB write_message@{writers}", result)
            rate = await self._read_all()
        finally:
            await self.pool.close()
            self.pool = None
        self.results.add("Message DB get_category_messages (decoded)", rate, "events/s")
