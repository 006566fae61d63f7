"""``/healthz``: is the service up, can it reach its database, and how far behind is the event stream?
``/metrics``: the same lag, and the process's request, append and consumer counts, for Prometheus.

Neither needs a token: they say nothing about jobs or users (routes are path templates, never paths), the
lag figures are the same everywhere, and scrapers and load-balancer probes usually carry no credentials.
Keep them off the public side of the proxy if their existence is a concern (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import os

import msgspec
from aiohttp import web

from api.context import POOL
from api.errors import DATABASE_UNAVAILABLE
from api.events import NOTIFIER, SEQUENCER
from api.metrics import CONTENT_TYPE, METRICS
from api.observe import WORKER
from ledger.stream import StreamStatus, stream_status

_PROBE_TIMEOUT = 2.0


async def healthz(request: web.Request) -> web.Response:
    """200 with ``{"status": "ok", ...}`` when the database answers; 503 with ``Retry-After`` otherwise.

    ``stream`` reports the event stream's lag: the head position, how many committed events wait for a
    position and how old the oldest is, the age of the oldest write transaction in the cluster (which holds
    them back), whether this process is the sequencer and whether its LISTEN connection is up. A lagging
    stream is reported, not failed: the service still serves, and another process cannot fix it.
    """
    report: dict[str, object] = {"status": "ok", "database": "ok", "process": _process(request)}
    try:
        status = await _stream_status(request)
    except DATABASE_UNAVAILABLE as exc:
        report = {
            "status": "unavailable",
            "database": f"unreachable: {type(exc).__name__}",
            "process": _process(request),
        }
        return web.Response(
            status=503, body=msgspec.json.encode(report), content_type="application/json", headers={"Retry-After": "2"}
        )
    stream = msgspec.structs.asdict(status)
    stream["sequencer"] = _is_leader(request)
    stream["listening"] = NOTIFIER in request.app and request.app[NOTIFIER].listening
    report["stream"] = stream
    return web.Response(body=msgspec.json.encode(report), content_type="application/json")


async def metrics_endpoint(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text format (see ``api.metrics``); the database's lag series are left out,
    and ``jobledger_database_up`` is 0, when the database does not answer."""
    metrics = request.app[METRICS]
    metrics.leader.set(1 if _is_leader(request) else 0)
    try:
        status: StreamStatus | None = await _stream_status(request)
    except DATABASE_UNAVAILABLE:
        status = None
    return web.Response(body=metrics.exposition(status), headers={"Content-Type": CONTENT_TYPE})


async def _stream_status(request: web.Request) -> StreamStatus:
    async with asyncio.timeout(_PROBE_TIMEOUT):
        await request.app[POOL].fetchval("SELECT 1")
        return await stream_status(request.app[POOL])


def _is_leader(request: web.Request) -> bool:
    return SEQUENCER in request.app and request.app[SEQUENCER].is_leader


def _process(request: web.Request) -> dict[str, int]:
    """Which process answered: its pid, and its index under ``serve --workers N`` (0 otherwise)."""
    return {"pid": os.getpid(), "worker": request.app[WORKER]}
