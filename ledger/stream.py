"""Reading the global event stream by position, and hearing when its head moves.

Consumers never get a queue of their own: each one reads pages from the database by cursor (a position),
and between reads waits on the process-wide ``StreamNotifier``, which a single LISTEN connection per
process (and the local sequencer, directly) keeps informed of the head. A notification is only a hint to
read again sooner; every wait also ends after a timeout and reads again, so a lost notification costs
latency, never an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Final

import asyncpg
import msgspec

from ledger.asof import utc_text
from ledger.config import Settings
from ledger.database import server_settings
from ledger.sequencer import CHANNEL, load_cursor
from ledger.store import StoredEvent

_log = logging.getLogger("jobledger.stream")

# A filtered read looks at most this many positions past its cursor, so a selective filter over a long
# stream costs bounded work per read; ``next_after`` still moves past what was looked at.
SCAN_WINDOW: Final = 10_000
# /healthz counts unsequenced events only up to this many (the count is an index range scan).
PENDING_COUNT_CAP: Final = 100_000

# StoredEvent's fields, in order (rows become events positionally); PostgreSQL formats the time, several times
# cheaper than Python (a catch-up reads a hundred thousand events a second).
_COLUMNS: Final = (
    "e.id, p.position, e.job_uuid, e.version, e.event_type, e.data, e.actor_user_uuid, e.actor_client_uuid, "
    f"e.request_id, {utc_text('e.recorded_at')} AS recorded_at, e.prev_hash, e.hash"
)
# The listener's reconnection back-off stops doubling here: once the database is back, the listener is too
# within this long (``/healthz`` reports it, and other processes' sequencing wakes consumers only through it);
# one connection attempt every two seconds per process costs a server that is down nothing.
MAX_RECONNECT_SECONDS: Final = 2.0
HEAD: Final = "SELECT COALESCE((SELECT position FROM event_positions ORDER BY position DESC LIMIT 1), 0)"


class EventPage(msgspec.Struct, kw_only=True, frozen=True):
    """One read of the stream.

    ``items`` are the matching events after the cursor, in position order. ``head`` is the latest position
    at the time of the read (of the whole stream, not only the matching events). ``next_after`` is the
    cursor for the next read: past every position this read looked at, matching or not, and never behind
    the cursor it was given.
    """

    items: list[StoredEvent]
    head: int
    next_after: int


@dataclass(frozen=True, slots=True)
class _Query:
    sql: str
    args: tuple[Any, ...]


def _page_query(
    *,
    after: int,
    limit: int,
    owner_uuid: str | None,
    job_uuids: Collection[str] | None,
    event_types: Collection[str] | None,
    exclude_job_uuids: Collection[str],
    exclude_event_types: Collection[str],
    scan_window: int,
) -> tuple[_Query, int | None]:
    """The page statement, and the last position it looks at (None: unbounded, when nothing is filtered)."""
    args: list[Any] = [after, limit]
    where: list[str] = []
    owner_test = ""
    if owner_uuid is not None:
        args.append(owner_uuid)
        # Permission (CONTRACT §2): a user sees only the events of jobs it owns; a job's owner never changes.
        owner_test = f"j.uuid = e.job_uuid AND j.owner_uuid = ${len(args)}"
    for column, values, negate in (
        ("job_uuid", job_uuids, False),
        ("event_type", event_types, False),
        ("job_uuid", exclude_job_uuids, True),
        ("event_type", exclude_event_types, True),
    ):
        if values is None or (negate and not values):
            continue
        args.append(list(values))
        test = f"e.{column} = ANY(${len(args)}::text[])"
        where.append(f"NOT ({test})" if negate else test)
    if len(args) == 2:
        # Unfiltered: every position matches, so the page is simply the next `limit` positions.
        source = "event_positions p JOIN events e ON e.id = p.event_id"
        where.append("p.position > $1")
        upto = None
    else:
        upto = after + scan_window
        args.append(upto)
        window = f"p.position > $1 AND p.position <= ${len(args)}"
        if job_uuids is not None:
            # A few named jobs: let the planner start from their events (events_job_version_key).
            joins = f" JOIN jobs j ON {owner_test}" if owner_test else ""
            source = f"event_positions p JOIN events e ON e.id = p.event_id{joins}"
            where.append(window)
        else:
            # Filters on type or owner only: walk the window in position order, looking each event (and its
            # job) up by key. Bounded work per read whatever the table's size, where the planner, trusting
            # its estimates, could otherwise scan all of ``events`` for a rare type every time.
            jobs = f" CROSS JOIN LATERAL (SELECT 1 FROM jobs j WHERE {owner_test} OFFSET 0) j" if owner_test else ""
            source = (
                f"(SELECT position, event_id FROM event_positions p WHERE {window} ORDER BY position OFFSET 0) p "
                "CROSS JOIN LATERAL (SELECT * FROM events e WHERE e.id = p.event_id OFFSET 0) e" + jobs
            )
    source += " WHERE " + " AND ".join(where) if where else ""
    # One statement, so the head comes from the same snapshot as the page: next_after can rely on it.
    sql = (
        f"SELECT h.head, page.* FROM ({HEAD} AS head) h LEFT JOIN LATERAL ("
        f"SELECT {_COLUMNS} FROM {source} ORDER BY p.position LIMIT $2) page ON true ORDER BY page.position"
    )
    return _Query(sql, tuple(args)), upto


async def read_events(
    pool: asyncpg.Pool | asyncpg.Connection,
    *,
    after: int,
    limit: int,
    owner_uuid: str | None,
    job_uuids: Collection[str] | None = None,
    event_types: Collection[str] | None = None,
    exclude_job_uuids: Collection[str] = (),
    exclude_event_types: Collection[str] = (),
    scan_window: int = SCAN_WINDOW,
) -> EventPage:
    """The events after position ``after`` (at most ``limit``) that the filters and ``owner_uuid`` admit.

    ``owner_uuid``: only events of that user's jobs (None: all). ``job_uuids`` / ``event_types``: only these
    (None: any); ``exclude_*``: none of these. Filtered reads look at no more than ``scan_window`` positions.
    """
    if after < 0 or limit < 0:
        raise ValueError("after and limit must not be negative")
    query, upto = _page_query(
        after=after,
        limit=limit,
        owner_uuid=owner_uuid,
        job_uuids=job_uuids,
        event_types=event_types,
        exclude_job_uuids=exclude_job_uuids,
        exclude_event_types=exclude_event_types,
        scan_window=scan_window,
    )
    rows = await pool.fetch(query.sql, *query.args)
    head: int = rows[0]["head"]
    # Each row is the head, then an event's fields (none when the page is empty: the LEFT JOIN's one row).
    items = [StoredEvent(*row[1:]) for row in rows if row["position"] is not None]
    if limit and len(items) == limit:
        next_after = items[-1].position or after  # a full page: resume right after its last event
    elif upto is None:
        # Unfiltered and not full: this read saw everything up to the head of its snapshot.
        next_after = max(after, head) if limit else after
    else:
        # Filtered and not full: every match up to min(upto, head) is in ``items``; positions up to the
        # head already exist and never change, so nothing there can match later.
        next_after = max(after, min(upto, head)) if limit else after
    return EventPage(items=items, head=head, next_after=next_after)


async def head_position(pool: asyncpg.Pool | asyncpg.Connection) -> int:
    """The latest position (0 when nothing is sequenced yet)."""
    head: int = await pool.fetchval(HEAD)
    return head


class StreamStatus(msgspec.Struct, kw_only=True, frozen=True):
    """The stream's lag, for ``/healthz``."""

    head: int
    unsequenced: int
    oldest_unsequenced_age_seconds: float | None
    oldest_write_transaction_age_seconds: float | None


_PENDING: Final = (
    "SELECT count(*) AS n, EXTRACT(epoch FROM now() - min(recorded_at))::float8 AS age FROM "
    f"(SELECT recorded_at FROM events WHERE (tx, id) > ($1, $2) LIMIT {PENDING_COUNT_CAP}) pending"
)
# The horizon is cluster-wide: the oldest transaction holding a transaction id, in any database.
_OLDEST_WRITER: Final = (
    "SELECT EXTRACT(epoch FROM now() - min(xact_start))::float8 FROM pg_stat_activity "
    "WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid()"
)


async def stream_status(pool: asyncpg.Pool) -> StreamStatus:
    """Head, committed events still waiting for a position, and the age of the oldest write transaction."""
    async with pool.acquire() as conn:
        cursor = await load_cursor(conn)
        pending = await conn.fetchrow(_PENDING, cursor.tx, cursor.id)
        oldest_writer = await conn.fetchval(_OLDEST_WRITER)
    return StreamStatus(
        head=cursor.position,
        unsequenced=pending["n"],
        oldest_unsequenced_age_seconds=pending["age"],
        oldest_write_transaction_age_seconds=oldest_writer,
    )


def _setter(event: asyncio.Event) -> Callable[[object], None]:
    return lambda _conn: event.set()


class StreamNotifier:
    """The process's view of the head, shared by every consumer: one LISTEN connection, fanned out in-process.

    ``generation`` changes whenever the known head moves. A consumer notes it before reading the database and,
    if the read found nothing new, calls ``wait(generation, timeout)``: it returns at once if the head moved
    meanwhile (so a wake-up between the read and the wait is never lost), else when it next moves, or at the
    timeout. Waiting costs a consumer nothing but a suspended coroutine.

    The head is learnt from NOTIFY on ``CHANNEL`` (sent by whichever process is the sequencer), from the
    local sequencer directly (``publish``), and by reading it after every (re)connection, since
    notifications sent while disconnected are lost. If the database restarts, it reconnects.
    """

    def __init__(self, dsn: str, settings: Settings, *, reconnect: float = 1.0, keepalive: float = 10.0) -> None:
        self.dsn = dsn
        self.settings = settings
        self.reconnect = reconnect
        self.keepalive = keepalive
        self.head = 0
        self.generation = 0
        self.listening = False
        self.closed = False
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def publish(self, head: int, *, reset: bool = False) -> None:
        """A new head is known; wake every waiter. ``reset`` accepts a lower head (a restored database)."""
        if head > self.head or (reset and head != self.head):
            self.head = head
            self._wake()

    def _wake(self) -> None:
        self.generation += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait(self, generation: int, seconds: float) -> bool:
        """Wait until ``generation`` is stale (the head moved since it was read), at most ``seconds``.

        True if the head moved.
        """
        if self.generation != generation or self.closed:
            return self.generation != generation
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout=seconds)
        return self.generation != generation

    def start(self) -> None:
        """Listen in the background until ``stop``."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="jobledger-stream-notifier")

    def close_waiters(self) -> None:
        """Wake every waiter for good (the service is shutting down; streams should end)."""
        self.closed = True
        self._wake()

    async def stop(self) -> None:
        """Stop listening and wake every waiter."""
        self.close_waiters()
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _on_notify(self, conn: object, pid: int, channel: str, payload: str) -> None:
        with contextlib.suppress(ValueError):
            self.publish(int(payload))

    async def _run(self) -> None:
        delay = self.reconnect
        while not self.closed:
            conn = None
            try:
                settings = {**server_settings(self.settings), "application_name": "jobledger-listener"}
                conn = await asyncpg.connect(self.dsn, server_settings=settings, timeout=10)
                lost = asyncio.Event()
                conn.add_termination_listener(_setter(lost))
                await conn.add_listener(CHANNEL, self._on_notify)
                # Listening first, then reading the head: nothing committed in between can be missed.
                self.publish(await head_position(conn), reset=True)
                self.listening = True
                delay = self.reconnect
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), timeout=self.keepalive)
                    if not lost.is_set():
                        # A half-open connection raises nothing by itself; a query notices.
                        await conn.fetchval("SELECT 1", timeout=self.keepalive)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: reconnect; consumers meanwhile re-poll on their timeouts
                _log.warning("event stream listener lost its connection: %r", exc)
            finally:
                self.listening = False
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.terminate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RECONNECT_SECONDS)
