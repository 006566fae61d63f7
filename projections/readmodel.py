"""The current-jobs read model: how a folded ``Job`` maps to a row of the ``jobs`` table and back.

Pure conversions only; the SQL that reads and writes the rows lives in ``ledger/store.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

from ledger.hashing import digest_parameters
from projections.job import JOB_KIND, Job
from projections.timefmt import format_ts, parse_ts

# Columns of `jobs` that hold Job attributes, in the order job_to_row() produces them.
JOB_COLUMNS: Final[tuple[str, ...]] = (
    "uuid",
    "owner_uuid",
    "created_at",
    "modified_at",
    "modified_by_user_uuid",
    "modified_by_client_uuid",
    "submit_id",
    "priority",
    "resource_limits",
    "script_name",
    "script_parameters",
    "script_version",
    "supplied_script_version",
    "cancelled_by_client",
    "cancelled_by_user",
    "cancelled_at",
    "started_at",
    "finished_at",
    "running",
    "success",
    "is_locked_by",
    "state",
    "output",
    "log",
    "version",
    "etag",
)
# Bookkeeping columns stored beside the attributes: what the next append needs, and the reuse index key.
EXTRA_COLUMNS: Final[tuple[str, ...]] = ("script_parameters_digest", "last_hash", "last_recorded_at")
ALL_COLUMNS: Final[tuple[str, ...]] = JOB_COLUMNS + EXTRA_COLUMNS
TIMESTAMP_COLUMNS: Final = frozenset({"created_at", "modified_at", "cancelled_at", "started_at", "finished_at"})


def _to_datetime(value: str | None) -> datetime | None:
    return None if value is None else parse_ts(value)


def job_to_row(job: Job, last_hash: str, last_recorded_at: str, *, floats_marked: bool = False) -> tuple[Any, ...]:
    """The values of ``ALL_COLUMNS`` for ``job``; ``floats_marked`` as in ``ledger.hashing.digest_parameters``."""
    values = [
        _to_datetime(getattr(job, name)) if name in TIMESTAMP_COLUMNS else getattr(job, name) for name in JOB_COLUMNS
    ]
    values.append(digest_parameters(job.script_parameters, floats_marked=floats_marked))
    values.append(last_hash)
    values.append(parse_ts(last_recorded_at))
    return tuple(values)


def row_to_job(row: Mapping[str, Any]) -> Job:
    """Rebuild a ``Job`` from a ``jobs`` row (every column of ``JOB_COLUMNS`` must be present)."""
    values = {name: row[name] for name in JOB_COLUMNS}
    for name in TIMESTAMP_COLUMNS:
        moment = values[name]
        if moment is not None:
            values[name] = format_ts(moment)
    return Job(kind=JOB_KIND, href=f"/jobs/{values['uuid']}", **values)
