"""``/healthz``: is the service up, can it reach its database, and how far behind is the event stream?"""

from __future__ import annotations

import asyncio

import msgspec
from aiohttp import web

from api.context import POOL
from api.errors import DATABASE_UNAVAILABLE
from api.events import NOTIFIER, SEQUENCER
from ledger.stream import stream_status

_PROBE_TIMEOUT = 2.0


async def healthz(request: web.Request) -> web.Response:
    """200 with ``{"status": "ok", ...}`` when the database answers; 503 with ``Retry-After`` otherwise.

    ``stream`` reports the event stream's lag: the head position, how many committed events wait for a
    position and how old the oldest is, the age of the oldest write transaction in the cluster (which holds
    them back), whether this process is the sequencer and whether its LISTEN connection is up. A lagging
    stream is reported, not failed: the service still serves, and another process cannot fix it.
    """
    report: dict[str, object] = {"status": "ok", "database": "ok"}
    try:
        async with asyncio.timeout(_PROBE_TIMEOUT):
            await request.app[POOL].fetchval("SELECT 1")
            status = await stream_status(request.app[POOL])
    except DATABASE_UNAVAILABLE as exc:
        report = {"status": "unavailable", "database": f"unreachable: {type(exc).__name__}"}
        return web.Response(
            status=503, body=msgspec.json.encode(report), content_type="application/json", headers={"Retry-After": "2"}
        )
    stream = msgspec.structs.asdict(status)
    stream["sequencer"] = SEQUENCER in request.app and request.app[SEQUENCER].is_leader
    stream["listening"] = NOTIFIER in request.app and request.app[NOTIFIER].listening
    report["stream"] = stream
    return web.Response(body=msgspec.json.encode(report), content_type="application/json")
