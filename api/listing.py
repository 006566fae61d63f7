"""List, queue and queue_size (CONTRACT §3). Placeholder until the listing work lands."""

from __future__ import annotations

from aiohttp import web

from api.errors import ApiError


async def list_jobs(request: web.Request) -> web.Response:
    """GET jobs (and POST jobs with X-HTTP-Method-Override: GET)."""
    raise ApiError(404, "Path not found")


async def queue_jobs(request: web.Request) -> web.Response:
    """GET jobs/queue."""
    raise ApiError(404, "Path not found")


async def queue_size(request: web.Request) -> web.Response:
    """GET jobs/queue_size."""
    raise ApiError(404, "Path not found")
