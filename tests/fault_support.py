"""Fault tests' shared parts: a write load over HTTP that records every acknowledged write, the checks that none
was lost and nothing is half-written, and stream consumers that ride out a service or database outage.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec

from api.events import HEARTBEAT_SECONDS
from ledger.asof import job_at_version
from ledger.rebuild import check_read_model
from tests.contract import COMMIT, ERROR_TOKEN, attributes
from tests.harness import ApiClient
from tests.process_support import jobledger
from tests.stream_support import SseClient

# The lifecycle requests the load sends to existing jobs: (path suffix, body). Many are refused (422: the job
# is not in a state that allows it), which is fine; only what the service acknowledged is checked.
_TRANSITIONS: tuple[tuple[str, dict[str, Any] | None], ...] = (
    ("lock", None),
    ("start", {"script_version": COMMIT}),
    ("finish", {"success": True, "output": "out", "log": "l"}),
    ("cancel", None),
)


@dataclass
class Outcome:
    """One request of the load: when it ran, and its status (None: no answer, ``error`` says why)."""

    started: float
    ended: float
    status: int | None
    error: str | None = None


@dataclass
class WriteLoad:
    """Parallel clients creating jobs (each with a fresh ``submit_id``) and moving existing ones through their
    lifecycle; every 2xx answer's job is kept, to be checked against the ledger later."""

    user: ApiClient
    dispatcher: ApiClient
    timeout: float
    rng: random.Random = field(default_factory=lambda: random.Random(11))
    # Every job body a write was acknowledged with, in the order the answers came.
    acknowledged: list[dict[str, Any]] = field(default_factory=list)
    created: dict[str, dict[str, Any]] = field(default_factory=dict)  # job uuid -> the 201 body
    # Creates that got no answer at all (the service died under them): submit_id -> the job attributes sent.
    unanswered: dict[str, dict[str, Any]] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)
    # Answers that are not what a client may ever get: 500s, 503s without Retry-After or an Orvos body...
    bad: list[str] = field(default_factory=list)

    async def run(self, clients: int, stop: asyncio.Event) -> None:
        """``clients`` concurrent clients, until ``stop`` is set."""
        async with asyncio.TaskGroup() as group:
            for index in range(clients):
                group.create_task(self._client(index, stop))

    async def _client(self, index: int, stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            if not self.created or self.rng.random() < 0.35:
                submit_id = f"s{index}-{n}"
                job = attributes(script_parameters={"input": submit_id}, submit_id=submit_id)
                body = await self.send(self.user, "jobs", {"job": job}, submit_id=submit_id)
                if body is not None:
                    self.created.setdefault(body["uuid"], body)
            else:
                uuid = self.rng.choice(list(self.created))
                action, payload = self.rng.choice(_TRANSITIONS)
                await self.send(self.dispatcher, f"jobs/{uuid}/{action}", payload)

    async def send(
        self, client: ApiClient, path: str, body: dict[str, Any] | None, *, submit_id: str | None = None
    ) -> dict[str, Any] | None:
        """POST and record the outcome; the job body of a 2xx answer (kept as acknowledged), else None."""
        started = time.monotonic()
        params = {"allow_duplicate": "true"} if submit_id is not None else None
        try:
            async with asyncio.timeout(self.timeout):
                response = await client.post(path, json=body, params=params)
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.outcomes.append(Outcome(started, time.monotonic(), None, type(exc).__name__))
            if submit_id is not None and body is not None:
                self.unanswered[submit_id] = body["job"]
            return None
        self.outcomes.append(Outcome(started, time.monotonic(), response.status))
        problem = answer_problem(response.status, response.headers, response.body)
        if problem is not None:
            self.bad.append(f"POST {path}: {problem}")
        if 200 <= response.status < 300:
            self.acknowledged.append(response.body)
            return dict(response.body)
        return None

    def during(self, start: float, end: float) -> list[Outcome]:
        """The requests that were under way at some moment of ``[start, end]``."""
        return [o for o in self.outcomes if o.started <= end and o.ended >= start]


def answer_problem(status: int, headers: Any, body: Any) -> str | None:
    """Why an answer is one no client may ever get (None: it is fine).

    Fine: any 2xx or 4xx; a 503 with ``Retry-After`` (whole seconds, at least 1) and an Orvos error body.
    """
    if status < 300 or 400 <= status < 500:
        return None
    if status != 503:
        return f"status {status}: {body!r}"
    retry_after = headers.get("Retry-After", "")
    if not (retry_after.isdigit() and int(retry_after) >= 1):
        return f"503 without a usable Retry-After ({retry_after!r})"
    is_orvos_error = (
        isinstance(body, dict)
        and set(body) == {"errors", "error_token"}
        and bool(body["errors"])
        and all(isinstance(message, str) and message for message in body["errors"])
        and ERROR_TOKEN.fullmatch(str(body["error_token"])) is not None
    )
    return None if is_orvos_error else f"503 without an Orvos error body: {body!r}"


async def lost_acknowledged_writes(pool: asyncpg.Pool, acknowledged: list[dict[str, Any]]) -> list[str]:
    """Every acknowledged write whose answer the ledger does not bear out; empty when none was lost.

    An answer is the job at some version; the job folded from its stored events up to that version must be
    exactly that answer, attribute for attribute (etag included). A create is version 1 of its job.
    """
    lost: list[str] = []
    semaphore = asyncio.Semaphore(8)

    async def check(answer: dict[str, Any]) -> None:
        async with semaphore:
            job = await job_at_version(pool, answer["uuid"], answer["version"])
        stored = None if job is None else msgspec.to_builtins(job)
        if stored is None or job is None or job.version != answer["version"]:
            lost.append(f"{answer['uuid']} v{answer['version']}: not in the ledger")
        elif stored != answer:
            differing = sorted(k for k in answer if stored.get(k) != answer[k])
            lost.append(f"{answer['uuid']} v{answer['version']}: differs in {differing}")

    await asyncio.gather(*(check(answer) for answer in acknowledged))
    return lost


async def assert_ledger_whole(pool: asyncpg.Pool, dsn: str, data: Path) -> int:
    """Nothing is half-written: every job row has its events and every event its job row, the read model is
    a replay of the events, every event has a position, 1..N densely; and ``jobledger rebuild --check`` and
    ``jobledger verify`` (run as commands) agree. Returns N."""
    assert await pool.fetchval(
        "SELECT count(*) FROM jobs j WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.job_uuid = j.uuid)"
    ) == 0, "a job row without events"  # fmt: skip
    assert await pool.fetchval(
        "SELECT count(*) FROM events e WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.uuid = e.job_uuid)"
    ) == 0, "an event without its job row"  # fmt: skip
    assert await check_read_model(pool) is None
    events, positions, head = await pool.fetchrow(
        "SELECT (SELECT count(*) FROM events), count(*), COALESCE(max(position), 0) FROM event_positions"
    )
    assert events == positions == head, f"{events} events, {positions} positions, head {head}: not dense 1..N"
    for command in (("rebuild", "--check"), ("verify",)):
        status, out, err = await jobledger(*command, data=data, dsn=dsn)
        assert status == 0, f"jobledger {' '.join(command)} failed: {out}{err}"
    head_position: int = head
    return head_position


@dataclass
class StreamFaults:
    """What a resilient consumer met on its way: answers other than 200, and connections that broke."""

    statuses: Counter[int] = field(default_factory=Counter)
    broken: Counter[str] = field(default_factory=Counter)
    bad: list[str] = field(default_factory=list)


async def resilient_sse(
    sse: SseClient, *, done: asyncio.Event, target: list[int], faults: StreamFaults, pause: float = 0.2
) -> None:
    """Read the SSE stream until ``done`` and ``target[0]`` is reached, reconnecting (``Last-Event-ID``) after
    every refusal, end of stream or broken connection, as a browser's ``EventSource`` does.

    A stream that stays silent (no event, no keep-alive) for longer than the service's heartbeat promises is
    hung: that is recorded in ``faults.bad``, and the consumer reconnects.
    """
    sse.tolerate_refusals = True
    silence_limit = HEARTBEAT_SECONDS + 2.0

    def caught_up() -> bool:
        return done.is_set() and sse.last_id == str(target[0])

    while not caught_up():
        reading = asyncio.create_task(sse.run_once())
        seen, quiet_since = -1, time.monotonic()
        try:
            while not reading.done():
                await asyncio.wait({reading}, timeout=0.1)
                if seen != len(sse.items) + len(sse.comments):
                    seen, quiet_since = len(sse.items) + len(sse.comments), time.monotonic()
                elif time.monotonic() - quiet_since > silence_limit:
                    faults.bad.append(f"SSE: silent for {silence_limit:g} s on an open stream (from {sse.last_id})")
                    reading.cancel()
                if caught_up():
                    reading.cancel()
        finally:
            reading.cancel()  # also when this consumer itself is cancelled
        try:
            if await reading != "refused":
                continue
            status, headers, body = sse.refusals[-1]
            faults.statuses[status] += 1
            problem = answer_problem(status, headers, body)
            if problem is not None:
                faults.bad.append(f"SSE: {problem}")
        except asyncio.CancelledError:
            continue  # ``reading`` was cancelled above: caught up, or hung
        except (aiohttp.ClientError, TimeoutError) as exc:
            faults.broken[type(exc).__name__] += 1
        await asyncio.sleep(pause)


async def resilient_long_poll(
    session: aiohttp.ClientSession,
    base_url: str,
    token: str,
    *,
    done: asyncio.Event,
    target: list[int],
    faults: StreamFaults,
    pause: float = 0.2,
) -> list[dict[str, Any]]:
    """Long-poll ``GET events`` from 0 until ``done`` and ``target[0]`` is reached; after a refusal or a broken
    connection, ask again from the same cursor. Returns every item received, in order."""
    items: list[dict[str, Any]] = []
    after = 0
    headers = {"Authorization": f"Bearer {token}"}
    while not (done.is_set() and after >= target[0]):
        query = {"after": str(after), "limit": "500", "wait": "1"}
        try:
            async with session.get(
                f"{base_url}/orvos/v1/events", params=query, headers=headers, timeout=aiohttp.ClientTimeout(total=4)
            ) as answer:
                body = await answer.json(content_type=None)
                if answer.status != 200:
                    faults.statuses[answer.status] += 1
                    problem = answer_problem(answer.status, answer.headers, body)
                    if problem is not None:
                        faults.bad.append(f"long-poll: {problem}")
                    await asyncio.sleep(pause)
                    continue
        except (aiohttp.ClientError, TimeoutError) as exc:
            faults.broken[type(exc).__name__] += 1
            await asyncio.sleep(pause)
            continue
        assert body["next_after"] >= after
        items += body["items"]
        after = body["next_after"]
    return items
