"""HTTP handlers for single jobs: get, create, update, delete (405) and the lifecycle methods.

Handlers know HTTP and nothing of SQL: they authenticate, parse and validate, call ``JobService``, and
render the job. List, queue and queue_size live in ``api/listing.py``.
"""

from __future__ import annotations

import re
from typing import Any, Final

import msgspec
from aiohttp import web

from api import listing, provenance
from api.auth import authenticate
from api.context import JOBS
from api.errors import ApiError
from api.params import parse_bool, read_json_object
from api.payloads import create_attributes, finish_arguments, start_arguments, update_attributes
from projections.job import Job

_JOB_UUID: Final = re.compile(r"[0-9a-z]{5}-8i9sb-[0-9a-z]{15}", re.ASCII)
_CONTROL_PARAMETERS: Final = frozenset(
    {"allow_duplicate", "find_or_create", "filters", "minimum_script_version", "exclude_script_versions",
     "ensure_unique_name", "select", "cluster_id", "alt", "api_token"}
)  # fmt: skip


def job_response(
    job: Job, status: int = 200, headers: dict[str, str] | None = None, select: tuple[str, ...] | None = None
) -> web.Response:
    """The job as JSON (only the ``select``ed attributes, if given), with its etag as the HTTP ``ETag``."""
    all_headers = {"ETag": f'"{job.etag}"'}
    if headers:
        all_headers.update(headers)
    body = msgspec.json.encode(job if select is None else listing.project(job, select))
    return web.Response(status=status, body=body, content_type="application/json", headers=all_headers)


def job_uuid(request: web.Request) -> str:
    """The ``{uuid}`` path parameter; anything not shaped like a job uuid is simply not found.

    The whole shape is checked, not just the length: a NUL or non-ASCII character must never reach
    PostgreSQL (which refuses it with an error of its own instead of finding nothing).
    """
    uuid = request.match_info["uuid"]
    if not _JOB_UUID.fullmatch(uuid):
        raise ApiError(404, "Path not found")
    return uuid


def _unwrap(body: dict[str, Any], key: str = "job") -> dict[str, Any]:
    if key in body:
        inner = body[key]
        if not isinstance(inner, dict):
            raise ApiError(422, f"{key} must be an object")
        return inner
    return body


def _if_match(request: web.Request) -> str | None:
    return request.headers.get("If-Match")


async def get_job(request: web.Request) -> web.Response:
    """GET jobs/{uuid}, optionally ``as_of_version`` / ``as_of`` (folded from the events) and ``select``."""
    caller = await authenticate(request)
    uuid = job_uuid(request)
    select = listing.select_parameter(request.query)  # refused (400/422) before anything is read
    if "as_of_version" in request.query or "as_of" in request.query:
        return await provenance.job_as_of(request, caller, uuid, select)
    return job_response(await request.app[JOBS].get(caller, uuid), select=select)


async def create_job(request: web.Request) -> web.StreamResponse:
    """POST jobs: create (201 new, 200 existing) — or a list, when tunnelled with X-HTTP-Method-Override."""
    if request.headers.get("X-HTTP-Method-Override", "").upper() == "GET":
        return await listing.list_jobs(request)
    caller = await authenticate(request)
    body = await read_json_object(request, required=True)
    params = dict(request.query)
    params.update({k: v for k, v in body.items() if k in _CONTROL_PARAMETERS})
    attrs = _unwrap({k: v for k, v in body.items() if k not in _CONTROL_PARAMETERS})
    if "job" not in body and not attrs:
        raise ApiError(422, "No job hash provided with request")
    allow_duplicate = parse_bool(params, "allow_duplicate")
    find_or_create = parse_bool(params, "find_or_create")
    if allow_duplicate is not None and find_or_create is not None and allow_duplicate == find_or_create:
        raise ApiError(422, "allow_duplicate and find_or_create contradict each other")
    reuse = (not allow_duplicate) if allow_duplicate is not None else (find_or_create is not False)
    job, created = await request.app[JOBS].create(caller, reuse=reuse, **create_attributes(attrs))
    if created:
        return job_response(job, 201, {"Location": f"/orvos/v1/jobs/{job.uuid}"})
    return job_response(job)


async def update_job(request: web.Request) -> web.Response:
    """PUT/PATCH jobs/{uuid}: only the supplied attributes change."""
    caller = await authenticate(request)
    uuid = job_uuid(request)
    body = await read_json_object(request, required=True)
    changes = update_attributes(_unwrap(body))
    return job_response(await request.app[JOBS].update(caller, uuid, changes, _if_match(request)))


async def delete_job(request: web.Request) -> web.Response:
    """DELETE jobs/{uuid}: the ledger never deletes."""
    raise ApiError(405, "jobs are never deleted; cancel the job instead", {"Allow": "GET, PUT, PATCH"})


async def lock_job(request: web.Request) -> web.Response:
    """POST jobs/{uuid}/lock."""
    caller = await authenticate(request)
    uuid = job_uuid(request)
    await read_json_object(request, required=False)
    return job_response(await request.app[JOBS].lock(caller, uuid, _if_match(request)))


async def unlock_job(request: web.Request) -> web.Response:
    """POST jobs/{uuid}/unlock."""
    caller = await authenticate(request)
    uuid = job_uuid(request)
    await read_json_object(request, required=False)
    return job_response(await request.app[JOBS].unlock(caller, uuid, _if_match(request)))


async def start_job(request: web.Request) -> web.Response:
    """POST jobs/{uuid}/start, optionally with the resolved ``script_version``."""
    caller = await authenticate(request)
    uuid = job_uuid(request)
    version = start_arguments(_unwrap(await read_json_object(request, required=False)))
    return job_response(await request.app[JOBS].start(caller, uuid, version, _if_match(request)))


async def cancel_job(request: web.Request) -> web.Response:
    """POST jobs/{uuid}/cancel."""
    caller = await authenticate(request)
    uuid = job_uuid(request)
    await read_json_object(request, required=False)
    return job_response(await request.app[JOBS].cancel(caller, uuid, _if_match(request)))


async def finish_job(request: web.Request) -> web.Response:
    """POST jobs/{uuid}/finish with ``success``, ``output``, ``log``."""
    caller = await authenticate(request)
    uuid = job_uuid(request)
    arguments = finish_arguments(_unwrap(await read_json_object(request, required=False)))
    return job_response(await request.app[JOBS].finish(caller, uuid, if_match=_if_match(request), **arguments))
