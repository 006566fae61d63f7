"""The sequencer: gives every committed event its global position, 1, 2, 3, ... in the order consumers see it.

Appends take no lock and never notify (``ledger/store.py``); each event row is stamped with the 64-bit id of
its transaction (``events.tx``, ``pg_current_xact_id()``). Exactly one process at a time, the holder of the
sequencer lease (below), runs this loop (research §2.2 C, §2.4):

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

Leadership: a lease with a fencing token
----------------------------------------
The leader is whoever holds the one row of ``sequencer_lease``: ``holder``, ``epoch`` (the fencing token)
and ``expires_at``, all judged by the database's clock (``clock_timestamp()``), never by comparing clocks of
machines. A follower takes over with one ``UPDATE ... SET epoch = epoch + 1 ... WHERE expires_at <
clock_timestamp()`` (or at once when the holder's backend no longer exists: it died); only one can win,
since the row lock serialises them and each re-checks the condition on the row it locked. It then loads the
cursor from the database, *after* its takeover committed. Each batch renews the lease in the same statement
that writes the positions, and writes nothing unless the renewal matched ``epoch = mine AND expires_at >
clock_timestamp()``; an idle leader renews every third of the lease. Whatever Python believes, PostgreSQL
decides: every ``event_positions`` row carries the epoch it was written under, and the statement trigger
``event_positions_fenced`` refuses a batch whose epoch is not the lease's current one, or whose lease has
expired. It reads the lease row ``FOR SHARE``, so a takeover waits for a batch already past the check, and
that batch commits before the new leader reads the head; a batch after the takeover carries a stale epoch
and is refused. So a leader that was frozen (SIGSTOP), partitioned or stuck past ``sequencer_lease_ms``
cannot sequence another event once it wakes: its next batch fails, it stands down and becomes a follower.
The batch is one statement, so a frozen client never leaves a transaction holding the lease row; the
sequencer's session also gets ``idle_in_transaction_session_timeout`` no longer than the lease. A stream
stall after a leader freezes is bounded by the lease plus a follower's poll (it sleeps until the expiry it
read, at most ``takeover_poll``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

import asyncpg

from ledger.config import Settings
from ledger.database import CONNECTION_LOST, server_settings
from ledger.hashing import GENESIS_HASH, chain_hash

_log = logging.getLogger("jobledger.sequencer")

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
WITH renewed AS (
    UPDATE sequencer_lease
    SET renewed_at = clock_timestamp(), expires_at = clock_timestamp() + $7 * interval '1 millisecond'
    WHERE singleton AND epoch = $6 AND holder = $8 AND expires_at > clock_timestamp()
    RETURNING epoch
), inserted AS (
    INSERT INTO event_positions (position, event_id, chain_hash, sequenced_at, epoch)
    SELECT b.position, b.event_id, b.chain_hash,
           GREATEST(clock_timestamp(), (SELECT sequenced_at FROM event_positions WHERE position = $4)), $6
    FROM unnest($1::bigint[], $2::bigint[], $3::text[]) AS b (position, event_id, chain_hash)
    WHERE EXISTS (SELECT 1 FROM renewed)
    RETURNING position
)
SELECT (SELECT count(*) FROM renewed) AS renewed,
       (SELECT pg_notify($5, max(position)::text) FROM inserted HAVING count(*) > 0) AS notified
"""
# Renewal while there is nothing to sequence; no row: the lease is lost.
RENEW: Final = (
    "UPDATE sequencer_lease SET renewed_at = clock_timestamp(), "
    "expires_at = clock_timestamp() + $3 * interval '1 millisecond' "
    "WHERE singleton AND epoch = $1 AND holder = $2 AND expires_at > clock_timestamp() RETURNING epoch"
)
# Take the lead if the lease expired or its holder's session is gone. Returns the new epoch (NULL if not
# taken) and how long the current lease still runs (seconds; from the statement's snapshot: the old row).
TAKEOVER: Final = """
WITH taken AS (
    UPDATE sequencer_lease
    SET holder = $1, holder_pid = pg_backend_pid(), epoch = epoch + 1, acquired_at = clock_timestamp(),
        renewed_at = clock_timestamp(), expires_at = clock_timestamp() + $2 * interval '1 millisecond'
    WHERE singleton AND (expires_at <= clock_timestamp() OR holder IS NULL
        OR NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = sequencer_lease.holder_pid))
    RETURNING epoch
)
SELECT (SELECT epoch FROM taken) AS epoch,
       -- Each side apart: PostgreSQL 15 cannot subtract from the initial '-infinity'.
       (SELECT extract(epoch FROM expires_at)::float8 - extract(epoch FROM clock_timestamp())::float8
          FROM sequencer_lease) AS remaining
"""
# Stand down: let a follower take over at once instead of waiting for the expiry.
RELEASE: Final = (
    "UPDATE sequencer_lease SET expires_at = clock_timestamp(), holder = NULL, holder_pid = NULL "
    "WHERE singleton AND epoch = $1 AND holder = $2"
)
LOAD_CURSOR: Final = (
    "SELECT p.position, p.chain_hash, e.tx, e.id FROM event_positions p JOIN events e ON e.id = p.event_id "
    "ORDER BY p.position DESC LIMIT 1"
)


class SequencerBusy(RuntimeError):
    """Another session holds the sequencer lease; only it may assign positions."""


class LeaseLost(RuntimeError):
    """This process's sequencer lease expired or was taken over: it must stand down (fenced by PostgreSQL)."""


@dataclass(frozen=True, slots=True)
class Lease:
    """A held sequencer lease: who holds it, its fencing epoch, and its length."""

    holder: str
    epoch: int
    lease_ms: int


def new_holder_id() -> str:
    """A holder id unique to this sequencer instance: host, pid and a random tail."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


async def take_lease(conn: asyncpg.Connection, holder: str, lease_ms: int) -> tuple[Lease | None, float]:
    """Try to take the lease; the lease (None if another holds it) and the seconds the current one still runs."""
    row = await conn.fetchrow(TAKEOVER, holder, lease_ms)
    assert row is not None
    remaining = float(row["remaining"] or 0.0)
    if row["epoch"] is None:
        return None, remaining
    return Lease(holder=holder, epoch=row["epoch"], lease_ms=lease_ms), remaining


async def renew_lease(conn: asyncpg.Connection, lease: Lease) -> None:
    """Extend the lease; ``LeaseLost`` if it expired or another process took it."""
    if await conn.fetchval(RENEW, lease.epoch, lease.holder, lease.lease_ms) is None:
        raise LeaseLost(f"sequencer lease of epoch {lease.epoch} lost")


async def release_lease(conn: asyncpg.Connection, lease: Lease) -> None:
    """Give the lease up (if still ours) so a follower need not wait for it to expire."""
    await conn.execute(RELEASE, lease.epoch, lease.holder)


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


async def sequence_batch(conn: asyncpg.Connection, cursor: Cursor, lease: Lease, limit: int = BATCH) -> PassResult:
    """Sequence the settled events after ``cursor`` (at most ``limit``) under ``lease``, renewing it.

    ``LeaseLost`` if the lease is no longer ours: nothing was written (and the trigger would refuse it).
    """
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
    result = await conn.fetchrow(
        INSERT_POSITIONS, positions, [r["id"] for r in settled], chains, cursor.position, CHANNEL,
        lease.epoch, lease.lease_ms, lease.holder,
    )  # fmt: skip
    assert result is not None
    if not result["renewed"]:
        raise LeaseLost(f"sequencer lease of epoch {lease.epoch} lost; batch at {cursor.position + 1} not written")
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

    For tests and the CLI. Takes the sequencer lease for the duration (releasing it after), so it raises
    ``SequencerBusy`` while a service process is the sequencer (it will sequence them; wait for the head).
    """
    if isinstance(pool_or_conn, asyncpg.Pool):
        async with pool_or_conn.acquire() as conn:
            try:
                return await sequence_pending(conn, limit=limit)
            except BaseException:
                # If the release below never ran (cancelled, say), end the session: the lease's holder backend
                # is then gone, so a service sequencer takes over at once instead of waiting for the expiry.
                conn.terminate()
                raise
    conn = pool_or_conn
    lease, _ = await take_lease(conn, new_holder_id(), Settings().sequencer_lease_ms)
    if lease is None:
        raise SequencerBusy("another session is the sequencer")
    try:
        cursor = await load_cursor(conn)
        await _check_counter(conn, cursor)
        total = 0
        while True:
            result = await sequence_batch(conn, cursor, lease, limit)
            total += result.sequenced
            cursor = result.cursor
            if result.sequenced < limit:
                return total
    finally:
        await release_lease(conn, lease)


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

    It takes and renews the sequencer lease on a dedicated connection (not the pool's) and does all its work
    on that connection; if the connection dies, any half-done batch dies with it and the lease's holder
    backend is gone, so a follower takes over at once. A lost lease (``LeaseLost``) makes it a follower.
    ``poke`` wakes it early (``EventStore.on_append`` calls it after each local append); ``on_head`` hears of
    every new head
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
        self._leading = False
        self._deadline = 0.0
        self.holder = new_holder_id()
        # The lease epoch this process last led under, batches it wrote, and how often it lost the lease.
        self.epoch: int | None = None
        self.batches = 0
        self.stand_downs = 0
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
        """Stop, releasing the lease so another process takes over at once."""
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
                lease_ms = self.settings.sequencer_lease_ms
                settings = {
                    **server_settings(self.settings),
                    "application_name": "jobledger-sequencer",
                    # Batches are single statements, but should this session ever be frozen inside a
                    # transaction, PostgreSQL ends it within a lease, so it cannot hold the lease row past it.
                    "idle_in_transaction_session_timeout": str(
                        min(self.settings.idle_in_transaction_timeout_ms, lease_ms)
                    ),
                    # A takeover attempt blocked on the lease row gives up and retries rather than hang.
                    "lock_timeout": str(min(self.settings.lock_timeout_ms, max(lease_ms // 3, 50))),
                }
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

    @property
    def is_leader(self) -> bool:
        """Whether this process holds the lease, as far as it knows: never past the lease's local deadline
        (from the monotonic clock at the last renewal sent, so earlier than the database's expiry)."""
        return self._leading and time.monotonic() < self._deadline

    @is_leader.setter
    def is_leader(self, value: bool) -> None:
        self._leading = value

    async def _lead(self, conn: asyncpg.Connection) -> None:
        lease_ms = self.settings.sequencer_lease_ms
        lease_s = lease_ms / 1000
        while not self._stopping:
            asked = time.monotonic()  # the local deadline counts from before the database set the expiry
            try:
                lease, remaining = await take_lease(conn, self.holder, lease_ms)
            except asyncpg.LockNotAvailableError:
                lease, remaining = None, 0.0  # a batch (or a frozen transaction) holds the row: try again soon
            if lease is not None:
                try:
                    await self._sequence(conn, lease, asked)
                except LeaseLost as exc:
                    self.stand_downs += 1
                    _log.warning("sequencer standing down at position %s: %s", self.head, exc)
                finally:
                    self.is_leader = False
                continue
            # A follower ignores pokes: a takeover attempt per local append would be a query per append for
            # nothing. It sleeps until the lease it saw would expire, but at most takeover_poll.
            wait = min(self.timing.takeover_poll, max(remaining, 0.0) + 0.02, lease_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), timeout=wait)

    async def _sequence(self, conn: asyncpg.Connection, lease: Lease, asked: float) -> None:
        """Lead under ``lease`` until stopped (releasing it) or until it is lost (``LeaseLost``)."""
        renew_every = lease.lease_ms / 1000 / 3
        self._deadline = asked + lease.lease_ms / 1000
        try:
            cursor = await load_cursor(conn)
            await _check_counter(conn, cursor)
        except BaseException:
            with contextlib.suppress(Exception):
                await release_lease(conn, lease)
            raise
        self.is_leader = True
        self.epoch = lease.epoch
        self._announce(cursor.position)
        _log.info("this process is now the sequencer, at position %d (lease epoch %d)", cursor.position, lease.epoch)
        interval = self.timing.busy_poll
        limit = BATCH
        while not self._stopping:
            self._wake.clear()
            sent = time.monotonic()
            try:
                result = await sequence_batch(conn, cursor, lease, limit)
            except asyncpg.PostgresError as exc:
                if isinstance(exc, _CONNECTION_LOST):
                    raise
                if getattr(exc, "constraint_name", None) == "event_positions_fenced":
                    raise LeaseLost(str(exc)) from exc
                # A restore moved the head, or a statement timed out: the constraints refused the batch;
                # start again from what the database holds.
                _log.warning("sequencer batch refused (%r); reloading the cursor", exc)
                cursor = await load_cursor(conn)
                await self._sleep(self.timing.busy_poll)
                continue
            if result.sequenced:
                self._deadline = sent + lease.lease_ms / 1000
                self.batches += 1
            elif time.monotonic() + renew_every >= self._deadline:
                # Nothing written, so nothing renewed: keep the lease alive while idle or held up.
                sent = time.monotonic()
                await renew_lease(conn, lease)
                self._deadline = sent + lease.lease_ms / 1000
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
        with contextlib.suppress(Exception):
            await asyncio.wait_for(release_lease(conn, lease), timeout=2)

    def _announce(self, head: int) -> None:
        self.head = head
        if self.on_head is not None:
            self.on_head(head)

    async def _sleep(self, seconds: float) -> None:
        """Wait ``seconds``, or less if poked or stopped."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
