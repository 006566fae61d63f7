"""The API's methods, defined once. ``api/app.py`` routes from this table, and the discovery and OpenAPI
documents are rendered from it, so the three can never disagree.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, Literal

from aiohttp import web

from api import jobs, listing
from api.auth import TUNNELLED_GET

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ParamType = Literal["string", "integer", "number", "boolean", "array", "object"]
BASE_PATH: Final = "/orvos/v1/"


@dataclass(frozen=True)
class Param:
    """A parameter of a method, as discovery documents describe it."""

    name: str
    type: ParamType
    description: str
    location: Literal["query", "path"] = "query"
    required: bool = False
    default: str | None = None


@dataclass(frozen=True)
class Method:
    """One API method: where it is routed, what it takes, what it returns."""

    resource: str
    name: str
    http: Literal["GET", "POST", "PUT", "PATCH", "DELETE"]
    path: str  # relative to BASE_PATH, e.g. "jobs/{uuid}/lock"
    handler: Handler
    description: str
    parameters: tuple[Param, ...] = ()
    request: str | None = None  # schema name of the request body (wrapped under the resource key), if any
    response: str | None = None  # schema name of the response
    aliases: tuple[str, ...] = field(default=())
    # What a success answers with: the documents list these statuses (none: the method always refuses).
    success_statuses: tuple[int, ...] = (200,)
    # The media type of a success (e.g. "text/event-stream" for a stream); the documents describe it.
    response_content_type: str = "application/json"

    @property
    def id(self) -> str:
        """``arvados.jobs.get``-style id (googleapiclient wants one per method)."""
        return f"arvados.{self.resource}.{self.name}"


UUID_PARAM: Final = Param("uuid", "string", "The job's UUID.", location="path", required=True)
LIST_PARAMS: Final = (
    Param("filters", "array", "Conditions [attribute, operator, operand], ANDed (JSON)."),
    Param("where", "object", "Legacy equality/IN conditions (JSON object)."),
    Param("order", "array", 'Sort keys, e.g. ["priority desc", "created_at asc"] (JSON).'),
    Param("select", "array", "Attributes to return (JSON array)."),
    Param("distinct", "boolean", "Accepted for compatibility; rows are always distinct.", default="false"),
    Param("limit", "integer", "Maximum items to return (clamped to 1000).", default="100"),
    Param("offset", "integer", "Items to skip.", default="0"),
    Param("count", "string", '"exact" (default) or "none": whether to compute items_available.', default="exact"),
)
CREATE_PARAMS: Final = (
    Param("allow_duplicate", "boolean", "Submit a new job even if an identical unfailed one exists."),
    Param("find_or_create", "boolean", "Arvados spelling of the negation of allow_duplicate."),
    Param("filters", "array", "Accepted for Arvados compatibility; reuse matching is by identity."),
    Param("minimum_script_version", "string", "Accepted for Arvados compatibility; ignored."),
    Param("exclude_script_versions", "array", "Accepted for Arvados compatibility; ignored."),
    Param("ensure_unique_name", "boolean", "Accepted for Arvados compatibility; ignored."),
    Param("select", "array", "Accepted for Arvados compatibility; ignored."),
    Param("cluster_id", "string", "Accepted for Arvados compatibility; ignored."),
)
AS_OF_PARAMS: Final = (
    Param("as_of_version", "integer", "Return the job as it was after this version of its history."),
    Param("as_of", "string", "Return the job as it was at this RFC 3339 time."),
)

JOB_METHODS: Final[tuple[Method, ...]] = (
    Method("jobs", "list", "GET", "jobs", listing.list_jobs,
           "List the jobs the caller may read (default order modified_at desc, uuid asc). POST jobs with "
           "X-HTTP-Method-Override: GET, as googleapiclient sends long queries, is a list too.", LIST_PARAMS,
           response="JobList", aliases=("index",)),
    Method("jobs", "queue", "GET", "jobs/queue", listing.queue_jobs,
           "Queued, unlocked jobs, priority desc then created_at asc; the list parameters apply.", LIST_PARAMS,
           response="JobList"),
    Method("jobs", "queue_size", "GET", "jobs/queue_size", listing.queue_size,
           "How many jobs are queued and unlocked.", response="QueueSize"),
    Method("jobs", "get", "GET", "jobs/{uuid}", jobs.get_job,
           "Get a job; with as_of_version or as_of, the job as it was then, folded from its events.",
           (UUID_PARAM, *AS_OF_PARAMS,
            Param("select", "array", "Attributes to return (JSON array), as for list; kind is always included.")),
           response="Job", aliases=("show",)),
    Method("jobs", "create", "POST", "jobs", jobs.create_job,
           "Submit a job: 201 with Location when new; 200 when an identical unfailed job, or the caller's job "
           "with the same submit_id, is returned instead.", CREATE_PARAMS, request="Job", response="Job",
           success_statuses=(201, 200)),
    Method("jobs", "update", "PUT", "jobs/{uuid}", jobs.update_job,
           "Change the supplied attributes of a Queued, unlocked job (priority until it finishes).",
           (UUID_PARAM,), request="Job", response="Job"),
    Method("jobs", "patch", "PATCH", "jobs/{uuid}", jobs.update_job,
           "Change the supplied attributes of a Queued, unlocked job (priority until it finishes).",
           (UUID_PARAM,), request="Job", response="Job"),
    Method("jobs", "delete", "DELETE", "jobs/{uuid}", jobs.delete_job,
           "Always 405: the ledger never deletes a job; cancel it instead.", (UUID_PARAM,), response="Job",
           aliases=("destroy",), success_statuses=()),
    Method("jobs", "lock", "POST", "jobs/{uuid}/lock", jobs.lock_job,
           "Claim a Queued, unlocked job (dispatchers). Of racing callers one wins; the others get 422.",
           (UUID_PARAM,), response="Job"),
    Method("jobs", "unlock", "POST", "jobs/{uuid}/unlock", jobs.unlock_job,
           "Release a lock before the job starts (the lock holder or an admin).", (UUID_PARAM,), response="Job"),
    Method("jobs", "start", "POST", "jobs/{uuid}/start", jobs.start_job,
           "Start a locked job (the lock holder). The body carries the resolved script_version when the job's is "
           "a branch or tag.", (UUID_PARAM,), request="StartRequest", response="Job"),
    Method("jobs", "cancel", "POST", "jobs/{uuid}/cancel", jobs.cancel_job,
           "Cancel a Queued or Running job (owner, dispatcher or admin); cancelling it again changes nothing.",
           (UUID_PARAM,), response="Job"),
    Method("jobs", "finish", "POST", "jobs/{uuid}/finish", jobs.finish_job,
           "Record how a started job's process ended (the lock holder): success, output, log. Allowed after a "
           "cancel; the state stays Cancelled.", (UUID_PARAM,), request="FinishRequest", response="Job"),
)  # fmt: skip


def all_methods() -> tuple[Method, ...]:
    """Every method of the API: jobs, the event stream (``api/events.py``), the ledger (``api/provenance.py``),
    users (``api/users.py``)."""
    from api import events, provenance, users

    return JOB_METHODS + events.EVENT_METHODS + provenance.LEDGER_METHODS + users.USER_METHODS


@web.middleware
async def method_override_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Run a GET method for ``POST`` + ``X-HTTP-Method-Override: GET`` on a path that only GET is routed for.

    googleapiclient (so the Arvados SDK) sends any GET whose URL would pass 2048 characters that way, the
    query moved to a form body (which ``api.params.request_parameters`` reads): a long ``filters`` on
    ``jobs.queue`` or ``events.list`` would otherwise be a 405. ``POST jobs`` is routed (create) and tunnels
    itself. Only methods without path parameters qualify: their handlers need nothing of the route's match,
    and no method with path parameters takes a parameter long enough to be tunnelled. Not being a route, the
    tunnel adds nothing to the method table or the documents. A tunnelled request is marked, so that
    ``api.auth`` reads an ``api_token`` from its form body too (and from no other POST's).
    """
    if request.method == "POST" and request.headers.get("X-HTTP-Method-Override", "").upper() == "GET":
        match = await request.app.router.resolve(request.clone(method="GET"))
        if match.http_exception is None and not match:  # routed for GET, and no path parameters
            request[TUNNELLED_GET] = True  # a real tunnel: its form body may carry api_token (api.auth)
            if isinstance(request.match_info.http_exception, web.HTTPMethodNotAllowed):
                return await match.handler(request)
    return await handler(request)


def add_routes(app: web.Application) -> None:
    """Route every method under ``BASE_PATH``, fixed paths before parameterised ones, and tunnel long GETs."""
    ordered = sorted(all_methods(), key=lambda m: "{" in m.path)
    for method in ordered:
        app.router.add_route(
            method.http, BASE_PATH + method.path, method.handler, name=f"{method.resource}.{method.name}"
        )
    app.middlewares.append(method_override_middleware)  # inside the error middleware: errors render as usual
