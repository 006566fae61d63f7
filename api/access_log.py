"""Structured access logs: one JSON line per answered request, through the ``jobledger.access`` logger.

A line carries the method, the path, the query with any ``api_token`` removed, the status, the duration in
milliseconds, the request id, the caller's user uuid once it authenticated, the peer address and the worker.
Tokens are never written: the ``Authorization`` header is not logged at all, and the query is rebuilt from
its decoded parameters without ``api_token`` (so an encoded spelling such as ``api%5Ftoken`` cannot slip by).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Final, TextIO
from urllib.parse import urlencode

import msgspec
from aiohttp import web

from api.auth import CALLER
from api.errors import REQUEST_ID

LOGGER_NAME: Final = "jobledger.access"
_log = logging.getLogger(LOGGER_NAME)
_REDACTED_PARAMS: Final = frozenset({"api_token"})


def _query(request: web.Request) -> str | None:
    raw = request.query_string
    if not raw:
        return None
    if "api_token" not in raw and "%" not in raw:
        return raw  # no parameter can decode to api_token: as sent
    return urlencode([(key, value) for key, value in request.query.items() if key not in _REDACTED_PARAMS])


_second: list[Any] = [-1, ""]  # the last whole second formatted, and its text: strftime costs ~8 µs a call


def _now() -> str:
    now = time.time()
    whole = int(now)
    if whole != _second[0]:
        _second[:] = [whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))]
    return f"{_second[1]}.{int((now - whole) * 1000):03d}Z"


def access_record(request: web.Request, status: int, seconds: float, worker: int) -> dict[str, object]:
    """The fields of the request's access-log line."""
    caller = request.get(CALLER)
    return {
        "time": _now(),
        "method": request.method,
        "path": request.path,
        "query": _query(request),
        "status": status,
        "duration_ms": round(seconds * 1000, 3),
        "request_id": request.get(REQUEST_ID),
        "user_uuid": None if caller is None else caller.user_uuid,
        "remote": request.remote,
        "worker": worker,
    }


class _LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler ``configure_access_log`` installs: each line, bare, on the stream."""


_LINE_FORMAT: Final = logging.Formatter("%(message)s")


def _sole_line_handler() -> _LineHandler | None:
    """The handler ``configure_access_log`` installed, if it is still the access log's only way out."""
    handlers = _log.handlers
    if len(handlers) != 1 or _log.propagate or _log.filters:
        return None
    handler = handlers[0]
    if type(handler) is not _LineHandler or handler.formatter is not _LINE_FORMAT or handler.filters:
        return None
    return handler if handler.level <= logging.INFO else None


def log_request(request: web.Request, status: int, seconds: float, worker: int) -> None:
    """Write the request's access-log line (nothing is built when the logger is off)."""
    if _log.isEnabledFor(logging.INFO):
        line = msgspec.json.encode(access_record(request, status, seconds, worker)).decode()
        handler = _sole_line_handler()
        if handler is None:
            # What _log.info does, less finding the caller's file and line in the stack (a third of its cost,
            # and always this function); the logger's handlers, filters and propagation apply as usual.
            _log.handle(_record(line))
            return
        # What the handler's emit does (format "%(message)s", the terminator, a flush), without building the
        # record and taking the handler's lock first: half of the line's cost. A failing stream is reported
        # the way emit reports it.
        try:
            handler.stream.write(line + handler.terminator)
            handler.stream.flush()
        except Exception:
            handler.handleError(_record(line))


def _record(line: str) -> logging.LogRecord:
    return _log.makeRecord(LOGGER_NAME, logging.INFO, __file__, 0, line, None, None)


def configure_access_log(enabled: bool, stream: TextIO | None = None) -> None:
    """For ``jobledger serve``: access lines go to ``stream`` (standard error) as bare JSON, one per line,
    not through the root logger's text format; ``enabled=False`` silences them."""
    handler = _LineHandler(stream or sys.stderr)
    handler.setFormatter(_LINE_FORMAT)
    _log.handlers[:] = [handler]
    _log.propagate = False
    _log.setLevel(logging.INFO if enabled else logging.WARNING)
