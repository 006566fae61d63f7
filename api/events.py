"""The global event stream over HTTP (CONTRACT §6): ``GET events`` (long-poll) and ``GET events/stream`` (SSE).

Both read pages from the database by position (``ledger.stream.read_events``) and, when caught up, wait on
the process's ``StreamNotifier`` with a timeout, then read again. No consumer has a queue: what one holds in
memory is at most the page being sent plus the transport's write buffer, and an SSE consumer that stops
reading is disconnected (it resumes with ``Last-Event-ID``). When a new head wakes many consumers at once,
those asking for the same page (same cursor, page size and view) share one query and one encoding of it.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
from aiohttp import web

from api.auth import authenticate
from api.context import POOL
from api.errors import DATABASE_UNAVAILABLE, ApiError
from api.methods import Method, Param
from api.metrics import stream_consumer
from api.params import parse_int, parse_json_param, request_parameters
from ledger.access import Caller, reads_everything
from ledger.sequencer import Sequencer
from ledger.store import StoredEvent
from ledger.stream import EventPage, StreamNotifier, read_events

_log = logging.getLogger("jobledger.api.events")

NOTIFIER: Final = web.AppKey("stream_notifier", StreamNotifier)
SEQUENCER: Final = web.AppKey("sequencer", Sequencer)

DEFAULT_LIMIT: Final = 100
# Catch-up reads pages this big: fewer, larger round trips (a page of 10,000 events is ~7 MB).
MAX_LIMIT: Final = 10_000
MAX_WAIT: Final = 60.0
# Module settings rather than constants so that an operator (or a test) can tune them.
# Every wait re-reads the database after at most this long, whatever the notifier says.
POLL_SECONDS = 1.0
# An idle SSE stream gets a ": keep-alive" comment this often, so proxies and clients keep it open.
HEARTBEAT_SECONDS = 5.0
# Events per database read of an SSE stream.
SSE_PAGE = 200
# A consumer whose socket accepts nothing for this long, or that has this much unsent, is cut off.
SEND_TIMEOUT_SECONDS = 10.0
MAX_UNSENT_BYTES = 1024 * 1024
# A long-poll with a selective filter scans ahead for at most this long before answering (empty, advanced).
SCAN_BUDGET_SECONDS = 1.0
# A page read ahead for a consumer catching up is dropped if not asked for within this long.
READ_AHEAD_SECONDS = 5.0
_RETRY_MS: Final = 2000

_ATTRIBUTES: Final = frozenset({"job_uuid", "event_type"})
_OPERATORS: Final = frozenset({"=", "!=", "in", "not in"})


@dataclass
class StreamFilter:
    """The conditions of ``filters``, ANDed: only these values (None: any), none of those."""

    only: dict[str, set[str] | None] = field(default_factory=lambda: {"job_uuid": None, "event_type": None})
    excluded: dict[str, set[str]] = field(default_factory=lambda: {"job_uuid": set(), "event_type": set()})

    def key(self) -> tuple[Any, ...]:
        """A hashable form, for sharing reads between consumers with the same filters."""
        return tuple(
            (
                name,
                None if self.only[name] is None else frozenset(self.only[name] or ()),
                frozenset(self.excluded[name]),
            )
            for name in sorted(_ATTRIBUTES)
        )

    def restrict(self, attribute: str, values: set[str]) -> None:
        current = self.only[attribute]
        self.only[attribute] = values if current is None else current & values


def parse_filters(value: Any) -> StreamFilter:
    """``[[attribute, operator, operand], ...]`` on ``job_uuid`` / ``event_type``; 422 for anything else."""
    result = StreamFilter()
    if value is None:
        return result
    if not isinstance(value, list):
        raise ApiError(422, "filters must be an array of [attribute, operator, operand]")
    for condition in value:
        if not isinstance(condition, list) or len(condition) != 3:
            raise ApiError(422, f"Invalid filter {condition!r}: expected [attribute, operator, operand]")
        attribute, operator, operand = condition
        if attribute not in _ATTRIBUTES:
            raise ApiError(422, f"Invalid attribute {attribute!r} in filter: events filter on job_uuid, event_type")
        operator = operator.lower() if isinstance(operator, str) else operator
        if operator not in _OPERATORS:
            raise ApiError(422, f"Invalid operator {operator!r} in filter: use =, !=, in, not in")
        if operator in ("=", "!="):
            if not isinstance(operand, str):
                raise ApiError(422, f"Invalid operand for {attribute} {operator}: expected a string")
            values = {operand}
        else:
            if not isinstance(operand, list) or not all(isinstance(item, str) for item in operand):
                raise ApiError(422, f"Invalid operand for {attribute} {operator}: expected an array of strings")
            values = set(operand)
        if operator in ("=", "in"):
            result.restrict(attribute, values)
        else:
            result.excluded[attribute] |= values
    return result


@dataclass(frozen=True)
class StreamRequest:
    """What a consumer asked for, and what it may see."""

    after: int
    limit: int
    owner_uuid: str | None
    filters: StreamFilter

    async def read(self, request: web.Request, after: int, limit: int, generation: int) -> SharedPage:
        """One page from ``after``, shared with every consumer asking the same thing after the same wake-up."""
        key = (after, limit, self.owner_uuid, self.filters.key(), generation)
        notifier = request.app[NOTIFIER]
        pending = _READS_AHEAD.get(notifier, {}).pop(key, None)
        if pending is None:
            reads = _SHARED_READS.setdefault(notifier, {})
            pending = reads.get(key)
            if pending is None:
                pending = reads[key] = asyncio.ensure_future(self._read(request, after, limit))
                pending.add_done_callback(lambda done: _forget(reads, key, done))
        # shield: one consumer leaving must not cancel the read the others are waiting for.
        return await asyncio.shield(pending)

    def read_ahead(self, request: web.Request, after: int, limit: int) -> None:
        """Start reading the page from ``after`` now: this consumer, catching up, will ask for it next.

        The database then works while the current page travels. The page waits at most ``READ_AHEAD_SECONDS``
        for its ``read`` (and only under the head's current generation, so it is as fresh as a new read).
        """
        notifier = request.app[NOTIFIER]
        key = (after, limit, self.owner_uuid, self.filters.key(), notifier.generation)
        ahead = _READS_AHEAD.setdefault(notifier, {})
        if key in ahead:
            return
        pending = ahead[key] = asyncio.ensure_future(self._read(request, after, limit))
        pending.add_done_callback(_retrieve)

        def expire() -> None:
            if ahead.get(key) is pending:
                del ahead[key]

        asyncio.get_running_loop().call_later(READ_AHEAD_SECONDS, expire)

    async def _read(self, request: web.Request, after: int, limit: int) -> SharedPage:
        page = await read_events(
            request.app[POOL],
            after=after,
            limit=limit,
            owner_uuid=self.owner_uuid,
            job_uuids=self.filters.only["job_uuid"],
            event_types=self.filters.only["event_type"],
            exclude_job_uuids=self.filters.excluded["job_uuid"],
            exclude_event_types=self.filters.excluded["event_type"],
        )
        return SharedPage(page)


def _forget(
    reads: dict[tuple[Any, ...], asyncio.Future[SharedPage]], key: tuple[Any, ...], done: asyncio.Future[SharedPage]
) -> None:
    reads.pop(key, None)
    _retrieve(done)


def _retrieve(done: asyncio.Future[SharedPage]) -> None:
    if not done.cancelled():
        done.exception()  # retrieved here too, in case every consumer that wanted it has gone


class SharedPage:
    """A page read once for all the consumers that asked for it, encoded (lazily) once for all of them too."""

    def __init__(self, page: EventPage) -> None:
        self.page = page
        self._frames: bytes | None = None
        self._body: bytes | None = None

    def sse_frames(self) -> bytes:
        """The page's events as SSE frames."""
        if self._frames is None:
            self._frames = b"".join(sse_frame(event) for event in self.page.items)
        return self._frames

    def list_body(self) -> bytes:
        """The page as an ``orvos#eventList``."""
        if self._body is None:
            self._body = encode_page(self.page)
        return self._body


# Reads in flight, per process (keyed by its notifier): when a new head wakes many consumers at once, those
# with the same cursor and view (typically all of them, caught up at the head) share one query and one
# encoding, instead of each querying the database.
_SHARED_READS: weakref.WeakKeyDictionary[StreamNotifier, dict[tuple[Any, ...], asyncio.Future[SharedPage]]] = (
    weakref.WeakKeyDictionary()
)
# Pages read ahead for consumers catching up (``StreamRequest.read_ahead``), until claimed or expired.
_READS_AHEAD: weakref.WeakKeyDictionary[StreamNotifier, dict[tuple[Any, ...], asyncio.Future[SharedPage]]] = (
    weakref.WeakKeyDictionary()
)


def _stream_request(params: dict[str, Any], caller: Caller, after: int) -> StreamRequest:
    limit = min(parse_int(params, "limit", DEFAULT_LIMIT), MAX_LIMIT)
    return StreamRequest(
        after=after,
        limit=limit,
        # CONTRACT §2: a user reads only its own jobs' events; the other roles read everything.
        owner_uuid=None if reads_everything(caller) else caller.user_uuid,
        filters=parse_filters(parse_json_param(params, "filters")),
    )


def _parse_wait(params: dict[str, Any]) -> float:
    if "wait" not in params:
        return 0.0
    raw = params["wait"]
    try:
        wait = float(raw) if not isinstance(raw, bool) else float("nan")
    except (TypeError, ValueError):
        wait = float("nan")
    if not wait >= 0:  # also refuses NaN
        raise ApiError(422, "wait parameter must be a number of seconds, 0 to 60")
    return min(wait, MAX_WAIT)


class _EventList(msgspec.Struct, frozen=True, tag_field="kind", tag="orvos#eventList"):
    items: list[StoredEvent]
    head: int
    next_after: int


_ENCODER: Final = msgspec.json.Encoder()


def encode_event(event: StoredEvent) -> bytes:
    """An event as its API JSON object (``kind`` ``orvos#event``: the stored event's tag)."""
    return _ENCODER.encode(event)


def encode_page(page: EventPage) -> bytes:
    """An ``orvos#eventList``: the whole page in one msgspec call, no Python per event."""
    return _ENCODER.encode(_EventList(page.items, page.head, page.next_after))


def _closing(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


@stream_consumer("long_poll")
async def list_events(request: web.Request) -> web.Response:
    """GET events: the events after ``after``, waiting up to ``wait`` seconds for one if there are none yet."""
    caller = await authenticate(request)
    params = await request_parameters(request)
    wanted = _stream_request(params, caller, parse_int(params, "after", 0))
    wait = _parse_wait(params)
    notifier = request.app[NOTIFIER]
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + wait
    after = wanted.after
    while True:
        generation = notifier.generation
        shared = await wanted.read(request, after, wanted.limit, generation)
        page = shared.page
        if page.items or wanted.limit == 0:
            break
        after = page.next_after
        now = loop.time()
        if after < page.head:
            # Filtered: this read looked at a window with no match; look further while the budget lasts.
            if now - started < max(SCAN_BUDGET_SECONDS, wait):
                continue
            break
        if now >= deadline or notifier.closed or _closing(request):
            break
        await notifier.wait(generation, min(deadline - now, POLL_SECONDS))
    if wanted.limit and len(page.items) == wanted.limit and page.next_after < page.head:
        wanted.read_ahead(request, page.next_after, wanted.limit)  # a full page, more to come: catching up
    return web.Response(body=shared.list_body(), content_type="application/json")


def sse_frame(event: StoredEvent) -> bytes:
    """One SSE event: ``id:`` the position, ``event:`` the type, ``data:`` the JSON item (one line)."""
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event.position or 0, event.event_type.encode(), encode_event(event))


class ConsumerGone(Exception):
    """The SSE client went away, or was cut off for not reading."""


async def _send(request: web.Request, response: web.StreamResponse, data: bytes) -> None:
    """Write ``data``; cut the consumer off if it has too much unsent or its socket stays full too long."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConsumerGone("client disconnected")
    if transport.get_write_buffer_size() > MAX_UNSENT_BYTES:
        _cut_off(request, "its unsent data exceeds the bound")
    try:
        # aiohttp's write waits (drains) while the transport's buffer is over its high-water mark.
        await asyncio.wait_for(response.write(data), timeout=SEND_TIMEOUT_SECONDS)
    except TimeoutError:
        _cut_off(request, f"it accepted nothing for {SEND_TIMEOUT_SECONDS:g} s")
    except (ConnectionError, RuntimeError) as exc:
        raise ConsumerGone("client disconnected") from exc


def _cut_off(request: web.Request, why: str) -> None:
    # Abort rather than close: close would keep the unsent data (and the connection) until the peer reads it.
    # SSE clients dispatch an event only at its blank line, so a cut mid-event is discarded and re-sent on resume.
    _log.info("disconnecting a slow event stream consumer (%s): %s", request.remote, why)
    if request.transport is not None:
        request.transport.abort()
    raise ConsumerGone(why)


def _last_event_id(request: web.Request, params: dict[str, Any]) -> int:
    given = request.headers.get("Last-Event-ID")
    if given is None or not given.strip():
        return parse_int(params, "after", 0)
    return parse_int({"Last-Event-ID": given}, "Last-Event-ID", 0)


@stream_consumer("sse")
async def stream_events(request: web.Request) -> web.StreamResponse:
    """GET events/stream: Server-Sent Events from ``Last-Event-ID`` (or ``after``), until the client leaves."""
    caller = await authenticate(request)
    params = await request_parameters(request)
    wanted = _stream_request(params, caller, _last_event_id(request, params))
    notifier = request.app[NOTIFIER]
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    loop = asyncio.get_running_loop()
    cursor = wanted.after
    page_size = max(wanted.limit, 1) if "limit" in params else SSE_PAGE  # a stream always moves on
    # The first page is read before the response starts, so that a database away at connect time is a 503.
    generation = notifier.generation
    first: SharedPage | None = await wanted.read(request, cursor, page_size, generation)
    await response.prepare(request)
    try:
        await _send(request, response, b"retry: %d\n: stream from position %d\n\n" % (_RETRY_MS, cursor))
        last_sent = loop.time()
        while not notifier.closed:
            if first is None:
                generation = notifier.generation
                shared = await wanted.read(request, cursor, page_size, generation)
            else:
                shared, first = first, None
            page = shared.page
            if page.next_after < page.head:
                wanted.read_ahead(request, page.next_after, page_size)  # read on while this page is sent
            if page.items:
                await _send(request, response, shared.sse_frames())
                last_sent = loop.time()
            cursor = page.next_after
            if loop.time() - last_sent >= HEARTBEAT_SECONDS:
                await _send(request, response, b": keep-alive\n\n")
                last_sent = loop.time()
            if cursor < page.head:
                continue  # more to read now
            quiet_for = loop.time() - last_sent
            await notifier.wait(generation, min(POLL_SECONDS, max(HEARTBEAT_SECONDS - quiet_for, 0.0)))
    except ConsumerGone:
        return response
    except DATABASE_UNAVAILABLE as exc:
        # Too late for a 503 (the stream has begun): end it; the client resumes from its Last-Event-ID, and
        # gets the 503 then if the database is still away.
        _log.warning("event stream ended, the database is unavailable: %r", exc)
    return response


async def end_streams(app: web.Application) -> None:
    """``on_shutdown``: wake every waiting consumer so open streams end and shutdown need not wait for them."""
    if NOTIFIER in app:
        app[NOTIFIER].close_waiters()


_STREAM_PARAMS: Final = (
    Param("after", "integer", "Return events with a position greater than this.", default="0"),
    Param("filters", "array", 'Conditions [attribute, operator, operand], ANDed (JSON): attributes job_uuid and '
          'event_type; operators =, !=, in, "not in".'),
)  # fmt: skip
EVENT_METHODS: Final[tuple[Method, ...]] = (
    Method("events", "list", "GET", "events", list_events,
           "The global event stream in position order: events after `after`, the latest position (`head`) and "
           "the cursor for the next call (`next_after`, which moves past filtered-out events too). With `wait`, "
           "waits up to that many seconds for an event if there is none yet (long-poll).",
           (*_STREAM_PARAMS,
            Param("limit", "integer", "Maximum events to return (clamped to 10000).", default="100"),
            Param("wait", "number", "Seconds (0 to 60, fractions allowed) to wait for an event if none is "
                  "available yet.", default="0")),
           response="EventList"),
    Method("events", "stream", "GET", "events/stream", stream_events,
           "The global event stream as Server-Sent Events (text/event-stream, not JSON): `id:` is the position, "
           "`event:` the event type, `data:` the event (an orvos#event). Resumes after the `Last-Event-ID` "
           "header (or `after`); idle streams get `: keep-alive` comments; a consumer that stops reading is "
           "disconnected and resumes.",
           (*_STREAM_PARAMS,
            Param("limit", "integer", "Events per write (default 200, at most 10000).", default="200")),
           response="EventList", response_content_type="text/event-stream"),
)  # fmt: skip
