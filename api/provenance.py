"""Provenance over HTTP (CONTRACT §5): a job's history, the job as of a version or time, signed checkpoints.

* ``GET jobs/{uuid}/events``: the job's whole history in version order (``orvos#eventList``).
* ``GET jobs/{uuid}?as_of_version=N`` / ``?as_of=T`` (delegated here by ``api.jobs.get_job``): the job
  folded from its first N events, or from the events recorded at or before T, with the same pure ``fold``
  as the live projection. Who may read the job is decided on its current row (the owner never changes).
  A malformed value, or N < 1, is 422; N beyond the job's latest version, or T before it was submitted, is
  404 (that version, or the job at that time, does not exist). T in the future gives the latest state.
* ``GET ledger/checkpoint``: the head of the global chain signed with the service's key (any role).
* ``GET ledger/public_key``: that key, raw (base64) and PEM, with its key id.

``LEDGER_METHODS`` is built on first access (module ``__getattr__``): ``api.jobs`` imports this module and
``api.methods`` imports ``api.jobs`` before it defines ``Method``, so building the table at import time
would be an import cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import msgspec
from aiohttp import web

from api import jobs
from api.auth import authenticate
from api.context import JOBS, POOL, SETTINGS, STORE
from api.errors import ApiError
from api.params import parse_int
from ledger.access import Caller
from ledger.asof import job_at_time, job_at_version
from ledger.checkpoint import make_checkpoint
from ledger.signing import SigningKey, load_or_create_signing_key
from ledger.stream import head_position
from projections.timefmt import parse_ts

if TYPE_CHECKING:
    from api.methods import Method

    LEDGER_METHODS: tuple[Method, ...]

SIGNING_KEY: Final = web.AppKey("signing_key", SigningKey)
EVENT_LIST_KIND: Final = "orvos#eventList"


def _json(body: Any) -> web.Response:
    return web.Response(body=msgspec.json.encode(body), content_type="application/json")


async def load_signing_key(app: web.Application) -> None:
    """Startup: load the signing key, making it on first start (``ledger.signing``)."""
    app[SIGNING_KEY] = load_or_create_signing_key(app[SETTINGS])


async def job_events(request: web.Request) -> web.Response:
    """GET jobs/{uuid}/events: the job's history in version order; 404 if the caller may not read the job.

    Items have the event stream's shape (``api.events.encode_event``); ``position`` is null until sequenced.
    """
    from api.events import encode_event  # not at import time: api.events needs api.methods, which needs us

    caller = await authenticate(request)
    uuid = jobs.job_uuid(request)
    await request.app[JOBS].get(caller, uuid)  # NotFound unless it exists and the caller may read it
    events = await request.app[STORE].load_events(uuid)
    head = await head_position(request.app[POOL])
    items = b",".join(encode_event(event) for event in events)
    body = b'{"kind":"%s","items":[%s],"head":%d}' % (EVENT_LIST_KIND.encode(), items, head)
    return web.Response(body=body, content_type="application/json")


async def job_as_of(
    request: web.Request, caller: Caller, uuid: str, select: tuple[str, ...] | None = None
) -> web.Response:
    """GET jobs/{uuid}?as_of_version=N | as_of=T: the job as it was then, folded from its events (``select``:
    only those attributes)."""
    query = request.query
    if "as_of_version" in query and "as_of" in query:
        raise ApiError(422, "give as_of_version or as_of, not both")
    current = await request.app[JOBS].get(caller, uuid)  # NotFound unless it exists and the caller may read it
    pool = request.app[POOL]
    if "as_of_version" in query:
        version = parse_int(query, "as_of_version", 0, minimum=1)
        if version > current.version:
            raise ApiError(404, f"job {uuid} has no version {version} (its latest is {current.version})")
        job = await job_at_version(pool, uuid, version)
    else:
        try:
            moment = parse_ts(query["as_of"])
        except ValueError:
            raise ApiError(422, "as_of must be an RFC 3339 timestamp with a time zone") from None
        job = await job_at_time(pool, uuid, moment)
    if job is None:
        raise ApiError(404, f"job {uuid} did not exist at {query.get('as_of')}")
    return jobs.job_response(job, select=select)


async def checkpoint(request: web.Request) -> web.Response:
    """GET ledger/checkpoint: the current head, signed now."""
    await authenticate(request)
    signed = await make_checkpoint(request.app[POOL], request.app[SIGNING_KEY])
    return _json(signed)


async def public_key(request: web.Request) -> web.Response:
    """GET ledger/public_key: the key that signs checkpoints."""
    await authenticate(request)
    return _json(request.app[SIGNING_KEY].public_key_document())


def _ledger_methods() -> tuple[Method, ...]:
    from api.methods import UUID_PARAM, Method

    return (
        Method("jobs", "events", "GET", "jobs/{uuid}/events", job_events,
               "The job's history: every event in version order, with actor, API client, request id, time, "
               "position and hashes.", (UUID_PARAM,), response="EventList"),
        Method("ledger", "checkpoint", "GET", "ledger/checkpoint", checkpoint,
               "The head of the global hash chain (position, chain hash), signed with the service's Ed25519 key.",
               response="Checkpoint"),
        Method("ledger", "public_key", "GET", "ledger/public_key", public_key,
               "The Ed25519 public key that signs checkpoints: raw base64, PEM, and its key id.",
               response="PublicKey"),
    )  # fmt: skip


def __getattr__(name: str) -> Any:
    # PEP 562: LEDGER_METHODS is built the first time someone asks (see the module docstring), then cached.
    if name == "LEDGER_METHODS":
        methods = _ledger_methods()
        globals()["LEDGER_METHODS"] = methods
        return methods
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
