"""JSON Schemas of what the API takes and returns, derived from msgspec types rather than copied by hand.

``Job`` is the projection itself (``projections.job.Job``) and ``Checkpoint`` the ledger's own struct
(``ledger.checkpoint.Checkpoint``), so a new attribute there appears here at once; their descriptions live in
``FIELD_DESCRIPTIONS`` (a test insists every attribute has one). The other bodies are declared below as
msgspec structs that mirror what the handlers send. ``json_schemas()``
renders them all as JSON Schema 2020-12 (what OpenAPI 3.1 uses); ``api/discovery.py`` converts that to the
discovery-document dialect.

Another module's method may name a new schema in ``Method.request`` / ``Method.response``: declare its
struct here and add it to ``SCHEMA_TYPES``.
"""

from __future__ import annotations

import copy
import functools
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from api.payloads import CLIENT_ATTRIBUTES, RESOURCE_LIMIT_KEYS
from ledger.access import Role
from ledger.checkpoint import HASH_PATTERN, KEY_ID_PATTERN, MESSAGE_HEADER, Checkpoint
from projections.job import EVENT_TYPES, JOB_KIND, Job

REF_PREFIX: Final = "#/components/schemas/"
COMMIT_PATTERN: Final = "^[0-9a-f]{40}$"
ERROR_TOKEN_PATTERN: Final = r"^[0-9]+\+[0-9a-f]{8}$"
_TIMESTAMP: Final = Meta(
    description="RFC 3339 UTC time with microseconds, e.g. 2026-11-25T10:00:00.123456Z.",
    extra_json_schema={"format": "date-time"},
)

JOB_DESCRIPTION: Final = (
    "A job: a script to run, its parameters and version, and where it is in its life (Queued, Running, "
    "Complete, Failed, Cancelled). Clients send only "
    + ", ".join(sorted(CLIENT_ATTRIBUTES))
    + " (script_name, script_version and script_parameters are required on create); the other attributes "
    "are set by the server, and state attributes change only through lock, unlock, start, cancel and finish."
)
JOB_ATTRIBUTE_DESCRIPTIONS: Final[dict[str, str]] = {
    "uuid": "The job's UUID, PPPPP-8i9sb-RRRRRRRRRRRRRRR.",
    "kind": f"Always {JOB_KIND}.",
    "etag": "Changes whenever the job does; also the HTTP ETag of a single job (send it in If-Match).",
    "href": "The job's path, relative to the API base.",
    "owner_uuid": "The user who submitted the job.",
    "created_at": "When the job was submitted.",
    "modified_at": "When the job last changed.",
    "modified_by_user_uuid": "The user whose request last changed the job.",
    "modified_by_client_uuid": "The API client of the token that last changed the job.",
    "submit_id": "Chosen by the client, unique per owner: a retried create with the same submit_id returns "
    "the original job.",
    "priority": "Queue priority, higher first; may change until the job finishes.",
    "resource_limits": "Requested resources; RAM in KiB. Unknown keys and min_nodes > max_nodes are refused.",
    "script_name": "The script to run.",
    "script_parameters": "The script's parameters (a JSON object).",
    "script_version": "Git commit, branch or tag of the script; a 40-hex commit once the job has started.",
    "supplied_script_version": "script_version as first submitted, before start resolved it to a commit.",
    "cancelled_by_client": "The API client that cancelled the job.",
    "cancelled_by_user": "The user who cancelled the job.",
    "cancelled_at": "When the job was cancelled.",
    "started_at": "When the job started.",
    "finished_at": "When the job's process ended (finish).",
    "running": "True while the job is Running.",
    "success": "Whether the job's process succeeded; null until finish.",
    "is_locked_by": "The dispatcher holding the job's lock, or null.",
    "state": "Derived from the lifecycle timestamps.",
    "output": "What the job produced (set by finish).",
    "log": "The job's log (set by finish).",
    "version": "How many events the job's history has; jobs/{uuid}?as_of_version=N shows an earlier one.",
}

CHECKPOINT_DESCRIPTION: Final = (
    "The head of the global hash chain, signed with the service's Ed25519 key. The signature covers the ASCII "
    f"lines {MESSAGE_HEADER!r}, key_id, position, chain_hash and signed_at, each ending with a newline."
)
CHECKPOINT_FIELD_DESCRIPTIONS: Final[dict[str, str]] = {
    "position": "The position of the latest event in the global order (0 for an empty ledger).",
    "chain_hash": "The global chain hash at that position: it covers every event up to it.",
    "signed_at": "When the checkpoint was signed.",
    "key_id": "Which key signed (see ledger/public_key).",
    "signature": "Base64 of the 64-byte Ed25519 signature.",
}
FIELD_DESCRIPTIONS: Final[dict[str, dict[str, str]]] = {
    "Job": JOB_ATTRIBUTE_DESCRIPTIONS,
    "Checkpoint": CHECKPOINT_FIELD_DESCRIPTIONS,
}
SCHEMA_DESCRIPTIONS: Final[dict[str, str]] = {"Job": JOB_DESCRIPTION, "Checkpoint": CHECKPOINT_DESCRIPTION}
# Formats of fields of the structs declared elsewhere, which cannot carry msgspec.Meta of ours.
_PATTERNS: Final[dict[tuple[str, str], str]] = {
    ("Checkpoint", "chain_hash"): f"^{HASH_PATTERN.pattern}$",
    ("Checkpoint", "key_id"): f"^{KEY_ID_PATTERN.pattern}$",
}


class JobList(msgspec.Struct, kw_only=True):
    """A page of jobs (list and queue)."""

    kind: Annotated[Literal["orvos#jobList"], Meta(description="Always orvos#jobList.")] = "orvos#jobList"
    etag: Annotated[str, Meta(description="Always empty.")] = ""
    self_link: Annotated[str, Meta(description="Always empty.")] = ""
    offset: Annotated[int, Meta(ge=0, description="Items skipped (the offset in effect).")]
    limit: Annotated[int, Meta(ge=0, description="The limit in effect (clamped to 1000): trust this one.")]
    items: Annotated[list[Job], Meta(description="The jobs; with select, only the selected attributes and kind.")]
    items_available: (
        Annotated[int, Meta(ge=0, description="Jobs matching, ignoring limit and offset; absent with count=none.")]
        | UnsetType
    ) = UNSET


class QueueSize(msgspec.Struct, kw_only=True):
    """How many jobs are queued and unlocked."""

    queue_size: Annotated[int, Meta(ge=0, description="Queued, unlocked jobs.")]


class StartRequest(msgspec.Struct, kw_only=True):
    """The body of start (may be empty; may also be wrapped as {"job": {...}})."""

    script_version: (
        Annotated[
            str,
            Meta(
                pattern=COMMIT_PATTERN,
                description="The commit the job runs; required when its script_version is a branch or tag.",
            ),
        ]
        | UnsetType
    ) = UNSET


class FinishRequest(msgspec.Struct, kw_only=True):
    """The body of finish: how the job's process ended."""

    success: Annotated[bool, Meta(description="Whether the process succeeded.")]
    output: Annotated[str | None, Meta(description="What the job produced.")] = None
    log: Annotated[str | None, Meta(description="The job's log.")] = None


def _event_data_description() -> str:
    """Which fields ``data`` has for each event type, read off the event structs of the fold."""
    shapes = "; ".join(
        f"{tag}: {', '.join(cls.__struct_fields__) or 'no fields'}" for tag, cls in sorted(EVENT_TYPES.items())
    )
    return f"The event's own fields, by event_type ({shapes})."


class Event(msgspec.Struct, kw_only=True):
    """One immutable entry of the ledger: something that happened to a job, who did it, and when."""

    kind: Annotated[Literal["orvos#event"], Meta(description="Always orvos#event.")] = "orvos#event"
    position: Annotated[
        int | None, Meta(description="Global position 1, 2, 3, ... without holes; null until sequenced.")
    ]
    id: Annotated[int, Meta(description="The event's id in the ledger.")]
    job_uuid: Annotated[str, Meta(description="The job the event belongs to.")]
    version: Annotated[int, Meta(ge=1, description="The job's version after this event (1 for submitted).")]
    event_type: Annotated[Literal[tuple(EVENT_TYPES)], Meta(description="What happened.")]  # type: ignore[valid-type]
    data: Annotated[dict[str, Any], Meta(description=_event_data_description())]
    actor_user_uuid: Annotated[str, Meta(description="The user whose request made the event.")]
    actor_client_uuid: Annotated[str | None, Meta(description="The API client of that request's token.")]
    request_id: Annotated[str, Meta(description="The X-Request-Id of that request.")]
    recorded_at: Annotated[str, _TIMESTAMP]
    prev_hash: Annotated[str, Meta(description="Hash of the job's previous event (the chain).")]
    hash: Annotated[str, Meta(description="This event's hash (see the documented hash format).")]


class EventList(msgspec.Struct, kw_only=True):
    """Events in order, and the head of the ledger."""

    kind: Annotated[Literal["orvos#eventList"], Meta(description="Always orvos#eventList.")] = "orvos#eventList"
    items: Annotated[list[Event], Meta(description="The events, in order.")]
    head: Annotated[int, Meta(ge=0, description="The latest position in the ledger.")]
    next_after: (
        Annotated[int, Meta(ge=0, description="Pass as after= to continue; absent when there is no more.")] | UnsetType
    ) = UNSET


class Error(msgspec.Struct, kw_only=True):
    """The body of every error response; the response also echoes the X-Request-Id header."""

    errors: Annotated[list[str], Meta(description="What went wrong (the Arvados SDK joins them with '; ').")]
    error_token: Annotated[
        str, Meta(pattern=ERROR_TOKEN_PATTERN, description="<unix seconds>+<8 hex>: find it in the server log.")
    ]


class PublicKey(msgspec.Struct, kw_only=True):
    """The key that signs checkpoints."""

    algorithm: Annotated[Literal["Ed25519"], Meta(description="Always Ed25519.")]
    key_id: Annotated[
        str, Meta(pattern=f"^{KEY_ID_PATTERN.pattern}$", description="The key's id, as checkpoints name it.")
    ]
    public_key: Annotated[str, Meta(description="Base64 of the raw 32-byte public key.")]
    pem: Annotated[str, Meta(description="The public key as PEM (SubjectPublicKeyInfo).")]


USER_KIND: Final = "orvos#user"


class User(msgspec.Struct, kw_only=True):
    """The caller, as users.current returns it: the subset of an Arvados user that jobledger has.

    ``username`` repeats ``name`` under the Arvados spelling that Arvados tools read; ``is_active`` is always
    true (a user who can authenticate is active here). Arvados' names, e-mail, prefs and invitation
    attributes have no counterpart in jobledger and are left out rather than sent empty.
    """

    kind: Annotated[Literal["orvos#user"], Meta(description="Always orvos#user.")] = USER_KIND
    uuid: Annotated[str, Meta(pattern="^[0-9a-z]{5}-tpzed-[0-9a-z]{15}$", description="The user's UUID.")]
    etag: Annotated[str, Meta(description="Changes whenever the user's name or role does.")]
    href: Annotated[str, Meta(description="The user's path, relative to the API base.")]
    created_at: Annotated[str, _TIMESTAMP]
    name: Annotated[str, Meta(description="The user's unique name.")]
    username: Annotated[str, Meta(description="The same as name (the Arvados attribute's name).")]
    role: Annotated[Role, Meta(description="What the user may do (CONTRACT §2).")]
    is_admin: Annotated[bool, Meta(description="Whether role is admin.")]
    is_active: Annotated[bool, Meta(description="Always true: only active users can authenticate.")] = True


SCHEMA_TYPES: Final[tuple[type[msgspec.Struct], ...]] = (
    Job,
    JobList,
    Event,
    EventList,
    QueueSize,
    StartRequest,
    FinishRequest,
    Error,
    Checkpoint,
    PublicKey,
    User,
)


def _collapse_nullable(node: Any) -> Any:
    """``anyOf: [{type: X}, {type: null}]`` → ``type: [X, null]``: the same schema, easier to read."""
    if isinstance(node, list):
        return [_collapse_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _collapse_nullable(value) for key, value in node.items()}
    branches = out.get("anyOf")
    if branches and all(set(branch) == {"type"} and isinstance(branch["type"], str) for branch in branches):
        del out["anyOf"]
        out["type"] = [branch["type"] for branch in branches]
    return out


def _describe(name: str, schema: dict[str, Any]) -> None:
    """Descriptions, timestamp formats and patterns for a struct declared outside this module."""
    schema["description"] = SCHEMA_DESCRIPTIONS[name]
    for field, prop in schema["properties"].items():
        prop["description"] = FIELD_DESCRIPTIONS[name].get(field, "")
        if field.endswith("_at"):
            prop["format"] = "date-time"
        if (name, field) in _PATTERNS:
            prop["pattern"] = _PATTERNS[(name, field)]


def _describe_job(schema: dict[str, Any]) -> None:
    """Read-only markers and the resource_limits keys: what payloads.py accepts from clients."""
    for name, prop in schema["properties"].items():
        if name not in CLIENT_ATTRIBUTES:
            prop["readOnly"] = True
    schema["properties"]["resource_limits"].update(
        type="object",
        properties={key: {"type": "integer", "minimum": 0} for key in RESOURCE_LIMIT_KEYS},
        additionalProperties=False,
    )


@functools.cache
def _components() -> dict[str, dict[str, Any]]:
    _, components = msgspec.json.schema_components(SCHEMA_TYPES, ref_template=REF_PREFIX + "{name}")
    components = _collapse_nullable(components)
    for name in SCHEMA_DESCRIPTIONS:
        _describe(name, components[name])
    _describe_job(components["Job"])
    for schema in components.values():
        schema.pop("title", None)  # the component's name says it
    return components


def json_schemas() -> dict[str, dict[str, Any]]:
    """Every schema by name, as JSON Schema 2020-12 with ``$ref`` to ``#/components/schemas/<name>``.

    The result is the caller's to change.
    """
    return copy.deepcopy(_components())


SELECTION_SCHEMA: Final = "JobSelection"


def openapi_schemas(schemas: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``schemas`` as the OpenAPI document declares them: a list's items may be partial jobs.

    With ``select`` a list returns only the selected attributes (and ``kind``), so its items are a Job *or*
    a ``JobSelection`` (a Job's attributes, none required). The discovery document keeps ``items: Job``: its
    dialect has no ``anyOf``, and its clients do not validate responses.
    """
    out = dict(schemas)
    job = schemas["Job"]
    out[SELECTION_SCHEMA] = {
        "type": "object",
        "description": "A job with only the attributes named in select, and kind.",
        "properties": copy.deepcopy(job["properties"]),
    }
    job_list = copy.deepcopy(schemas["JobList"])
    job_list["properties"]["items"]["items"] = {
        "anyOf": [{"$ref": REF_PREFIX + "Job"}, {"$ref": REF_PREFIX + SELECTION_SCHEMA}]
    }
    out["JobList"] = job_list
    return out


def schema_names() -> frozenset[str]:
    """The names ``Method.request`` and ``Method.response`` may use."""
    return frozenset(_components())
