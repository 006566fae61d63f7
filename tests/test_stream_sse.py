"""The SSE stream's behaviour: resuming, heartbeats, wake-ups, slow consumers, the LISTEN connection, shutdown."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import aiohttp
import asyncpg
import pytest

from api import events
from ledger.access import Caller
from ledger.config import Settings
from ledger.sequencer import sequence_pending
from ledger.service import JobService
from ledger.store import EventStore
from ledger.stream import StreamNotifier
from tests.harness import ServiceHarness, start_service, stop_service
from tests.stream_support import SseClient, eventually, parse_sse, wait_until_sequenced


def _sse(service: ServiceHarness, token: str | None, **params: str) -> SseClient:
    return SseClient(service.session, f"{service.base_url}/orvos/v1/events/stream", token or "", params=params)


async def test_last_event_id_or_after_resumes(service: ServiceHarness) -> None:
    user = await service.client("user")
    for n in range(5):
        assert (await user.create_job(script_parameters={"n": n})).status == 201
    assert await wait_until_sequenced(service.pool) == 5

    resumed = _sse(service, user.token)
    resumed.last_id = "3"
    await resumed.run_once(max_events=2)
    assert [item["position"] for item in resumed.items] == [4, 5]

    from_after = _sse(service, user.token, after="2")
    await from_after.run_once(max_events=3)
    assert [item["position"] for item in from_after.items] == [3, 4, 5]

    header_wins = _sse(service, user.token, after="1")
    header_wins.last_id = "4"
    await header_wins.run_once(max_events=1)
    assert [item["position"] for item in header_wins.items] == [5]
    item = header_wins.items[0]
    assert (item["kind"], item["event_type"], item["version"]) == ("orvos#event", "submitted", 1)

    one_at_a_time = _sse(service, user.token, limit="0")  # taken as 1: a stream always moves on
    await one_at_a_time.run_once(max_events=5, max_seconds=5)
    assert [item["position"] for item in one_at_a_time.items] == [1, 2, 3, 4, 5]

    bad = await user.get("events/stream", headers={"Last-Event-ID": "soon"})
    assert bad.status == 422, bad.body


async def test_idle_streams_get_heartbeats(service: ServiceHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "HEARTBEAT_SECONDS", 0.1)
    auditor = await service.client("auditor")
    sse = _sse(service, auditor.token)
    assert await sse.run_once(max_seconds=0.8) == "time"
    assert sse.items == []
    assert sse.comments.count(b": keep-alive") >= 3


async def test_an_idle_consumer_hears_of_a_new_event_at_once(
    service: ServiceHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With re-polls and heartbeats far apart, only the wake-up can deliver the event in time.
    monkeypatch.setattr(events, "POLL_SECONDS", 30.0)
    monkeypatch.setattr(events, "HEARTBEAT_SECONDS", 30.0)
    user = await service.client("user")
    sse = _sse(service, user.token)
    waiting = asyncio.create_task(sse.run_once(max_events=3, max_seconds=10))
    latencies = []
    for n in range(3):
        await asyncio.sleep(0.2)  # let the consumer go idle; not a synchronisation
        began = time.monotonic()
        assert (await user.create_job(script_parameters={"n": n})).status == 201
        await eventually(lambda n=n: len(sse.items) > n, "the event reached the idle consumer", 5)
        latencies.append(time.monotonic() - began)
    assert await waiting == "count"
    assert max(latencies) < 1.0, latencies


async def test_a_consumer_that_stops_reading_is_cut_off_and_can_resume(
    service: ServiceHarness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(events, "SEND_TIMEOUT_SECONDS", 0.5)
    caplog.set_level(logging.INFO, logger="jobledger.api.events")
    user = await service.client("user")
    blob = "x" * 60_000
    for batch in range(10):
        created = await asyncio.gather(
            *(user.create_job(script_parameters={"n": batch * 10 + n, "blob": blob}) for n in range(10))
        )
        assert {c.status for c in created} == {201}
    head = await wait_until_sequenced(service.pool)  # about 6 MB of events

    # A client that stops reading, with a small fixed receive buffer: the kernel would otherwise autotune a
    # loopback receive buffer up to tcp_rmem's maximum (32 MB here) and swallow the whole stream unread.
    host, port = service.base_url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock, limit=16 * 1024)
    # HTTP/1.0, so the body is the plain SSE text until the server closes (no chunked framing to undo).
    writer.write(f"GET /orvos/v1/events/stream HTTP/1.0\r\nAuthorization: Bearer {user.token}\r\n\r\n".encode())
    await writer.drain()
    received = await reader.read(16 * 1024)
    try:
        # Stop reading. The server's socket fills; it must give up on us rather than buffer without bound.
        await eventually(
            lambda: any("slow event stream consumer" in r.getMessage() for r in caplog.records),
            "the server cut the consumer off",
            20,
        )
        # What was already in flight can still be read, then the connection ends, before the stream did.
        try:
            while chunk := await reader.read(65536):
                received += chunk
        except ConnectionError:
            pass
    finally:
        writer.close()
    status_line, _, rest = received.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1."), status_line
    assert b" 200 " in status_line, status_line
    received = rest.partition(b"\r\n\r\n")[2]
    got, _, _ = parse_sse(received)
    assert len(got) < head, "the consumer was meant to be cut off before it had everything"
    resumed = _sse(service, user.token)
    resumed.items = [event.item() for event in got]
    resumed.last_id = got[-1].id if got else None
    async with asyncio.timeout(20):
        while resumed.last_id != str(head):
            await resumed.run_once(max_seconds=2)
    assert [item["position"] for item in resumed.items] == list(range(1, head + 1))


async def test_the_notifier_hears_notify_and_reconnects(
    pool: asyncpg.Pool, database_dsn: str, settings: Settings
) -> None:
    notifier = StreamNotifier(database_dsn, settings, reconnect=0.05)
    service = JobService(EventStore(pool))
    owner = Caller(user_uuid="zzzzz-tpzed-00000000000000a", role="user", request_id="req-n")

    async def append_and_sequence(n: int) -> None:
        await service.create(owner, script_name="s", script_version="main", script_parameters={"n": n})

        async def sequenced() -> bool:  # the cluster-wide horizon may hold the event back a moment
            return await sequence_pending(pool) == 1

        await eventually(sequenced, "the event sequenced")

    notifier.start()
    try:
        await eventually(lambda: notifier.listening, "listening")
        generation = notifier.generation
        await append_and_sequence(0)
        assert await notifier.wait(generation, 5)  # woken by the sequencer's NOTIFY
        assert notifier.head == 1
        # The database drops the LISTEN connection (as in a restart); an event sequenced meanwhile is not lost.
        await pool.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'jobledger-listener' AND datname = current_database()"
        )
        await eventually(lambda: not notifier.listening, "the connection noticed lost")
        await append_and_sequence(1)
        await eventually(lambda: notifier.listening and notifier.head == 2, "reconnected, head read again")
        generation = notifier.generation
        await append_and_sequence(2)
        assert await notifier.wait(generation, 5)
        assert notifier.head == 3
    finally:
        await notifier.stop()
    assert (notifier.closed, notifier.listening) == (True, False)


async def test_open_streams_do_not_hold_up_shutdown(database_dsn: str, settings: Settings) -> None:
    harness = await start_service(settings, database_dsn)
    stream_session = aiohttp.ClientSession()
    try:
        auditor = await harness.client("auditor")
        sse = SseClient(stream_session, f"{harness.base_url}/orvos/v1/events/stream", auditor.token or "")
        reading = asyncio.create_task(sse.run_once(max_seconds=30))
        server = harness._runner.server
        await eventually(lambda: sse.connections > 0 and server is not None and bool(server.connections), "connected")
        began = time.monotonic()
        await stop_service(harness)
        stopped_in = time.monotonic() - began
        assert await asyncio.wait_for(reading, 5) == "eof"  # the stream ended properly, not cut off
        assert stopped_in < 3, f"shutdown waited {stopped_in:.1f} s for an open stream"
    finally:
        await stream_session.close()


async def test_healthz_shows_the_stream_held_back_by_an_open_write_transaction(
    service: ServiceHarness, database_dsn: str
) -> None:
    user = await service.client("user")
    assert (await user.create_job(script_parameters={"n": 1})).status == 201
    head = await wait_until_sequenced(service.pool)
    conn = await asyncpg.connect(database_dsn)
    try:
        transaction = conn.transaction()
        await transaction.start()
        await conn.fetchval("SELECT pg_current_xact_id()")  # a write transaction: it holds the horizon
        assert (await user.create_job(script_parameters={"n": 2})).status == 201  # committed, not yet settled
        reports = []

        async def lagging() -> bool:
            reports.append((await service.anonymous().get("/healthz")).body["stream"])
            return reports[-1]["unsequenced"] == 1

        await eventually(lagging, "healthz reporting the unsequenced event")
        stream = reports[-1]
        assert (stream["head"], stream["sequencer"], stream["listening"]) == (head, True, True)
        assert stream["oldest_unsequenced_age_seconds"] >= 0
        assert stream["oldest_write_transaction_age_seconds"] > 0
        await transaction.rollback()
    finally:
        await conn.close()
    assert await wait_until_sequenced(service.pool) == head + 1  # delayed, not lost
    stream = (await service.anonymous().get("/healthz")).body["stream"]
    assert (stream["head"], stream["unsequenced"], stream["oldest_unsequenced_age_seconds"]) == (head + 1, 0, None)
