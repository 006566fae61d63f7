"""A job as it was: the pure ``fold`` of a prefix of its history (up to a version, or up to a time).

Only what the fold needs is read (no hashes, no positions), ``data`` as JSON text decoded straight into the
event's struct (``decode_event_json``), and ``recorded_at`` is formatted by PostgreSQL
in exactly ``projections.timefmt``'s form, so a job with 10,000 events folds in well under 50 ms
(``bench/provenance.py``) without per-job snapshots. A job's events never go backwards in time (the
``events_job_time`` check of ``schema.sql``), so the events at or before a moment are always a prefix of its
history, the same prefix ``as_of_version`` of the last of them gives.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Final

import asyncpg

from projections.job import Job, Recorded, decode_event_json, fold


def utc_text(column: str) -> str:
    """SQL rendering the timestamptz ``column`` exactly as ``projections.timefmt.format_ts`` does.

    UTC, six fractional digits, a literal ``T`` and ``Z``; several times cheaper than ``strftime`` per row.
    """
    return f"to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"


_FOLD_COLUMNS: Final = (
    f"version, event_type, data::text, actor_user_uuid, actor_client_uuid, request_id, {utc_text('recorded_at')}"
)
UP_TO_VERSION: Final = f"SELECT {_FOLD_COLUMNS} FROM events WHERE job_uuid = $1 AND version <= $2 ORDER BY version"
UP_TO_TIME: Final = f"SELECT {_FOLD_COLUMNS} FROM events WHERE job_uuid = $1 AND recorded_at <= $2 ORDER BY version"


def _fold(job_uuid: str, rows: Sequence[asyncpg.Record]) -> Job | None:
    return fold(
        Recorded(
            job_uuid=job_uuid,
            version=row[0],
            event=decode_event_json(row[1], row[2]),
            actor_user_uuid=row[3],
            actor_client_uuid=row[4],
            request_id=row[5],
            recorded_at=row[6],
        )
        for row in rows
    )


async def job_at_version(pool: asyncpg.Pool, job_uuid: str, version: int) -> Job | None:
    """The job after its events 1..``version`` (None if it has no events)."""
    return _fold(job_uuid, await pool.fetch(UP_TO_VERSION, job_uuid, version))


async def job_at_time(pool: asyncpg.Pool, job_uuid: str, moment: datetime) -> Job | None:
    """The job after its events recorded at or before ``moment`` (None if it did not exist yet)."""
    return _fold(job_uuid, await pool.fetch(UP_TO_TIME, job_uuid, moment))


__all__ = ["job_at_time", "job_at_version", "utc_text"]
