"""``/healthz``: is the service up, and can it reach its database?"""

from __future__ import annotations

import asyncio

import msgspec
from aiohttp import web

from api.context import POOL
from api.errors import DATABASE_UNAVAILABLE

_PROBE_TIMEOUT = 2.0


async def healthz(request: web.Request) -> web.Response:
    """200 with ``{"status": "ok", ...}`` when the database answers; 503 with ``Retry-After`` otherwise."""
    report: dict[str, object] = {"status": "ok", "database": "ok"}
    try:
        async with asyncio.timeout(_PROBE_TIMEOUT):
            await request.app[POOL].fetchval("SELECT 1")
    except DATABASE_UNAVAILABLE as exc:
        report = {"status": "unavailable", "database": f"unreachable: {type(exc).__name__}"}
        return web.Response(
            status=503, body=msgspec.json.encode(report), content_type="application/json", headers={"Retry-After": "2"}
        )
    return web.Response(body=msgspec.json.encode(report), content_type="application/json")
