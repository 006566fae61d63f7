"""Orvos error responses (CONTRACT §7) and the middleware that turns every failure into one.

No request ever gets a 500: domain errors map to their 4xx, an unavailable database to 503 with
``Retry-After``, and anything unforeseen to 422 (as Orvos did), logged with its ``error_token``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import asyncpg
import msgspec
from aiohttp import web

from api.metrics import METRICS
from ledger.database import CONNECTION_LOST
from ledger.errors import DomainError, Forbidden, Invalid, NotFound, PreconditionFailed
from ledger.service import Contention, random_base36

_log = logging.getLogger("jobledger.api")
# A typed request key where aiohttp has them (3.12+), the plain string before.
REQUEST_ID: Final[Any] = web.RequestKey("request_id", str) if hasattr(web, "RequestKey") else "request_id"
RETRY_AFTER_SECONDS: Final = "2"

_DOMAIN_STATUS: Final[dict[type[DomainError], int]] = {
    NotFound: 404,
    Forbidden: 403,
    PreconditionFailed: 412,
    Invalid: 422,
}

# Failures that mean "the database is not there right now", not "this request is wrong".
DATABASE_UNAVAILABLE: Final = (
    *CONNECTION_LOST,
    asyncpg.QueryCanceledError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InsufficientResourcesError,
    # 55000 "database is not currently accepting connections" (ALLOW_CONNECTIONS false), and its subclass
    # 55P03 lock_not_available (lock_timeout): both are transient, neither says anything about the request.
    asyncpg.ObjectNotInPrerequisiteStateError,
    # 3D000: the database is gone (dropped or being recreated); nothing the client sent is wrong either.
    asyncpg.InvalidCatalogNameError,
)


class ApiError(Exception):
    """An HTTP-level refusal raised by handlers (bad parameters, wrong content type, missing token...)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def error_token() -> str:
    """``<unix seconds>+<8 hex>``: unique, and findable in the server log."""
    return f"{int(time.time())}+{secrets.token_hex(4)}"


def error_response(
    status: int, messages: list[str], headers: dict[str, str] | None = None, *, token: str | None = None
) -> web.Response:
    """An Orvos error body with ``status`` (and ``token``, when the caller logged it; a fresh one otherwise)."""
    # Messages may quote the client's input, and invalid UTF-8 in a header arrives as lone surrogates, which
    # no JSON encoder can write: replace them, or the error would itself fail (a 500).
    safe = [message.encode("utf-8", "replace").decode() for message in messages]
    body = msgspec.json.encode({"errors": safe, "error_token": token or error_token()})
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


_REQUEST_ID_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/")


def _request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id", "")
    # Echo the client's id if it is sane; otherwise make one the Arvados way.
    if 0 < len(given) <= 128 and _REQUEST_ID_CHARS.issuperset(given):
        return given
    return "req-" + random_base36(20)


_HTTP_MESSAGES: Final[dict[int, str]] = {
    404: "Path not found",
    405: "Method not allowed",
    413: "Request body larger than 1 MiB",
}


# The same limit as api.params.MAX_BODY_BYTES (imported there from here would be circular: params needs ApiError).
_MAX_BODY_BYTES: Final = 1024 * 1024


def _refuse_body_early(request: web.Request) -> web.Response | None:
    """A 415 for a compressed body, a 413 for one announced over 1 MiB: decided on the headers alone.

    The server runs with ``auto_decompress=False`` (``api.app``), so aiohttp never inflates a body on the
    event loop (a gzip bomb froze every client for seconds); a compressed body is refused before a byte of it
    is read (CONTRACT §7 allows refusing). The answer closes the connection: nothing is kept alive for the
    rest of a body nobody will read.
    """
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        response = error_response(415, [f"compressed request bodies are not accepted (Content-Encoding: {encoding})"])
    elif request.content_length is not None and request.content_length > _MAX_BODY_BYTES:
        response = error_response(413, [_HTTP_MESSAGES[413]])
    else:
        return None
    response.force_close()
    return response


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Assign the request id, and render every error as an Orvos error body."""
    request_id = _request_id(request)
    request[REQUEST_ID] = request_id
    try:
        refusal = _refuse_body_early(request)
        response = refusal if refusal is not None else await handler(request)
    except ApiError as exc:
        response = error_response(exc.status, [exc.message], exc.headers)
    except DomainError as exc:
        response = error_response(_DOMAIN_STATUS.get(type(exc), 422), [exc.message])
    except Contention as exc:
        response = error_response(503, [str(exc)], {"Retry-After": "1"})
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = _HTTP_MESSAGES.get(exc.status, exc.reason)
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        response = error_response(exc.status, [message], headers)
    except DATABASE_UNAVAILABLE as exc:
        _log.warning("database unavailable during %s %s: %r", request.method, request.path, exc)
        response = error_response(503, ["database unavailable; try again"], {"Retry-After": RETRY_AFTER_SECONDS})
    except asyncio.CancelledError:
        raise
    except Exception:
        token = error_token()
        # The body tells the client "the server log has the details": the token is what finds them there.
        _log.exception("unexpected error %s in %s %s (request %s)", token, request.method, request.path, request_id)
        metrics = request.app.get(METRICS)
        if metrics is not None:  # an app built without metrics (none today) still answers
            metrics.unexpected_errors.inc()
        response = error_response(422, ["unexpected error; the server log has the details"], token=token)
    if not response.prepared:
        response.headers["X-Request-Id"] = request_id
    return response
