"""Reading request bodies and parameters the way Orvos clients send them.

Parameters may come in the query string, in a form-encoded body (googleapiclient's long-GET-as-POST) or
beside the resource in a JSON body; structured values (``filters``, ``order``...) arrive as JSON text.
Malformed input is 400, a wrong content type 415, a well-formed but invalid value 422.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import msgspec
from aiohttp import web

from api.errors import ApiError

MAX_BODY_BYTES: Final = 1024 * 1024
_TRUE: Final = frozenset({"true", "1"})
_FALSE: Final = frozenset({"false", "0"})
_JSON_TYPES: Final = ("application/json",)
_FORM_TYPES: Final = ("application/x-www-form-urlencoded",)


async def read_json_object(request: web.Request, *, required: bool) -> dict[str, Any]:
    """The request body as a JSON object ({} when empty and not ``required``)."""
    raw = await request.read()  # aiohttp refuses bodies over client_max_size with 413
    if not raw.strip():
        if required:
            raise ApiError(400, "a JSON object body is required")
        return {}
    if request.content_type not in _JSON_TYPES:
        raise ApiError(415, f"request body must be application/json, not {request.content_type or 'untyped'}")
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"malformed JSON in request body: {exc}") from None
    except UnicodeDecodeError:  # msgspec does not wrap invalid UTF-8 in a DecodeError
        raise ApiError(400, "malformed JSON in request body: not valid UTF-8") from None
    except RecursionError:  # nesting deeper than the decoder's limit
        raise ApiError(400, "malformed JSON in request body: nested too deeply") from None
    if not isinstance(value, dict):
        raise ApiError(400, "request body must be a JSON object")
    return value


async def request_parameters(request: web.Request) -> dict[str, Any]:
    """Query parameters merged with a form-encoded body's (for POSTs tunnelling a GET)."""
    params: dict[str, Any] = dict(request.query)
    if request.method == "POST" and request.content_type in _FORM_TYPES:
        form = await request.post()
        params.update({key: value for key, value in form.items() if isinstance(value, str)})
    elif request.method == "POST" and request.body_exists and request.content_type in _JSON_TYPES:
        body = await read_json_object(request, required=False)
        params.update(body)
    return params


def parse_bool(params: Mapping[str, Any], name: str, default: bool | None = None) -> bool | None:
    """A boolean parameter: true/false/1/0 (as text or JSON)."""
    if name not in params:
        return default
    value = params[name]
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ApiError(422, f"{name} parameter must be a boolean, true or false")


def parse_int(params: Mapping[str, Any], name: str, default: int, *, minimum: int = 0) -> int:
    """A non-negative integer parameter."""
    if name not in params:
        return default
    value = params[name]
    if isinstance(value, bool):
        raise ApiError(422, f"Invalid value for {name} parameter")
    if isinstance(value, int):
        number = value
    else:
        text = str(value).strip()
        if not text.lstrip("-").isdigit() or len(text) > 18:
            raise ApiError(422, f"Invalid value for {name} parameter")
        number = int(text)
    if number < minimum:
        raise ApiError(422, f"{name} parameter must be at least {minimum}")
    return number


def parse_json_param(params: Mapping[str, Any], name: str) -> Any:
    """A structured parameter, given as JSON text (or already decoded in a JSON body); None if absent.

    A string holding NUL (``"\\u0000"``) anywhere in it is 422: PostgreSQL text cannot hold one, so such a
    value reaching a query would fail there instead of matching nothing.
    """
    if name not in params:
        return None
    value = params[name]
    if isinstance(value, str):
        try:
            value = msgspec.json.decode(value)
        except (msgspec.DecodeError, UnicodeError, RecursionError):
            raise ApiError(400, f"{name} parameter is not valid JSON") from None
    if _holds_nul(value):
        raise ApiError(422, f"{name} parameter must not contain NUL characters")
    return value


def _holds_nul(value: Any) -> bool:
    """Whether any string in ``value``, key or item, contains NUL (iteratively: the value may be deep)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False
