"""Shared fixtures: a real PostgreSQL for the session and a fresh database for every test.

With ``DATABASE_URL`` set, the tests use that server (PostgreSQL 15+); without it they start the embedded
server in a throwaway folder. Either way each test gets its own database, cloned from a template that has
the schema applied, so tests never see each other's rows.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from ledger.config import Settings
from ledger.database import apply_schema, create_pool, with_database
from ledger.embedded import temporary_server
from ledger.store import EventStore
from tests.harness import ServiceHarness, start_service, stop_service

_counter = itertools.count()


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    """A DSN for a database on the PostgreSQL server the tests use."""
    with temporary_server(os.environ.get("DATABASE_URL"), prefix="jobledger-tests-") as dsn:
        yield dsn


@pytest.fixture(scope="session")
async def template_database(server_dsn: str) -> AsyncIterator[str]:
    """The name of a database with the schema applied, cloned by ``database`` for each test."""
    name = f"jobledger_tpl_{os.getpid()}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name}")
        await admin.execute(f"CREATE DATABASE {name}")
        conn = await asyncpg.connect(with_database(server_dsn, name))
        try:
            await apply_schema(conn)
        finally:
            await conn.close()
        yield name
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


@pytest.fixture
async def database_dsn(server_dsn: str, template_database: str) -> AsyncIterator[str]:
    """A DSN for a fresh database of this test's own, schema applied."""
    name = f"jobledger_t{os.getpid()}_{next(_counter)}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {template_database} STRATEGY wal_log")
        yield with_database(server_dsn, name)
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Service settings for a test (data folder of its own)."""
    return Settings(data_dir=tmp_path / "data", pool_min_size=1, pool_max_size=40)


@pytest.fixture
async def pool(database_dsn: str, settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """A service-configured pool on the test's database."""
    pool = await create_pool(database_dsn, settings)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def store(pool: asyncpg.Pool) -> EventStore:
    """An event store on the test's database."""
    return EventStore(pool)


@pytest.fixture
async def service(database_dsn: str, settings: Settings) -> AsyncIterator[ServiceHarness]:
    """The real service on a loopback port and this test's database; after the test, the read model must
    still equal a replay of the events."""
    from ledger.rebuild import check_read_model  # the module under test elsewhere; imported late on purpose

    harness = await start_service(settings, database_dsn)
    try:
        yield harness
        difference = await check_read_model(harness.pool)
        assert difference is None, f"read model differs from a replay after the test: {difference}"
    finally:
        await stop_service(harness)
