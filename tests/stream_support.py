"""Helpers for the event stream tests: consumers over HTTP (long-poll and SSE) and the exactly-once check."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg

from ledger.hashing import GENESIS_HASH, chain_hash


@dataclass
class SseEvent:
    """One parsed Server-Sent Event."""

    id: str | None
    event: str | None
    data: str

    def item(self) -> dict[str, Any]:
        """The JSON item carried in ``data``."""
        value: dict[str, Any] = json.loads(self.data)
        return value


def parse_sse(buffer: bytes) -> tuple[list[SseEvent], list[bytes], bytes]:
    """Split ``buffer`` into complete events (those ended by a blank line), comment lines, and the rest."""
    events: list[SseEvent] = []
    comments: list[bytes] = []
    while b"\n\n" in buffer:
        block, buffer = buffer.split(b"\n\n", 1)
        fields: dict[str, list[str]] = {}
        for line in block.split(b"\n"):
            if line.startswith(b":"):
                comments.append(line)
                continue
            name, _, value = line.decode().partition(":")
            fields.setdefault(name, []).append(value.removeprefix(" "))
        if "data" in fields:
            events.append(
                SseEvent(fields.get("id", [None])[-1], fields.get("event", [None])[-1], "\n".join(fields["data"]))
            )
    return events, comments, buffer


@dataclass
class SseClient:
    """An SSE consumer that remembers the last event id it fully received, and resumes from it."""

    session: aiohttp.ClientSession
    url: str
    token: str
    params: dict[str, str] = field(default_factory=dict)
    last_id: str | None = None
    items: list[dict[str, Any]] = field(default_factory=list)
    comments: list[bytes] = field(default_factory=list)
    connections: int = 0
    # With ``tolerate_refusals``, an answer other than 200 is kept here (status, headers, decoded body) and
    # ``run_once`` returns "refused", as a reconnecting client would take it; otherwise it fails the test.
    tolerate_refusals: bool = False
    refusals: list[tuple[int, Any, Any]] = field(default_factory=list)

    async def run_once(self, *, max_events: int | None = None, max_seconds: float | None = None) -> str:
        """Connect (resuming), read until ``max_events`` or ``max_seconds``, then hang up; say why it stopped."""
        headers = {"Authorization": f"Bearer {self.token}"}
        if self.last_id is not None:
            headers["Last-Event-ID"] = self.last_id
        self.connections += 1
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        got = 0
        async with self.session.get(self.url, headers=headers, params=self.params) as response:
            if response.status != 200 and self.tolerate_refusals:
                self.refusals.append((response.status, response.headers, await response.json(content_type=None)))
                return "refused"
            assert response.status == 200, await response.text()
            assert response.headers["Content-Type"].startswith("text/event-stream")
            buffer = b""
            while True:
                timeout = None if deadline is None else deadline - time.monotonic()
                if timeout is not None and timeout <= 0:
                    return "time"
                try:
                    chunk = await asyncio.wait_for(response.content.readany(), timeout)
                except TimeoutError:
                    return "time"
                if not chunk:
                    return "eof"
                events, comments, buffer = parse_sse(buffer + chunk)
                self.comments += comments
                for event in events:
                    self.items.append(event.item())
                    self.last_id = event.id
                    got += 1
                    if max_events is not None and got >= max_events:
                        # Hang up mid-stream: whatever else was in flight is simply dropped.
                        return "count"


async def long_poll_consumer(
    session: aiohttp.ClientSession,
    base_url: str,
    token: str,
    *,
    done: asyncio.Event,
    target: list[int],
    rng: random.Random,
    params: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Read ``GET events`` with random page sizes until ``done`` is set and ``target[0]`` is reached.

    Now and then it abandons a request mid-wait (a disconnect) and resumes from its last ``next_after``.
    """
    items: list[dict[str, Any]] = []
    after = 0
    headers = {"Authorization": f"Bearer {token}"}
    while not (done.is_set() and after >= target[0]):
        query = {"after": str(after), "limit": str(rng.choice([1, 7, 50, 100, 333, 1000])), "wait": "1"}
        query.update(params or {})

        async def fetch(query: dict[str, str] = query) -> dict[str, Any]:
            async with session.get(f"{base_url}/orvos/v1/events", params=query, headers=headers) as response:
                assert response.status == 200, await response.text()
                body: dict[str, Any] = await response.json()
                return body

        if rng.random() < 0.1:
            # Hang up mid-request (or drop an answer that came in time): the cursor stays where it was.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fetch(), rng.random() * 0.05)
            continue
        body = await fetch()
        assert body["kind"] == "orvos#eventList"
        assert body["next_after"] >= after
        items += body["items"]
        after = body["next_after"]
    return items


async def eventually(condition: Callable[[], bool | Awaitable[bool]], what: str, within: float = 10.0) -> None:
    """Return once ``condition()`` holds, checking every 10 ms; fail if it does not within ``within`` seconds.

    For state outside the test's control (the database, another process), where there is nothing to await.
    """
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        held = condition()
        if held if isinstance(held, bool) else await held:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{what}: not within {within} s")


async def wait_until_sequenced(pool: asyncpg.Pool, within: float = 20.0) -> int:
    """Wait until every committed event has a position; return the head."""
    query = "SELECT (SELECT count(*) FROM events) = (SELECT COALESCE(max(position), 0) FROM event_positions)"

    async def all_sequenced() -> bool:
        done: bool = await pool.fetchval(query)
        return done

    await eventually(all_sequenced, "every committed event sequenced", within)
    head: int = await pool.fetchval("SELECT COALESCE(max(position), 0) FROM event_positions")
    return head


async def assert_exactly_once(pool: asyncpg.Pool, items: list[dict[str, Any]], who: str) -> None:
    """``items`` are positions 1..N in order, each once, and exactly the committed events, as stored."""
    rows = await pool.fetch(
        "SELECT p.position, p.chain_hash, e.id, e.job_uuid, e.version, e.event_type, e.hash "
        "FROM event_positions p JOIN events e ON e.id = p.event_id ORDER BY p.position"
    )
    committed = await pool.fetch("SELECT id FROM events")
    positions = [item["position"] for item in items]
    assert positions == list(range(1, len(rows) + 1)), f"{who}: positions are not 1..{len(rows)} exactly once"
    assert sorted(item["id"] for item in items) == sorted(r["id"] for r in committed), f"{who}: not the committed set"
    chain = GENESIS_HASH
    for item, row in zip(items, rows, strict=True):
        assert item["kind"] == "orvos#event"
        assert (item["id"], item["job_uuid"], item["version"], item["event_type"], item["hash"]) == (
            row["id"], row["job_uuid"], row["version"], row["event_type"], row["hash"]
        ), f"{who}: position {row['position']} differs from the ledger"  # fmt: skip
        chain = chain_hash(chain, item["position"], item["hash"])
        assert chain == row["chain_hash"], f"{who}: the global chain breaks at position {row['position']}"
