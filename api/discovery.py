"""The discovery document (what the Arvados Python SDK and googleapiclient build clients from) and the
OpenAPI 3.1 document, both rendered from ``api.methods.all_methods()`` and ``api.schemas``.

Nothing here lists a method or an attribute: a method added to the table, or an attribute added to the
``Job`` projection, appears in both documents by itself. The documents depend on the URL the client used
(``rootUrl``), so they are rendered once per root URL and kept, a bounded number of them, per application.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from typing import Any, Final

import msgspec
from aiohttp import web

from api.context import SETTINGS
from api.errors import ApiError
from api.methods import BASE_PATH, Method, Param, all_methods
from api.params import MAX_BODY_BYTES
from api.schemas import REF_PREFIX, SELECTION_SCHEMA, json_schemas, openapi_schemas, schema_names

DISCOVERY_PATHS: Final = ("/discovery/v1/apis/arvados/v1/rest", "/discovery/v1/apis/orvos/v1/rest")
OPENAPI_PATH: Final = BASE_PATH + "openapi.json"
CACHE_CONTROL: Final = "max-age=60"
SERVICE_PATH: Final = BASE_PATH.lstrip("/")
TITLE: Final = "Orvos Jobs API (jobledger)"
DESCRIPTION: Final = (
    "Submit, queue, dispatch and audit jobs. Every change is an immutable, hash-chained event: "
    "a job's history, the global event stream and signed checkpoints of the ledger are part of the API."
)
# Schemas of resources whose uuids have a fixed type infix (Arvados publishes it as uuidPrefix).
UUID_INFIXES: Final[dict[str, str]] = {"Job": "8i9sb", "User": "tpzed"}

_log = logging.getLogger("jobledger.api")
_DOCUMENTS: Final = web.AppKey("rendered_documents", dict[tuple[str, str], bytes])
_CACHE_LIMIT: Final = 32  # distinct root URLs kept per application; the Host header is the client's to choose
_HOST: Final = re.compile(r"^(?:[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")
_PATH_PARAMETER: Final = re.compile(r"{([^{}/]+)}")
_PAYLOAD_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})

ERROR_DESCRIPTIONS: Final[dict[int, str]] = {
    400: "Malformed JSON or parameters.",
    401: "No token, or an unknown or expired one.",
    403: "Not allowed: the caller's role does not permit it, or a read-only token tried to write.",
    404: "Unknown, or not readable by the caller.",
    405: "Method not allowed.",
    412: "If-Match does not match the current etag.",
    413: "Request body larger than 1 MiB.",
    415: "Request body is not application/json.",
    422: "Invalid attribute or value, illegal state transition, lock conflict or submit_id conflict.",
    503: "Database unavailable; retry after Retry-After seconds.",
}
SUCCESS_DESCRIPTIONS: Final[dict[int, str]] = {200: "OK.", 201: "Created."}


# ---------------------------------------------------------------------------------------------------------
# What both documents need to know about a method.
# ---------------------------------------------------------------------------------------------------------
def path_parameters(method: Method) -> list[str]:
    """The names of ``method``'s path parameters, in the order they appear in its path."""
    return _PATH_PARAMETER.findall(method.path)


def request_key(method: Method) -> str | None:
    """The key a request body wraps its object under (``{"job": {...}}``), or None for a plain body.

    Bodies that carry the resource itself are wrapped under its singular name, the Arvados way; bodies of
    other schemas (``StartRequest``, ``FinishRequest``) are sent as they are.
    """
    singular = method.resource.removesuffix("s")
    return singular if method.request == resource_schema(method.resource) else None


def resource_schema(resource: str) -> str:
    """The schema of one item of ``resource``: ``jobs`` → ``Job``."""
    return resource.removesuffix("s").capitalize()


def error_statuses(method: Method) -> list[int]:
    """The error statuses (CONTRACT §7) ``method`` can answer with."""
    if not method.success_statuses:
        return [405]  # a method that always refuses does nothing else first
    statuses = {400, 401, 403, 422, 503}
    if path_parameters(method):
        statuses.add(404)
    if method.http in _PAYLOAD_METHODS:
        statuses |= {413, 415}
        if path_parameters(method):
            statuses.add(412)  # writes to one object honour If-Match
    return sorted(statuses)


def undeclared_schemas(methods: Iterable[Method]) -> list[tuple[str, str]]:
    """(method id, schema name) for each request or response schema that ``api/schemas.py`` lacks."""
    declared = schema_names()
    return [
        (method.id, name)
        for method in methods
        for name in (method.request, method.response)
        if name is not None and name not in declared
    ]


def _schemas_for(methods: Iterable[Method]) -> dict[str, Any]:
    """Every declared schema, plus a stand-in for each undeclared one a method names.

    A ``$ref`` to a missing schema would stop googleapiclient from building any client at all, so a method
    added without its schema still gets a (vague) document; the tests insist there are none.
    """
    schemas = json_schemas()
    for method_id, name in undeclared_schemas(methods):
        _log.warning("%s names schema %r, which api/schemas.py does not declare", method_id, name)
        schemas.setdefault(name, {"type": "object", "description": "Not documented yet."})
    return schemas


# ---------------------------------------------------------------------------------------------------------
# The discovery document.
# ---------------------------------------------------------------------------------------------------------
def _discovery_type(node: dict[str, Any]) -> str | None:
    """The single type the discovery dialect allows, from a JSON Schema node (None for a ``$ref``)."""
    declared = node.get("type")
    if isinstance(declared, list):
        concrete = [name for name in declared if name != "null"]
        return concrete[0] if len(concrete) == 1 else "any"
    if declared is not None:
        return declared
    if "$ref" in node:
        return None
    if "enum" in node and all(isinstance(value, str) for value in node["enum"]):
        return "string"
    return "any"


def discovery_schema(node: dict[str, Any]) -> dict[str, Any]:
    """A JSON Schema 2020-12 node in the discovery dialect: one type, bare ``$ref`` names, no ``null``."""
    out: dict[str, Any] = {}
    if "$ref" in node:
        out["$ref"] = node["$ref"].removeprefix(REF_PREFIX)
    kind = _discovery_type(node)
    if kind is not None:
        out["type"] = kind
    for key in ("description", "format", "pattern", "enum"):
        if key in node:
            out[key] = node[key]
    if "default" in node and not isinstance(node["default"], dict | list) and node["default"] is not None:
        out["default"] = node["default"]
    if "properties" in node:
        out["properties"] = {name: discovery_schema(prop) for name, prop in node["properties"].items()}
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = discovery_schema(node["additionalProperties"])
    if kind == "array":
        out["items"] = discovery_schema(node["items"]) if "items" in node else {"type": "any"}
    return out


def _discovery_schemas(schemas: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, schema in schemas.items():
        converted = {"id": name, **discovery_schema(schema)}
        if name in UUID_INFIXES:
            converted["uuidPrefix"] = UUID_INFIXES[name]
        out[name] = converted
    return out


def _discovery_parameter(param: Param) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": param.type,
        "description": param.description,
        "location": param.location,
        "required": param.required or param.location == "path",
    }
    if param.default is not None:
        out["default"] = param.default  # as a string, always: the Java client needs that (reference §6.3)
    return out


def _discovery_method(method: Method, name: str) -> dict[str, Any]:
    parameters = {param.name: _discovery_parameter(param) for param in method.parameters}
    order = path_parameters(method) + [
        param.name for param in method.parameters if param.required and param.location == "query"
    ]
    description = method.description
    if method.response_content_type != "application/json":
        description += f" Responds with {method.response_content_type}."
    out: dict[str, Any] = {
        "id": f"arvados.{method.resource}.{name}",
        "path": method.path,
        "httpMethod": method.http,
        "description": description,
        "parameters": parameters,
        "parameterOrder": order,
    }
    if method.request is not None:
        key = request_key(method)
        # googleapiclient accepts body= only when "request" is present; it sends the body verbatim.
        out["request"] = (
            {"required": True, "properties": {key: {"$ref": method.request}}} if key else {"$ref": method.request}
        )
    if method.response is not None:
        out["response"] = {"$ref": method.response}
    return out


def _discovery_resources(methods: Iterable[Method]) -> dict[str, Any]:
    resources: dict[str, dict[str, Any]] = {}
    for method in methods:
        entries = resources.setdefault(method.resource, {"methods": {}})["methods"]
        for name in (method.name, *method.aliases):  # aliases (index, show, destroy) are full duplicates
            if name in entries:
                raise ValueError(f"two methods are named {method.resource}.{name}")
            entries[name] = _discovery_method(method, name)
    return resources


_ROOT_PARAMETERS: Final[dict[str, Any]] = {
    "alt": {
        "type": "string",
        "description": "Data format for the response (googleapiclient always sends json).",
        "default": "json",
        "enum": ["json"],
        "enumDescriptions": ["Responses with Content-Type of application/json"],
        "location": "query",
    },
    "api_token": {
        "type": "string",
        "description": "The API token, for clients that cannot send Authorization: Bearer.",
        "location": "query",
    },
}


def render_discovery(
    root_url: str, methods: Iterable[Method] | None = None, *, uuid_prefix: str = "zzzzz"
) -> dict[str, Any]:
    """The discovery document for clients reaching the service at ``root_url`` (ends with ``/``)."""
    methods = tuple(all_methods() if methods is None else methods)
    schemas = _schemas_for(methods)
    return {
        "kind": "discovery#restDescription",
        "discoveryVersion": "v1",
        "id": "arvados:v1",
        "name": "arvados",
        "version": "v1",
        "title": TITLE,
        "description": DESCRIPTION,
        "protocol": "rest",
        "rootUrl": root_url,
        "baseUrl": root_url + SERVICE_PATH,
        "servicePath": SERVICE_PATH,
        "basePath": BASE_PATH,
        "batchPath": "batch",
        "uuidPrefix": uuid_prefix,
        "maxRequestSize": MAX_BODY_BYTES,  # the Arvados SDK refuses bigger bodies itself instead of a 413
        "parameters": _ROOT_PARAMETERS,
        "resources": _discovery_resources(methods),
        "schemas": _discovery_schemas(schemas),
    }


# ---------------------------------------------------------------------------------------------------------
# The OpenAPI 3.1 document.
# ---------------------------------------------------------------------------------------------------------
def _typed_default(param: Param) -> Any:
    """The table keeps defaults as strings (the discovery convention); JSON Schema wants them typed."""
    assert param.default is not None
    if param.type == "integer":
        return int(param.default)
    if param.type == "number":
        return float(param.default)
    if param.type == "boolean":
        return param.default.lower() in ("true", "1")
    if param.type in ("array", "object"):
        return msgspec.json.decode(param.default)
    return param.default


def _openapi_parameter(param: Param) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": param.type}
    if param.default is not None:
        schema["default"] = _typed_default(param)
    out: dict[str, Any] = {
        "name": param.name,
        "in": param.location,
        "required": param.required or param.location == "path",
        "description": param.description,
    }
    if param.type in ("array", "object"):
        out["content"] = {"application/json": {"schema": schema}}  # structured values travel as JSON text
    else:
        out["schema"] = schema
    return out


def _openapi_request(method: Method, schemas: dict[str, Any]) -> dict[str, Any]:
    assert method.request is not None
    ref = {"$ref": REF_PREFIX + method.request}
    key = request_key(method)
    if key is None:
        return {
            "required": bool(schemas[method.request].get("required")),
            "content": {"application/json": {"schema": ref}},
        }
    return {
        "required": True,
        "description": f'The {key} under "{key}"; a bare attribute object is also accepted.',
        "content": {"application/json": {"schema": {"type": "object", "properties": {key: ref}, "required": [key]}}},
    }


def _header(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/headers/{name}"}


def _success_response(method: Method, status: int) -> dict[str, Any]:
    headers = {"X-Request-Id": _header("X-Request-Id")}
    if method.response is not None and method.response == resource_schema(method.resource):
        headers["ETag"] = _header("ETag")
    if status == 201:
        headers["Location"] = _header("Location")
    out: dict[str, Any] = {"description": SUCCESS_DESCRIPTIONS.get(status, "Success."), "headers": headers}
    if method.response_content_type != "application/json":
        # A stream (Server-Sent Events...): text whose items are the response schema. OpenAPI 3.1 has no word
        # for "items of a stream" (3.2's itemSchema), so the link rides in an extension.
        media: dict[str, Any] = {"schema": {"type": "string"}}
        if method.response is not None:
            media["x-item-schema"] = {"$ref": REF_PREFIX + method.response}
        out["content"] = {method.response_content_type: media}
    elif method.response is not None:
        schema: dict[str, Any] = {"$ref": REF_PREFIX + method.response}
        if method.response == "Job" and any(param.name == "select" for param in method.parameters):
            # With select only the selected attributes (and kind) come back, as for a list's items.
            schema = {"anyOf": [schema, {"$ref": REF_PREFIX + SELECTION_SCHEMA}]}
        out["content"] = {"application/json": {"schema": schema}}
    return out


def _operation(method: Method, schemas: dict[str, Any]) -> dict[str, Any]:
    responses: dict[str, Any] = {str(status): _success_response(method, status) for status in method.success_statuses}
    for status in error_statuses(method):
        responses[str(status)] = {"$ref": f"#/components/responses/Error{status}"}
    out: dict[str, Any] = {
        "operationId": f"{method.resource}_{method.name}",
        "tags": [method.resource],
        "description": method.description,
        "x-discovery-ids": [f"arvados.{method.resource}.{name}" for name in (method.name, *method.aliases)],
        "parameters": [_openapi_parameter(param) for param in method.parameters],
    }
    if method.request is not None:
        out["requestBody"] = _openapi_request(method, schemas)
    out["responses"] = responses
    return out


def _error_response(status: int) -> dict[str, Any]:
    headers = {"X-Request-Id": _header("X-Request-Id")}
    if status == 503:
        headers["Retry-After"] = _header("Retry-After")
    if status == 405:
        headers["Allow"] = _header("Allow")
    return {
        "description": ERROR_DESCRIPTIONS[status],
        "headers": headers,
        "content": {"application/json": {"schema": {"$ref": REF_PREFIX + "Error"}}},
    }


_HEADERS: Final[dict[str, Any]] = {
    "X-Request-Id": {"description": "The request's id: the client's X-Request-Id, or one the server made.",
                     "schema": {"type": "string"}},
    "ETag": {"description": "The object's etag, quoted; send it in If-Match.", "schema": {"type": "string"}},
    "Location": {"description": "The new object's path.", "schema": {"type": "string"}},
    "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}},
    "Allow": {"description": "The methods the path does allow.", "schema": {"type": "string"}},
}  # fmt: skip
_SECURITY_SCHEMES: Final[dict[str, Any]] = {
    "bearer": {"type": "http", "scheme": "bearer",
               "description": "Authorization: Bearer <token> (Authorization: OAuth2 <token> is accepted too)."},
    "api_token": {"type": "apiKey", "in": "query", "name": "api_token", "description": "The token as a parameter."},
}  # fmt: skip


def render_openapi(root_url: str, methods: Iterable[Method] | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document for clients reaching the service at ``root_url`` (ends with ``/``)."""
    methods = tuple(all_methods() if methods is None else methods)
    schemas = openapi_schemas(_schemas_for(methods))
    paths: dict[str, dict[str, Any]] = {}
    for method in methods:
        item = paths.setdefault(BASE_PATH + method.path, {})
        if method.http.lower() in item:
            raise ValueError(f"two methods are routed at {method.http} {method.path}")
        item[method.http.lower()] = _operation(method, schemas)
    statuses = sorted({status for method in methods for status in error_statuses(method)})
    return {
        "openapi": "3.1.0",
        "info": {"title": TITLE, "version": "v1", "description": DESCRIPTION},
        "servers": [{"url": root_url.rstrip("/")}],
        "security": [{"bearer": []}, {"api_token": []}],
        "tags": [{"name": resource} for resource in dict.fromkeys(method.resource for method in methods)],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": {f"Error{status}": _error_response(status) for status in statuses},
            "headers": _HEADERS,
            "securitySchemes": _SECURITY_SCHEMES,
        },
    }


# ---------------------------------------------------------------------------------------------------------
# Serving them.
# ---------------------------------------------------------------------------------------------------------
def _first(header: str | None) -> str:
    """The first value of a possibly comma-joined forwarding header (the proxy nearest the client)."""
    return (header or "").split(",")[0].strip()


def root_url(request: web.Request) -> str:
    """``scheme://host/`` as the client sees the service, through a proxy's X-Forwarded-Proto/-Host."""
    scheme = _first(request.headers.get("X-Forwarded-Proto")).lower()
    if scheme not in ("http", "https"):
        scheme = request.scheme
    host = (_first(request.headers.get("X-Forwarded-Host")) or request.host).lower()
    if not _HOST.match(host):
        raise ApiError(400, "invalid Host header")
    return f"{scheme}://{host}/"


def _serve(request: web.Request, kind: str, render: Callable[[str], dict[str, Any]]) -> web.Response:
    root = root_url(request)
    cache = request.app[_DOCUMENTS]
    body = cache.get((kind, root))
    if body is None:
        body = msgspec.json.encode(render(root))
        if len(cache) >= _CACHE_LIMIT:
            del cache[next(iter(cache))]  # the oldest: a few hosts are real, the rest are someone's guesses
        cache[(kind, root)] = body
    return web.Response(
        body=body,
        content_type="application/json",
        headers={"Cache-Control": CACHE_CONTROL, "Vary": "Host, X-Forwarded-Host, X-Forwarded-Proto"},
    )


async def discovery_document(request: web.Request) -> web.Response:
    """GET the discovery document (no token needed: clients read it before they authenticate)."""
    prefix = request.app[SETTINGS].uuid_prefix
    return _serve(request, "discovery", lambda root: render_discovery(root, uuid_prefix=prefix))


async def openapi_document(request: web.Request) -> web.Response:
    """GET the OpenAPI 3.1 document (no token needed)."""
    return _serve(request, "openapi", render_openapi)


def add_document_routes(app: web.Application) -> None:
    """Route both discovery paths and the OpenAPI document."""
    app[_DOCUMENTS] = {}
    for api, path in zip(("arvados", "orvos"), DISCOVERY_PATHS, strict=True):
        app.router.add_get(path, discovery_document, name=f"discovery.{api}")
    app.router.add_get(OPENAPI_PATH, openapi_document, name="openapi")
