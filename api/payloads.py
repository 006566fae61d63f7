"""Validating job attributes sent by clients (CONTRACT §1, §3): types, ranges, and which may be sent at all.

Server-set attributes are ignored; state attributes are refused with the method to use instead; unknown
attributes are refused. Every refusal is an ``ApiError(422)`` whose message names the attribute.
"""

from __future__ import annotations

from typing import Any, Final

from api.errors import ApiError
from ledger.hashing import UnhashableValue, normalise

RESOURCE_LIMIT_KEYS: Final = ("min_nodes", "max_nodes", "max_tasks_per_node", "min_ram_per_task", "min_ram_per_node")
CLIENT_ATTRIBUTES: Final = frozenset(
    {"script_name", "script_version", "script_parameters", "priority", "resource_limits", "submit_id"}
)
UPDATABLE_ATTRIBUTES: Final = CLIENT_ATTRIBUTES - {"submit_id"}
REQUIRED_ON_CREATE: Final = ("script_name", "script_version", "script_parameters")
SERVER_SET: Final = frozenset(
    {
        "uuid",
        "kind",
        "etag",
        "href",
        "owner_uuid",
        "created_at",
        "modified_at",
        "modified_by_user_uuid",
        "modified_by_client_uuid",
        "supplied_script_version",
        "version",
    }
)
# State attributes change only through their lifecycle method.
STATE_METHODS: Final[dict[str, str]] = {
    "state": "lock, start, cancel or finish",
    "running": "start",
    "started_at": "start",
    "success": "finish",
    "finished_at": "finish",
    "output": "finish",
    "log": "finish",
    "cancelled_at": "cancel",
    "cancelled_by_user": "cancel",
    "cancelled_by_client": "cancel",
    "is_locked_by": "lock or unlock",
}
_INT32: Final = (-(2**31), 2**31 - 1)
_MAX_INT64: Final = 2**63 - 1
_MAX_TEXT: Final = 4096
# Hashing, storing and comparing parameters recurse; far below Python's recursion limit, far above real use.
MAX_PARAMETER_DEPTH: Final = 100


def _text(name: str, value: Any, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ApiError(422, f"{name} must be a string")
    if not allow_empty and not value.strip():
        raise ApiError(422, f"{name} must not be empty")
    if len(value) > _MAX_TEXT:
        raise ApiError(422, f"{name} must be at most {_MAX_TEXT} characters")
    if "\x00" in value:
        raise ApiError(422, f"{name} must not contain NUL characters")
    return value


def _priority(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(422, "priority must be an integer")
    if not _INT32[0] <= value <= _INT32[1]:
        raise ApiError(422, "priority must fit in 32 bits")
    return value


def _resource_limits(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        raise ApiError(422, "resource_limits must be an object")
    unknown = sorted(set(value) - set(RESOURCE_LIMIT_KEYS))
    if unknown:
        raise ApiError(422, f"resource_limits has unknown key(s) {unknown}; allowed: {list(RESOURCE_LIMIT_KEYS)}")
    for key, item in value.items():
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item <= _MAX_INT64:
            raise ApiError(422, f"resource_limits.{key} must be a non-negative integer")
    if "min_nodes" in value and "max_nodes" in value and value["min_nodes"] > value["max_nodes"]:
        raise ApiError(422, "resource_limits.min_nodes must not exceed max_nodes")
    return dict(value)


def _depth(value: Any) -> int:
    """How deeply ``value`` nests objects and arrays (iteratively: no recursion limit to trip over)."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, level = pending.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            pending.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _parameters(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ApiError(422, "script_parameters must be an object")
    if _depth(value) > MAX_PARAMETER_DEPTH:
        raise ApiError(422, f"script_parameters must not nest more than {MAX_PARAMETER_DEPTH} levels deep")
    try:
        return normalise(value)
    except UnhashableValue as exc:
        raise ApiError(422, f"script_parameters: {exc}") from None


def _check_names(attrs: dict[str, Any], allowed: frozenset[str], method: str) -> dict[str, Any]:
    state = sorted(name for name in attrs if name in STATE_METHODS)
    if state:
        uses = "; ".join(f"{name}: use {STATE_METHODS[name]}" for name in state)
        raise ApiError(422, f"state attributes cannot be set by {method} ({uses})")
    unknown = sorted(name for name in attrs if name not in allowed and name not in SERVER_SET)
    if unknown:
        raise ApiError(422, f"Invalid attribute(s) for {method}: {unknown}")
    return {name: value for name, value in attrs.items() if name in allowed}


def _validate(attrs: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in attrs.items():
        if name in ("script_name", "script_version"):
            out[name] = _text(name, value)
        elif name == "script_parameters":
            out[name] = _parameters(value)
        elif name == "priority":
            out[name] = _priority(value)
        elif name == "resource_limits":
            out[name] = _resource_limits(value)
        elif name == "submit_id":
            out[name] = None if value is None else _text(name, value)
    return out


def create_attributes(attrs: dict[str, Any]) -> dict[str, Any]:
    """Validated keyword arguments for ``JobService.create`` from a create body's job object."""
    known = _check_names(attrs, CLIENT_ATTRIBUTES, "create")
    missing = [name for name in REQUIRED_ON_CREATE if known.get(name) is None]
    if missing:
        raise ApiError(422, "; ".join(f"{name} attribute must be specified" for name in missing))
    return _validate(known)


def update_attributes(attrs: dict[str, Any]) -> dict[str, Any]:
    """Validated changes for ``JobService.update`` (may be empty)."""
    if "submit_id" in attrs:
        raise ApiError(422, "submit_id cannot be changed after the job is submitted")
    known = _check_names(attrs, UPDATABLE_ATTRIBUTES, "update")
    for name in REQUIRED_ON_CREATE:
        if name in known and known[name] is None:
            raise ApiError(422, f"{name} cannot be null")
    return _validate(known)


def start_arguments(body: dict[str, Any]) -> str | None:
    """The ``script_version`` a start body may carry (a 40-hex commit)."""
    _only(body, {"script_version"}, "start")
    version = body.get("script_version")
    if version is None:
        return None
    return _text("script_version", version)


def finish_arguments(body: dict[str, Any]) -> dict[str, Any]:
    """``success`` (required), ``output`` and ``log`` from a finish body."""
    _only(body, {"success", "output", "log"}, "finish")
    if not isinstance(body.get("success"), bool):
        raise ApiError(422, "success must be given, true or false")
    out: dict[str, Any] = {"success": body["success"]}
    for name in ("output", "log"):
        if body.get(name) is not None:
            out[name] = _text(name, body[name], allow_empty=True)
    return out


def _only(body: dict[str, Any], allowed: set[str], method: str) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(422, f"Invalid attribute(s) for {method}: {unknown}")
