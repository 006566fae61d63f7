"""Connecting to PostgreSQL: the pool, its session settings, the JSON codecs, and applying ``schema.sql``."""

from __future__ import annotations

import asyncio
import importlib.resources
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import msgspec

from ledger.config import Settings

# 2: the sequencer lease (sequencer_lease, event_positions.epoch and the fencing trigger).
SCHEMA_VERSION: Final = 2
# From a checkout (tests, editable installs): the repository's top-level schema.sql. From a wheel: the copy
# that setup.py's build hook put inside the package (there is no checkout around an installed package).
_CHECKOUT_SCHEMA: Final = Path(__file__).resolve().parent.parent / "schema.sql"


def schema_text() -> str:
    """The text of ``schema.sql``: the packaged copy if this is an installed build, else the checkout's."""
    packaged = importlib.resources.files("ledger") / "schema.sql"
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return _CHECKOUT_SCHEMA.read_text(encoding="utf-8")


# pg_advisory_xact_lock key serialising schema application across processes starting together.
_SCHEMA_LOCK_KEY: Final = 0x6A6F626C  # "jobl"
MIN_SERVER_VERSION: Final = 150000


# Failures that say the server is gone or not accepting connections right now (restarting, shutting down, the
# connection dropped), never that a statement was wrong: whoever meets one reconnects or retries later.
CONNECTION_LOST: Final = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # asyncpg's protocol state machine trips over a connection whose backend was terminated under it.
    asyncpg.InternalClientError,
    # 57P01 terminated by the administrator (a fast shutdown), 57P03 the server is starting up or shutting down.
    asyncpg.OperatorInterventionError,
)


class SchemaTooNew(RuntimeError):
    """The database was set up by a newer jobledger; this one refuses to touch it."""


class ServerTooOld(RuntimeError):
    """PostgreSQL older than 15."""


def with_database(dsn: str, database: str) -> str:
    """``dsn`` pointing at another database on the same server."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


def encode_json(value: Any) -> str:
    """The pool's json/jsonb encoder: msgspec, to text."""
    return msgspec.json.encode(value).decode()


async def init_connection(conn: asyncpg.Connection) -> None:
    """Per-connection setup: jsonb and json travel as Python values, encoded and decoded by msgspec."""
    for name in ("jsonb", "json"):
        await conn.set_type_codec(
            name, schema="pg_catalog", encoder=encode_json, decoder=msgspec.json.decode, format="text"
        )


async def reset_connection(conn: asyncpg.Connection) -> None:
    """What a connection needs on its way back to the pool: only ending a transaction left open.

    asyncpg's default reset sends ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`` on every
    release, a round trip that cost 11% of a create's time in the profile. Pool connections never carry
    session state here (only ``SET LOCAL`` and transaction-scoped locks; the sequencer's lease and the
    LISTEN live on dedicated connections), so it is not needed.
    """
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


def server_settings(settings: Settings) -> dict[str, str]:
    """Session settings every service connection gets."""
    return {
        "application_name": "jobledger",
        "statement_timeout": str(settings.statement_timeout_ms),
        "idle_in_transaction_session_timeout": str(settings.idle_in_transaction_timeout_ms),
        "lock_timeout": str(settings.lock_timeout_ms),
        "timezone": "UTC",
    }


async def create_pool(dsn: str, settings: Settings, **overrides: Any) -> asyncpg.Pool:
    """A connection pool with the service's timeouts and codecs."""
    options: dict[str, Any] = {
        "min_size": settings.pool_min_size,
        "max_size": settings.pool_max_size,
        "init": init_connection,
        "reset": reset_connection,
        "server_settings": server_settings(settings),
        # Connections are recycled after a while so a restarted or failed-over server is picked up.
        "max_inactive_connection_lifetime": 60.0,
        "command_timeout": settings.statement_timeout_ms / 1000 + 5,
    }
    options.update(overrides)
    pool = await asyncpg.create_pool(dsn, **options)
    assert pool is not None
    return pool


async def apply_schema(conn: asyncpg.Connection) -> None:
    """Create or update every table, trigger and index; record the schema version.

    Refuses a database whose recorded version is newer than this code's, and PostgreSQL older than 15.
    """
    server_version = conn.get_server_version()
    as_number = server_version.major * 10000 + server_version.minor
    if as_number < MIN_SERVER_VERSION:
        raise ServerTooOld(f"jobledger needs PostgreSQL 15 or newer, this is {server_version.major}")
    sql = schema_text()
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK_KEY)
        if await conn.fetchval("SELECT to_regclass('jobledger_schema') IS NOT NULL"):
            recorded = await conn.fetchval("SELECT version FROM jobledger_schema")
            if recorded is not None and recorded > SCHEMA_VERSION:
                raise SchemaTooNew(
                    f"the database has schema version {recorded}; this jobledger knows only up to {SCHEMA_VERSION}"
                )
        await conn.execute(sql)
        await conn.execute(
            """INSERT INTO jobledger_schema (version) VALUES ($1)
               ON CONFLICT (singleton) DO UPDATE SET version = EXCLUDED.version, applied_at = now()""",
            SCHEMA_VERSION,
        )
