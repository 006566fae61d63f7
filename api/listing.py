"""List, queue and queue_size over HTTP (CONTRACT §3; reference §2.2–2.4).

Parameters come from the query string or, for ``POST jobs`` with ``X-HTTP-Method-Override: GET``, from a
form-encoded body. Structured values are JSON text: JSON that does not parse is 400; a well-formed value
naming an unknown attribute, operator or operand type is 422 (including in ``where``, which Orvos silently
ignored: a typo should not quietly widen a query). Unknown parameters (``alt=json``...) are ignored.

What each filter means, and how it reaches SQL without anything from the client in the SQL text, is in
``ledger/queries.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import msgspec
from aiohttp import web
from msgspec import UNSET, UnsetType

from api.auth import authenticate
from api.context import POOL
from api.errors import ApiError
from api.params import parse_bool, parse_int, parse_json_param, request_parameters
from ledger import queries
from ledger.access import Caller, reads_everything
from ledger.queries import Condition, ListQuery, OrderKey
from projections.job import JOB_ATTRIBUTES, Job

LIST_KIND: Final = "orvos#jobList"
DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000
_DIRECTIONS: Final = {"asc": False, "desc": True}
_COUNT_MODES: Final = {"exact": True, "none": False}


class JobList(msgspec.Struct, kw_only=True):
    """The list envelope (reference §2.4); ``items_available`` is left out for ``count=none``."""

    kind: str = LIST_KIND
    etag: str = ""
    self_link: str = ""
    offset: int
    limit: int
    items: list[Any]  # Jobs, or dicts of the selected attributes
    items_available: int | UnsetType = UNSET


class QueueSize(msgspec.Struct):
    """The body of ``jobs/queue_size``."""

    queue_size: int


async def list_jobs(request: web.Request) -> web.Response:
    """GET jobs (and POST jobs with X-HTTP-Method-Override: GET): the jobs the caller may read."""
    return await _list(request, queue=False)


async def queue_jobs(request: web.Request) -> web.Response:
    """GET jobs/queue: queued, unlocked jobs the caller may read, highest priority first, then oldest."""
    return await _list(request, queue=True)


async def queue_size(request: web.Request) -> web.Response:
    """GET jobs/queue_size: ``{"queue_size": N}``, every queued unlocked job (the backlog, whoever owns it)."""
    await authenticate(request)
    size = await queries.queue_size(request.app[POOL])
    return _json(QueueSize(size))


async def _list(request: web.Request, *, queue: bool) -> web.Response:
    caller = await authenticate(request)
    params = await request_parameters(request)
    query, select = parse_list_parameters(params, caller, queue=queue)
    result = await queries.list_jobs(request.app[POOL], query)
    items: list[Any] = result.jobs if select is None else _project(result.jobs, select)
    envelope = JobList(
        offset=query.offset,
        limit=query.limit,
        items=items,
        items_available=UNSET if result.items_available is None else result.items_available,
    )
    return _json(envelope)


def parse_list_parameters(
    params: Mapping[str, Any], caller: Caller, *, queue: bool
) -> tuple[ListQuery, tuple[str, ...] | None]:
    """The storage query and the selected attributes (None: all) for a list request's parameters."""
    parse_bool(params, "distinct")  # accepted for compatibility (rows are always distinct), but must be a boolean
    conditions = parse_filters(parse_json_param(params, "filters")) + parse_where(parse_json_param(params, "where"))
    query = ListQuery(
        conditions=conditions,
        order=parse_order(params.get("order")),
        limit=min(parse_int(params, "limit", DEFAULT_LIMIT), MAX_LIMIT),
        offset=parse_int(params, "offset", 0),
        count=parse_count(params.get("count")),
        owner_uuid=None if reads_everything(caller) else caller.user_uuid,
        queue=queue,
    )
    return query, select_parameter(params)


def parse_filters(value: Any) -> tuple[Condition, ...]:
    """``filters``: an array of ``[attribute, operator, operand]`` (ANDed)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ApiError(422, "filters must be an array of [attribute, operator, operand] arrays")
    conditions = []
    for item in value:
        if not isinstance(item, list) or len(item) != 3:
            raise ApiError(422, "Invalid filter: each filter must be an array [attribute, operator, operand]")
        conditions.append(queries.condition(*item))
    return tuple(conditions)


def parse_where(value: Any) -> tuple[Condition, ...]:
    """``where``, the legacy hash: an array value means ``in``, null or a scalar means ``=``."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ApiError(422, "where must be an object mapping attributes to values")
    conditions = []
    for attribute, operand in value.items():
        if isinstance(operand, dict):
            raise ApiError(422, f"Invalid value for {attribute!r} in where: objects are not supported")
        operator = "in" if isinstance(operand, list) else "="
        conditions.append(queries.condition(attribute, operator, operand))
    return tuple(conditions)


def parse_order(value: Any) -> tuple[OrderKey, ...]:
    """``order``: a JSON array or JSON string, or plain comma-separated text, of ``"attribute [asc|desc]"``."""
    if value is None:
        return ()
    if isinstance(value, str) and value.lstrip().startswith(("[", '"')):
        value = parse_json_param({"order": value}, "order")
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ApiError(422, 'order must be an array of "attribute asc|desc" strings')
    return tuple(_order_key(item) for item in value if item.strip())


def _order_key(text: str) -> OrderKey:
    words = text.split()
    if len(words) > 2 or (len(words) == 2 and words[1].lower() not in _DIRECTIONS):
        raise ApiError(422, f'Invalid order {text[:80]!r}: expected "attribute asc" or "attribute desc"')
    descending = len(words) == 2 and _DIRECTIONS[words[1].lower()]
    return queries.order_key(words[0], descending)


def parse_count(value: Any) -> bool:
    """``count``: ``exact`` (default: compute ``items_available``) or ``none``."""
    if value is None:
        return True
    if not isinstance(value, str) or value.strip().lower() not in _COUNT_MODES:
        raise ApiError(422, 'count must be "exact" or "none"')
    return _COUNT_MODES[value.strip().lower()]


def parse_select(value: Any) -> tuple[str, ...] | None:
    """``select``: attribute names to return, in the resource's own order, always with ``kind``."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise ApiError(422, "select must be an array of attribute names")
    unknown = sorted(set(value) - set(JOB_ATTRIBUTES))
    if unknown:
        raise ApiError(422, f"Invalid attribute(s) in select: {', '.join(repr(name[:80]) for name in unknown[:10])}")
    chosen = set(value) | {"kind"}
    return tuple(name for name in JOB_ATTRIBUTES if name in chosen)


def select_parameter(params: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The ``select`` parameter of a list or a get, validated (400 not JSON, 422 not attribute names)."""
    return parse_select(parse_json_param(params, "select"))


def project(job: Job, select: tuple[str, ...]) -> dict[str, Any]:
    """Only the selected attributes of ``job``."""
    return {name: getattr(job, name) for name in select}


def _project(jobs: list[Job], select: tuple[str, ...]) -> list[dict[str, Any]]:
    return [project(job, select) for job in jobs]


def _json(value: Any) -> web.Response:
    return web.Response(body=msgspec.json.encode(value), content_type="application/json")
