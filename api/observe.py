"""The outermost middleware: times each request, counts it in the metrics, writes its access-log line, and
names the worker process that served it (``X-Jobledger-Worker``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from api.access_log import log_request
from api.metrics import METRICS

WORKER: Final = web.AppKey("worker", int)
WORKER_HEADER: Final = "X-Jobledger-Worker"
# nginx's convention for "the client closed the connection before the answer": never sent, only recorded.
CLIENT_GONE: Final = 499
UNMATCHED_ROUTE: Final = "unmatched"


def route_label(request: web.Request) -> str:
    """The path template the request matched (bounded, unlike paths), or ``unmatched``."""
    resource = request.match_info.route.resource
    return UNMATCHED_ROUTE if resource is None else resource.canonical


async def add_worker_header(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: every response, streamed ones too, says which worker sent it."""
    response.headers[WORKER_HEADER] = str(request.app[WORKER])


@web.middleware
async def observe_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Record every request once its handler (and the error middleware inside) has answered."""
    started = time.perf_counter()
    status = 500
    worker = request.app[WORKER]
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:  # redirects: the error middleware renders every 4xx/5xx itself
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = CLIENT_GONE
        raise
    finally:
        seconds = time.perf_counter() - started
        request.app[METRICS].observe_request(request.method, route_label(request), status, seconds)
        log_request(request, status, seconds, worker)
