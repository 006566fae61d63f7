"""Exporting the ledger as NDJSON that a third party can verify offline (``docs/ledger-format.md``).

An export is the sequenced events in position order, one JSON object per line, read in one snapshot.
Events not yet sequenced (normally less than a second old) have no position and are not in any chain hash
or checkpoint yet, so they are left out; export again later to include them.

Line kinds:

* ``orvos#event``: an event as the API shows it (``event_item``) plus ``chain_hash``, the global chain hash
  at its position.
* ``jobledger#chainStart`` (first line of a per-job export whose job starts after position 1): the position
  just before the job's first event and the chain hash there. Nothing vouches for it by itself; it is
  trusted only because the chain recomputed from it must end at a signed checkpoint's hash.
* ``jobledger#chainLink`` (per-job export only): another job's event at a position, reduced to its event
  hash and chain hash, so that the chain can be recomputed without revealing that event.

Every line is canonical JSON (sorted keys, no whitespace), so exports of the same ledger are byte-identical.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Final

import asyncpg

from ledger.hashing import canonical_json
from ledger.store import StoredEvent, stored_event

EVENT_KIND: Final = "orvos#event"
START_KIND: Final = "jobledger#chainStart"
LINK_KIND: Final = "jobledger#chainLink"
PREFETCH: Final = 5_000
_NO_TIMEOUTS: Final = "SET LOCAL statement_timeout = 0; SET LOCAL idle_in_transaction_session_timeout = 0"
# Same columns as ledger.store's event select, plus the chain hash; inner join: only sequenced events.
SELECT_SEQUENCED: Final = (
    "SELECT e.id, p.position, p.chain_hash, e.job_uuid, e.version, e.event_type, e.data, e.actor_user_uuid, "
    "e.actor_client_uuid, e.request_id, e.recorded_at, e.prev_hash, e.hash "
    "FROM event_positions p JOIN events e ON e.id = p.event_id WHERE p.position >= $1 ORDER BY p.position"
)
FIRST_POSITION_OF_JOB: Final = (
    "SELECT min(p.position) FROM event_positions p JOIN events e ON e.id = p.event_id WHERE e.job_uuid = $1"
)
CHAIN_HASH_AT: Final = "SELECT chain_hash FROM event_positions WHERE position = $1"


class NothingToExport(LookupError):
    """The job has no sequenced events (unknown, or too new to be sequenced yet)."""


def event_item(event: StoredEvent) -> dict[str, Any]:
    """An event as the API and exports show it (``kind`` ``orvos#event``)."""
    return {
        "kind": EVENT_KIND,
        "position": event.position,
        "id": event.id,
        "job_uuid": event.job_uuid,
        "version": event.version,
        "event_type": event.event_type,
        "data": event.data,
        "actor_user_uuid": event.actor_user_uuid,
        "actor_client_uuid": event.actor_client_uuid,
        "request_id": event.request_id,
        "recorded_at": event.recorded_at,
        "prev_hash": event.prev_hash,
        "hash": event.hash,
    }


def encode_line(item: dict[str, Any]) -> str:
    """One NDJSON line (with its newline)."""
    return canonical_json(item).decode() + "\n"


async def export_lines(pool: asyncpg.Pool, job_uuid: str | None = None) -> AsyncIterator[str]:
    """The export's lines: the whole ledger, or (``job_uuid``) one job's events with the links around them.

    A per-job export covers positions from the job's first event to the head: the job's events in full,
    every other event as a link. Raises ``NothingToExport`` if the job has no sequenced events.
    """
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        await conn.execute(_NO_TIMEOUTS)
        first = 1
        if job_uuid is not None:
            first = await conn.fetchval(FIRST_POSITION_OF_JOB, job_uuid)
            if first is None:
                raise NothingToExport(f"job {job_uuid} has no sequenced events")
            if first > 1:
                start = await conn.fetchval(CHAIN_HASH_AT, first - 1)
                yield encode_line({"kind": START_KIND, "position": first - 1, "chain_hash": start})
        cursor = await conn.cursor(SELECT_SEQUENCED, first)
        while batch := await cursor.fetch(PREFETCH):
            for row in batch:
                if job_uuid is None or row["job_uuid"] == job_uuid:
                    item = event_item(stored_event(row))
                    item["chain_hash"] = row["chain_hash"]
                else:
                    item = {
                        "kind": LINK_KIND,
                        "position": row["position"],
                        "hash": row["hash"],
                        "chain_hash": row["chain_hash"],
                    }
                yield encode_line(item)


__all__ = ["EVENT_KIND", "LINK_KIND", "START_KIND", "NothingToExport", "encode_line", "event_item", "export_lines"]
