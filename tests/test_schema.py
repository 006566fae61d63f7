"""Applying ``schema.sql``: idempotent, recorded, and refused by a database set up by a newer jobledger."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from ledger.database import SCHEMA_VERSION, SchemaTooNew, apply_schema, schema_text


async def _catalogue(conn: asyncpg.Connection) -> list[tuple[str, str]]:
    """Every table, index, trigger and function of the public schema, by kind and name."""
    rows = await conn.fetch(
        """SELECT 'relation:' || relkind::text AS kind, relname::text AS name FROM pg_class
             WHERE relnamespace = 'public'::regnamespace
           UNION ALL SELECT 'trigger', tgname::text FROM pg_trigger WHERE NOT tgisinternal
           UNION ALL SELECT 'function', proname::text FROM pg_proc WHERE pronamespace = 'public'::regnamespace
           ORDER BY 1, 2"""
    )
    return [(row["kind"], row["name"]) for row in rows]


async def test_applying_the_schema_again_changes_nothing_and_records_the_version(database_dsn: str) -> None:
    conn = await asyncpg.connect(database_dsn)
    try:
        before = await _catalogue(conn)
        await apply_schema(conn)
        await apply_schema(conn)
        assert await _catalogue(conn) == before
        assert await conn.fetchval("SELECT version FROM jobledger_schema") == SCHEMA_VERSION
        assert await conn.fetchval("SELECT count(*) FROM jobledger_schema") == 1
    finally:
        await conn.close()


async def test_processes_starting_together_apply_it_once_each_without_error(database_dsn: str) -> None:
    conns = [await asyncpg.connect(database_dsn) for _ in range(4)]
    try:
        await asyncio.gather(*(apply_schema(conn) for conn in conns))
        assert await conns[0].fetchval("SELECT version FROM jobledger_schema") == SCHEMA_VERSION
    finally:
        await asyncio.gather(*(conn.close() for conn in conns))


async def test_a_database_with_a_newer_schema_is_refused_untouched(database_dsn: str) -> None:
    conn = await asyncpg.connect(database_dsn)
    try:
        await conn.execute("UPDATE jobledger_schema SET version = $1", SCHEMA_VERSION + 1)
        await conn.execute("DROP INDEX jobs_state")  # something a re-apply would put back
        with pytest.raises(SchemaTooNew, match=f"version {SCHEMA_VERSION + 1}"):
            await apply_schema(conn)
        assert await conn.fetchval("SELECT version FROM jobledger_schema") == SCHEMA_VERSION + 1
        assert await conn.fetchval("SELECT to_regclass('jobs_state')") is None
    finally:
        await conn.close()


def test_the_schema_is_read_from_the_package_when_installed(tmp_path: Path) -> None:
    """An installed wheel has no checkout around it: ``schema_text`` must find the copy the build put in the
    ``ledger`` package (setup.py), and that copy is the top-level schema.sql."""
    checkout = Path(__file__).resolve().parent.parent
    build = tmp_path / "build"
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(build)],
        cwd=checkout,
        check=True,
        capture_output=True,
    )
    assert (build / "ledger" / "schema.sql").read_text() == (checkout / "schema.sql").read_text()
    program = "from ledger.database import schema_text; import sys; sys.stdout.write(schema_text())"
    # Only the built tree on the path (run from tmp_path): the checkout's file is out of reach.
    shown = subprocess.run(
        [sys.executable, "-c", program], cwd=tmp_path, env={"PYTHONPATH": str(build)}, check=True, capture_output=True
    )
    assert shown.stdout.decode() == schema_text()
