"""The sequencer: gives every committed event its global position, 1, 2, 3, ... in the order consumers see it.

Appends take no lock and never notify (``ledger/store.py``); each event row is stamped with the 64-bit id of
its transaction (``events.tx``, ``pg_current_xact_id()``). Exactly one process at a time, the leader of a
session-level advisory lock, runs this loop (research §2.2 C, §2.4):

1. keep a cursor ``(tx, id)``: the row of the last sequenced event (after a takeover, the event at the
   highest position);
2. read the rows after it in ``(tx, id)`` order, each flagged ``settled`` when ``tx`` is below
   ``pg_snapshot_xmin(pg_current_snapshot())``, the horizon: the oldest transaction still running;
3. take the leading run of settled rows and, in one statement (one transaction), insert their
   ``event_positions`` rows (head+1, head+2, ..., each chain hash linked to the previous one) and
   ``NOTIFY`` the new head.

Why nothing is ever missed, duplicated or reordered
---------------------------------------------------
The horizon ``h`` of the scan's snapshot is the smallest transaction id still running when the snapshot was
taken. A transaction with an id below ``h`` has therefore finished: if it committed, all of its rows are
visible to the scan; if it aborted, they will never exist. Any transaction that writes an event later is
either one of those running at snapshot time, whose id is at least ``h``, or one that gets its id after the
snapshot, and ids only grow, so it is larger than every id the snapshot knows, which includes ``h``. So the
set of rows with ``tx < h`` is complete and final the moment the scan sees it: nothing can ever be added to
it. Ordered by ``(tx, id)``, settled rows come first (``settled`` is ``tx < h``, monotone in ``tx``), and
the cursor only ever moves to a settled row. Every row that appears in the future has ``tx >= h`` >
``cursor.tx``, hence sorts after the cursor. Nothing can appear behind the cursor, and a row is sequenced
at most once (it is behind the cursor afterwards; the ``event_id UNIQUE`` and the ``position`` primary key
refuse a second time even if two sequencers ever ran at once). Positions are dense because each batch
continues from the head in a single statement and the density trigger refuses a hole.

What it costs: an event becomes visible to consumers only once every transaction older than its own has
ended, so a long write transaction anywhere in the cluster *delays* the stream (never loses an event). The
session settings ``idle_in_transaction_session_timeout`` and ``statement_timeout`` bound that delay for the
service's own connections; ``/healthz`` shows it (see ``docs/operations.md``). The counter survives
``pg_upgrade`` but not a logical dump and restore (research §2.2 C).

The cursor is the pair, never ``id`` alone: a transaction can take its id early and draw its ``id`` late,
so ``id`` order is not ``(tx, id)`` order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

import asyncpg

from ledger.config import Settings
from ledger.database import CONNECTION_LOST, server_settings
from ledger.hashing import GENESIS_HASH, chain_hash

_log = logging.getLogger("jobledger.sequencer")

# Session-level advisory lock key held by the leader on its dedicated connection for as long as it leads.
LOCK_KEY: Final = 0x6A6C7371  # "jlsq"
# The channel the leader notifies after every committed batch; the payload is the new head position.
CHANNEL: Final = "jobledger_events"
BATCH: Final = 1000
# Rows fetched while the head row is known to wait behind the horizon (a long transaction is open).
PEEK: Final = 32

SCAN: Final = (
    "SELECT id, tx, hash, tx < pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS settled "
    "FROM events WHERE (tx, id) > ($1, $2) ORDER BY tx, id LIMIT $3"
)
# One statement, so one transaction: the positions and the notification commit together or not at all.
# unnest() yields the batch in array order, so the density trigger sees position p-1 before p.
# sequenced_at never goes backwards, even across a takeover by a process with a slower clock.
INSERT_POSITIONS: Final = """
WITH inserted AS (
    INSERT INTO event_positions (position, event_id, chain_hash, sequenced_at)
    SELECT b.position, b.event_id, b.chain_hash,
           GREATEST(clock_timestamp(), (SELECT sequenced_at FROM event_positions WHERE position = $4))
    FROM unnest($1::bigint[], $2::bigint[], $3::text[]) AS b (position, event_id, chain_hash)
    RETURNING position
)
SELECT pg_notify($5, max(position)::text) FROM inserted
"""
LOAD_CURSOR: Final = (
    "SELECT p.position, p.chain_hash, e.tx, e.id FROM event_positions p JOIN events e ON e.id = p.event_id "
    "ORDER BY p.position DESC LIMIT 1"
)


class SequencerBusy(RuntimeError):
    """Another session holds the sequencer lock; only it may assign positions."""


@dataclass(frozen=True, slots=True)
class Cursor:
    """The last sequenced event: its position and chain hash, and its ``(tx, id)`` sort key."""

    position: int
    chain_hash: str
    tx: int
    id: int


START: Final = Cursor(position=0, chain_hash=GENESIS_HASH, tx=-1, id=-1)


@dataclass(frozen=True, slots=True)
class PassResult:
    """What one pass did: how many events it sequenced, whether unsettled ones wait behind the horizon."""

    cursor: Cursor
    sequenced: int
    blocked: bool


async def load_cursor(conn: asyncpg.Connection) -> Cursor:
    """The cursor as the database has it: the event at the highest position (``START`` if none)."""
    row = await conn.fetchrow(LOAD_CURSOR)
    if row is None:
        return START
    return Cursor(position=row["position"], chain_hash=row["chain_hash"], tx=row["tx"], id=row["id"])


async def sequence_batch(conn: asyncpg.Connection, cursor: Cursor, limit: int = BATCH) -> PassResult:
    """Sequence the settled events after ``cursor`` (at most ``limit``); the caller must hold the lock."""
    rows = await conn.fetch(SCAN, cursor.tx, cursor.id, limit)
    settled = []
    for row in rows:
        if not row["settled"]:
            break
        settled.append(row)
    if not settled:
        return PassResult(cursor=cursor, sequenced=0, blocked=bool(rows))
    positions = list(range(cursor.position + 1, cursor.position + 1 + len(settled)))
    chains = []
    chain = cursor.chain_hash
    for position, row in zip(positions, settled, strict=True):
        chain = chain_hash(chain, position, row["hash"])
        chains.append(chain)
    await conn.fetchval(INSERT_POSITIONS, positions, [r["id"] for r in settled], chains, cursor.position, CHANNEL)
    last = settled[-1]
    return PassResult(
        cursor=Cursor(position=positions[-1], chain_hash=chain, tx=last["tx"], id=last["id"]),
        sequenced=len(settled),
        blocked=len(settled) < len(rows),
    )


class CounterBehind(RuntimeError):
    """The cluster's transaction counter is below the last sequenced event's: new events would sort behind it."""


async def _check_counter(conn: asyncpg.Connection, cursor: Cursor) -> None:
    # After a logical restore the counter can start below the restored rows' tx; new events would then sort
    # behind the cursor and never be sequenced. Refuse loudly instead (docs/operations.md).
    next_tx = await conn.fetchval("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
    if next_tx <= cursor.tx:
        raise CounterBehind(
            f"the cluster's next transaction id {next_tx} is not above {cursor.tx}, that of the event at position "
            f"{cursor.position}: was the database restored logically? Not sequencing (see docs/operations.md)"
        )


async def sequence_pending(pool_or_conn: asyncpg.Pool | asyncpg.Connection, *, limit: int = BATCH) -> int:
    """One full pass: sequence every event settled right now; return how many were sequenced.

    For tests and the CLI. Takes the sequencer lock for the duration, so it raises ``SequencerBusy`` while a
    service process is the sequencer (it will sequence them; wait for the head instead).
    """
    if isinstance(pool_or_conn, asyncpg.Pool):
        async with pool_or_conn.acquire() as conn:
            try:
                return await sequence_pending(conn, limit=limit)
            except BaseException:
                # The pool does not reset sessions on release (ledger.database.reset_connection); if the unlock
                # below never ran (cancelled, say), the session lock must not stay behind on a pooled
                # connection and block the real sequencer, so end the session.
                conn.terminate()
                raise
    conn = pool_or_conn
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
        raise SequencerBusy("another session is the sequencer")
    try:
        cursor = await load_cursor(conn)
        await _check_counter(conn, cursor)
        total = 0
        while True:
            result = await sequence_batch(conn, cursor, limit)
            total += result.sequenced
            cursor = result.cursor
            if result.sequenced < limit:
                return total
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)


@dataclass(frozen=True, slots=True)
class SequencerTiming:
    """How often the sequencer looks for new events and for a dead leader (``docs/operations.md``)."""

    # Poll period while events keep arriving or wait behind the horizon.
    busy_poll: float = 0.005
    # Minimum pause between passes, however often local appends poke: coalesces bursts into one batch.
    min_gap: float = 0.002
    # Poll period when idle: it backs off from busy_poll, doubling, to this. Local appends poke it awake
    # at once; appends made through other processes are seen within this.
    idle_poll: float = 0.1
    # How often a follower tries to take the lead; a dead leader is replaced within about this long.
    takeover_poll: float = 1.0
    # Wait before reconnecting after the database connection is lost.
    reconnect: float = 1.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SequencerTiming:
        """Timing from ``JOBLEDGER_SEQUENCER_*_MS`` variables (defaults for those not set)."""
        env = os.environ if env is None else env
        default = cls()

        def seconds(name: str, default: float) -> float:
            value = env.get(f"JOBLEDGER_SEQUENCER_{name}_MS")
            return default if not value else max(int(value), 1) / 1000

        return cls(
            busy_poll=seconds("BUSY_POLL", default.busy_poll),
            min_gap=seconds("MIN_GAP", default.min_gap),
            idle_poll=seconds("IDLE_POLL", default.idle_poll),
            takeover_poll=seconds("TAKEOVER_POLL", default.takeover_poll),
            reconnect=seconds("RECONNECT", default.reconnect),
        )


# Losing the database connection: reconnect and try to lead again.
_CONNECTION_LOST: Final = CONNECTION_LOST


class Sequencer:
    """The per-process background task: become leader if nobody is, then sequence until stopped.

    It holds the advisory lock on a dedicated connection (not the pool's) and does all its work on that
    connection, so if the connection dies its lock and any half-done batch die with it. ``poke`` wakes it
    early (``EventStore.on_append`` calls it after each local append); ``on_head`` hears of every new head
    it commits (the in-process ``StreamNotifier``, which then need not wait for the NOTIFY round trip).
    """

    def __init__(
        self,
        dsn: str,
        settings: Settings,
        *,
        on_head: Callable[[int], None] | None = None,
        timing: SequencerTiming | None = None,
    ) -> None:
        self.dsn = dsn
        self.settings = settings
        self.on_head = on_head
        self.timing = timing or SequencerTiming.from_env()
        self.is_leader = False
        self.head: int | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._stopped = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def poke(self) -> None:
        """Look for new events now (an append just committed). Cheap, never blocks, safe from any task."""
        self._wake.set()

    def start(self) -> None:
        """Run in the background until ``stop``."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="jobledger-sequencer")

    async def stop(self) -> None:
        """Stop, releasing the lead (closing the connection releases the lock) so another process takes over."""
        self._stopping = True
        self._stopped.set()
        self._wake.set()
        if self._task is not None:
            task, self._task = self._task, None
            try:
                await asyncio.wait_for(task, timeout=5)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def run(self) -> None:
        """Connect, lead when possible, sequence; reconnect after failures. Returns once stopped."""
        while not self._stopping:
            conn = None
            try:
                settings = {**server_settings(self.settings), "application_name": "jobledger-sequencer"}
                conn = await asyncpg.connect(self.dsn, server_settings=settings, timeout=10)
                await self._lead(conn)
            except _CONNECTION_LOST as exc:
                if not self._stopping:
                    _log.warning("sequencer lost its database connection: %r", exc)
            except Exception:  # keep the stream alive whatever happens; the log says what did
                _log.exception("sequencer failed; restarting")
            finally:
                if self.is_leader:
                    _log.info("sequencer stepping down at position %s", self.head)
                self.is_leader = False
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), timeout=2)
            if not self._stopping:
                with contextlib.suppress(TimeoutError):  # not woken by pokes: one retry per period, not per append
                    await asyncio.wait_for(self._stopped.wait(), timeout=self.timing.reconnect)

    async def _lead(self, conn: asyncpg.Connection) -> None:
        while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
            if self._stopping:
                return
            # A follower ignores pokes: a lock attempt per local append would be a query per append for nothing.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), timeout=self.timing.takeover_poll)
        if self._stopping:
            return
        cursor = await load_cursor(conn)
        await _check_counter(conn, cursor)
        self.is_leader = True
        self._announce(cursor.position)
        _log.info("this process is now the sequencer, at position %d", cursor.position)
        interval = self.timing.busy_poll
        limit = BATCH
        while not self._stopping:
            self._wake.clear()
            try:
                result = await sequence_batch(conn, cursor, limit)
            except asyncpg.PostgresError as exc:
                if isinstance(exc, _CONNECTION_LOST):
                    raise
                # Another sequencer (which the lock should make impossible) or a restore moved the head:
                # the constraints refused the batch; start again from what the database holds.
                _log.warning("sequencer batch refused (%r); reloading the cursor", exc)
                cursor = await load_cursor(conn)
                await self._sleep(self.timing.busy_poll)
                continue
            cursor = result.cursor
            if result.sequenced:
                self._announce(cursor.position)
            if result.sequenced == limit:
                limit = BATCH
                continue  # a backlog: carry on at once
            # Held up behind the horizon: the first row tells all, so the next looks need not fetch a batch.
            limit = PEEK if result.blocked and not result.sequenced else BATCH
            if result.sequenced or result.blocked:
                interval = self.timing.busy_poll
            else:
                interval = min(interval * 2, self.timing.idle_poll)
            # A short pause even when poked: under load, appends poke far more often than a pass is worth.
            await asyncio.sleep(self.timing.min_gap)
            await self._sleep(max(interval - self.timing.min_gap, 0))

    def _announce(self, head: int) -> None:
        self.head = head
        if self.on_head is not None:
            self.on_head(head)

    async def _sleep(self, seconds: float) -> None:
        """Wait ``seconds``, or less if poked or stopped."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
