"""The discovery and OpenAPI documents (CONTRACT §8), over HTTP: complete, consistent with the routes, and
good enough for googleapiclient (what the Arvados SDK builds on) to drive the service."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any

import httplib2
import pytest
from googleapiclient.discovery import build, build_from_document
from googleapiclient.errors import HttpError
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from api.app import create_app
from api.discovery import (
    DISCOVERY_PATHS,
    OPENAPI_PATH,
    error_statuses,
    render_discovery,
    render_openapi,
    undeclared_schemas,
)
from api.methods import BASE_PATH, Method, Param, all_methods
from api.schemas import FIELD_DESCRIPTIONS
from ledger.config import Settings
from projections.job import Job
from tests.harness import ServiceHarness

EXPECTED_SCHEMAS = {
    "Job", "JobList", "Event", "EventList", "QueueSize", "StartRequest", "FinishRequest", "Error", "User"
}  # fmt: skip
UNKNOWN_JOB = "zzzzz-8i9sb-000000000000000"


class TokenHttp(httplib2.Http):
    """httplib2 with the caller's token on every request (the Arvados SDK does the same), never proxied."""

    def __init__(self, token: str | None) -> None:
        super().__init__(proxy_info=None)
        self.token = token

    def request(self, uri: str, method: str = "GET", body: Any = None, headers: Any = None, **kwargs: Any) -> Any:
        """Send with ``Authorization: Bearer <token>``."""
        headers = dict(headers or {})
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        return super().request(uri, method, body, headers, **kwargs)


async def fetch_discovery(service: ServiceHarness, path: str = DISCOVERY_PATHS[0]) -> dict[str, Any]:
    response = await service.anonymous().get(path)
    assert response.status == 200, response.body
    return response.body


async def fetch_openapi(service: ServiceHarness) -> dict[str, Any]:
    response = await service.anonymous().get(OPENAPI_PATH)
    assert response.status == 200, response.body
    return response.body


def refs(node: Any) -> Iterator[str]:
    """Every ``$ref`` value anywhere in ``node``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def discovery_entries(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``resource.name`` → method entry."""
    return {
        f"{resource}.{name}": entry
        for resource, body in doc["resources"].items()
        for name, entry in body["methods"].items()
    }


def routed_methods(settings: Settings) -> set[tuple[str, str]]:
    """(HTTP method, path) of every API method the real application routes (no database needed)."""
    app = create_app(settings, "postgresql://127.0.0.1:1/unused")
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
        and route.resource.canonical.startswith(BASE_PATH)
        and route.resource.canonical != OPENAPI_PATH
        and route.method != "HEAD"
    }


# ---------------------------------------------------------------------------------------------------------
# The discovery document.
# ---------------------------------------------------------------------------------------------------------
async def test_both_discovery_paths_serve_the_same_document(service: ServiceHarness) -> None:
    anonymous = service.anonymous()  # clients read the document before they authenticate
    first, second = [await anonymous.get(path) for path in DISCOVERY_PATHS]
    assert first.status == second.status == 200
    assert first.body == second.body
    assert first.headers["Cache-Control"] == "max-age=60"
    assert first.headers["Content-Type"].startswith("application/json")
    doc = first.body
    assert doc["kind"] == "discovery#restDescription"
    assert (doc["discoveryVersion"], doc["id"], doc["name"], doc["version"]) == ("v1", "arvados:v1", "arvados", "v1")
    assert doc["rootUrl"] == service.base_url + "/"
    assert (doc["servicePath"], doc["basePath"]) == ("orvos/v1/", "/orvos/v1/")
    assert "batchPath" in doc
    assert doc["parameters"]["alt"]["location"] == "query"
    assert doc["uuidPrefix"] == service.settings.uuid_prefix


async def test_root_url_follows_the_proxy_headers(service: ServiceHarness) -> None:
    anonymous = service.anonymous()
    proxied = await anonymous.get(
        DISCOVERY_PATHS[0], headers={"Host": "jobs.example.org", "X-Forwarded-Proto": "https"}
    )
    assert proxied.body["rootUrl"] == "https://jobs.example.org/"
    assert proxied.body["baseUrl"] == "https://jobs.example.org/orvos/v1/"
    forwarded = await anonymous.get(
        OPENAPI_PATH, headers={"X-Forwarded-Host": "api.example.org:8443, inner", "X-Forwarded-Proto": "https"}
    )
    assert forwarded.body["servers"] == [{"url": "https://api.example.org:8443"}]
    # Rendered per root URL: the plain request still gets its own.
    assert (await fetch_discovery(service))["rootUrl"] == service.base_url + "/"
    bad = await anonymous.get(DISCOVERY_PATHS[1], headers={"X-Forwarded-Host": "evil.org/x?"})
    assert bad.status == 400
    assert bad.errors == ["invalid Host header"]


async def test_every_method_appears_with_its_path_http_method_and_parameters(service: ServiceHarness) -> None:
    doc = await fetch_discovery(service)
    entries = discovery_entries(doc)
    for method in all_methods():
        for name in (method.name, *method.aliases):
            entry = entries[f"{method.resource}.{name}"]
            assert entry["id"] == f"arvados.{method.resource}.{name}"
            assert (entry["path"], entry["httpMethod"]) == (method.path, method.http)
            assert entry["description"]
            assert set(entry["parameters"]) == {param.name for param in method.parameters}
            for param in method.parameters:
                declared = entry["parameters"][param.name]
                assert (declared["type"], declared["location"]) == (param.type, param.location)
                assert declared["required"] is (param.required or param.location == "path")
                assert declared.get("default") == param.default
                assert declared["description"] == param.description
            path_params = [param.name for param in method.parameters if param.location == "path"]
            assert entry["parameterOrder"][: len(path_params)] == path_params
            assert all("{" + name + "}" in method.path for name in path_params)
            if method.response:
                assert entry["response"] == {"$ref": method.response}
    assert len(entries) == sum(1 + len(method.aliases) for method in all_methods())
    # What the Arvados SDK needs of three of them: wait a number (googleapiclient casts an integer with int()),
    # select declared on get (an undeclared keyword is a TypeError in the client), users.current a User.
    assert entries["events.list"]["parameters"]["wait"]["type"] == "number"
    assert entries["jobs.get"]["parameters"]["select"]["type"] == "array"
    assert (entries["users.current"]["path"], entries["users.current"]["response"]) == (
        "users/current",
        {"$ref": "User"},
    )
    assert doc["schemas"]["User"]["uuidPrefix"] == "tpzed"


async def test_request_bodies_have_the_shapes_googleapiclient_needs(service: ServiceHarness) -> None:
    methods = discovery_entries(await fetch_discovery(service))
    job_body = {"required": True, "properties": {"job": {"$ref": "Job"}}}
    assert methods["jobs.create"]["request"] == job_body
    assert methods["jobs.update"]["request"] == job_body
    assert methods["jobs.start"]["request"] == {"$ref": "StartRequest"}
    assert methods["jobs.finish"]["request"] == {"$ref": "FinishRequest"}
    assert "request" not in methods["jobs.lock"]
    for alias, original in (("index", "list"), ("show", "get"), ("destroy", "delete")):
        duplicate = dict(methods[f"jobs.{alias}"], id=methods[f"jobs.{original}"]["id"])
        assert duplicate == methods[f"jobs.{original}"]


async def test_every_ref_resolves_to_a_schema(service: ServiceHarness) -> None:
    doc = await fetch_discovery(service)
    assert set(doc["schemas"]) >= EXPECTED_SCHEMAS
    used = set(refs(doc["resources"])) | set(refs(doc["schemas"]))
    assert used >= {"Job", "JobList", "QueueSize", "StartRequest", "FinishRequest"}
    assert used <= set(doc["schemas"])
    for name, schema in doc["schemas"].items():
        assert schema["id"] == name
        assert schema["type"] == "object"
        assert schema["description"]
    assert doc["schemas"]["Job"]["uuidPrefix"] == "8i9sb"
    assert doc["schemas"]["JobList"]["properties"]["items"] == {
        "type": "array",
        "description": doc["schemas"]["JobList"]["properties"]["items"]["description"],
        "items": {"$ref": "Job"},
    }
    assert doc["schemas"]["EventList"]["properties"]["items"]["items"] == {"$ref": "Event"}


async def test_schemas_describe_every_attribute(service: ServiceHarness) -> None:
    schemas = (await fetch_discovery(service))["schemas"]
    for name, schema in schemas.items():
        undescribed = [field for field, prop in schema["properties"].items() if not prop.get("description")]
        assert undescribed == [], f"{name}: describe {undescribed} (api/schemas.py)"
    for name, descriptions in FIELD_DESCRIPTIONS.items():
        assert set(schemas[name]["properties"]) == set(descriptions), name
    properties = schemas["Job"]["properties"]
    assert set(properties) == set(Job.__struct_fields__)
    assert properties["created_at"]["format"] == "date-time"
    assert properties["cancelled_at"] == {
        "type": "string",
        "format": "date-time",
        "description": "When the job was cancelled.",
    }
    assert properties["state"]["enum"] == ["Cancelled", "Complete", "Failed", "Queued", "Running"]
    assert set(properties["resource_limits"]["properties"]) == {
        "min_nodes", "max_nodes", "max_tasks_per_node", "min_ram_per_task", "min_ram_per_node"
    }  # fmt: skip
    event = schemas["Event"]["properties"]
    assert set(event) == {
        "kind", "position", "id", "job_uuid", "version", "event_type", "data", "actor_user_uuid",
        "actor_client_uuid", "request_id", "recorded_at", "prev_hash", "hash",
    }  # fmt: skip
    assert set(event["event_type"]["enum"]) == {
        "submitted", "updated", "locked", "unlocked", "started", "cancelled", "finished", "reused"
    }  # fmt: skip
    assert set(schemas["EventList"]["properties"]) == {"kind", "items", "head", "next_after"}
    assert set(schemas["Error"]["properties"]) == {"errors", "error_token"}


# ---------------------------------------------------------------------------------------------------------
# googleapiclient.
# ---------------------------------------------------------------------------------------------------------
async def test_googleapiclient_builds_a_client_with_every_method(service: ServiceHarness) -> None:
    doc = await fetch_discovery(service)
    client = build_from_document(doc, http=TokenHttp("unused"))
    for method in all_methods():
        resource = getattr(client, method.resource)()
        for name in (method.name, *method.aliases):
            arguments: dict[str, Any] = {param.name: UNKNOWN_JOB for param in method.parameters if param.required}
            if method.request is not None:
                arguments["body"] = {"job": {"script_name": "x"}} if method.request == "Job" else {}
            request = getattr(resource, name)(**arguments)  # also renders the docstrings, from the schemas
            assert request.method == method.http
            expected = service.base_url + BASE_PATH + re.sub(r"{[^}]+}", UNKNOWN_JOB, method.path)
            assert request.uri.split("?")[0] == expected
    jobs = client.jobs()
    create = jobs.create(body={"job": {"script_name": "x"}}, find_or_create=True, filters='[["a", "=", "b"]]')
    assert json.loads(create.body) == {"job": {"script_name": "x"}}
    assert "find_or_create=true" in create.uri
    listing = jobs.list(filters='[["state", "=", "Queued"]]', limit=5, order='["priority desc"]')
    assert (listing.method, listing.uri.split("?")[0]) == ("GET", service.base_url + "/orvos/v1/jobs")
    with pytest.raises(TypeError):
        jobs.lock(uuid=UNKNOWN_JOB, undeclared=1)  # what the SDK does with parameters nobody declared


def sdk_client(service: ServiceHarness, token: str | None) -> Any:
    """What ``arvados.api(discoveryServiceUrl=..., token=...)`` does: fetch the document over HTTP and build
    from it (blocking: call it in a thread, the service runs on this test's event loop)."""
    url = service.base_url + "/discovery/v1/apis/{api}/{apiVersion}/rest"
    return build("arvados", "v1", discoveryServiceUrl=url, http=TokenHttp(token), static_discovery=False,
                 cache_discovery=False)  # fmt: skip


async def call(request: Any) -> Any:
    """Execute a googleapiclient request off the event loop."""
    return await asyncio.to_thread(request.execute)


class SchemaChecker:
    """Checks bodies against the OpenAPI document's schemas, formats (date-time, ...) included."""

    def __init__(self, openapi: dict[str, Any]) -> None:
        self.components = openapi["components"]

    def check(self, name: str, body: Any) -> None:
        """Raise unless ``body`` is a valid ``name``."""
        schema = {"$ref": f"#/components/schemas/{name}", "components": self.components}
        Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER).validate(body)


async def test_googleapiclient_drives_the_job_lifecycle(service: ServiceHarness) -> None:
    user = await service.client("user")
    dispatcher = await service.client("dispatcher")
    schemas = SchemaChecker(await fetch_openapi(service))
    users, dispatchers = await asyncio.gather(
        asyncio.to_thread(sdk_client, service, user.token), asyncio.to_thread(sdk_client, service, dispatcher.token)
    )
    body = {"job": {"script_name": "hash.py", "script_version": "main", "script_parameters": {"input": "x"}}}
    job = await call(users.jobs().create(body=body, allow_duplicate=True))
    schemas.check("Job", job)
    assert (job["kind"], job["state"], job["owner_uuid"]) == ("orvos#job", "Queued", user.user_uuid)
    assert await call(users.jobs().get(uuid=job["uuid"])) == job
    jobs = dispatchers.jobs()
    locked = await call(jobs.lock(uuid=job["uuid"]))
    assert locked["is_locked_by"] == dispatcher.user_uuid
    started = await call(jobs.start(uuid=job["uuid"], body={"script_version": "a" * 40}))
    assert started["state"] == "Running"
    finished = await call(jobs.finish(uuid=job["uuid"], body={"success": True, "output": "o"}))
    schemas.check("Job", finished)
    assert (finished["state"], finished["output"]) == ("Complete", "o")

    with pytest.raises(HttpError) as missing:
        await call(users.jobs().get(uuid=UNKNOWN_JOB))
    assert missing.value.resp.status == 404
    error = json.loads(missing.value.content)
    schemas.check("Error", error)
    assert error["errors"] == ["Path not found"]
    with pytest.raises(HttpError) as deleted:
        await call(users.jobs().delete(uuid=job["uuid"]))
    assert deleted.value.resp.status == 405


async def test_googleapiclient_reads_lists_history_and_the_ledger(service: ServiceHarness) -> None:
    user = await service.client("user")
    schemas = SchemaChecker(await fetch_openapi(service))
    created = await user.create_job()
    uuid = created.body["uuid"]
    client = await asyncio.to_thread(sdk_client, service, user.token)
    jobs = client.jobs()
    # The Arvados SDK sends array parameters as JSON text; plain googleapiclient needs it done by hand.
    listed = await call(jobs.list(filters=json.dumps([["uuid", "=", uuid]]), limit=5))
    schemas.check("JobList", listed)
    assert [item["uuid"] for item in listed["items"]] == [uuid]
    # Over 2048 characters of URL, googleapiclient sends POST + X-HTTP-Method-Override: GET: still a list.
    many = [uuid] + [f"zzzzz-8i9sb-{n:015d}" for n in range(150)]
    request = jobs.list(filters=json.dumps([["uuid", "in", many]]))
    assert len(request.uri) > 2048
    assert [item["uuid"] for item in (await call(request))["items"]] == [uuid]
    schemas.check("QueueSize", await call(jobs.queue_size()))
    schemas.check("JobList", await call(jobs.queue()))
    history = await call(jobs.events(uuid=uuid))
    schemas.check("EventList", history)
    assert [event["event_type"] for event in history["items"]] == ["submitted"]
    schemas.check("Checkpoint", await call(client.ledger().checkpoint()))
    schemas.check("PublicKey", await call(client.ledger().public_key()))


# ---------------------------------------------------------------------------------------------------------
# The OpenAPI document, and the three views of the method table agreeing.
# ---------------------------------------------------------------------------------------------------------
async def test_openapi_document_is_valid_and_has_every_method(service: ServiceHarness) -> None:
    response = await service.anonymous().get(OPENAPI_PATH)
    assert response.status == 200
    assert response.headers["Cache-Control"] == "max-age=60"
    doc = response.body
    validate(doc)
    assert doc["openapi"].startswith("3.1")
    assert doc["servers"] == [{"url": service.base_url}]
    assert set(doc["components"]["schemas"]) >= EXPECTED_SCHEMAS
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearer"] == {"type": "http", "scheme": "bearer", "description": schemes["bearer"]["description"]}
    assert (schemes["api_token"]["in"], schemes["api_token"]["name"]) == ("query", "api_token")
    for ref in refs(doc):
        section, name = ref.removeprefix("#/components/").split("/")
        assert name in doc["components"][section], ref
    operation_ids = set()
    for method in all_methods():
        operation = doc["paths"][BASE_PATH + method.path][method.http.lower()]
        operation_ids.add(operation["operationId"])
        assert {param["name"] for param in operation["parameters"]} == {param.name for param in method.parameters}
        assert ("requestBody" in operation) is (method.request is not None)
        for status in method.success_statuses:
            assert str(status) in operation["responses"]
        for status in error_statuses(method):
            error = operation["responses"][str(status)]["$ref"].split("/")[-1]
            content = doc["components"]["responses"][error]["content"]["application/json"]
            assert content["schema"] == {"$ref": "#/components/schemas/Error"}
    assert len(operation_ids) == len(all_methods())
    create = doc["paths"]["/orvos/v1/jobs"]["post"]
    assert {"201", "200", "401", "413", "415", "422", "503"} <= set(create["responses"])
    assert create["requestBody"]["content"]["application/json"]["schema"]["properties"]["job"] == {
        "$ref": "#/components/schemas/Job"
    }
    assert set(doc["paths"]["/orvos/v1/jobs/{uuid}"]["delete"]["responses"]) == {"405"}
    limit = next(p for p in doc["paths"]["/orvos/v1/jobs"]["get"]["parameters"] if p["name"] == "limit")
    assert limit["schema"] == {"type": "integer", "default": 100}
    wait = next(p for p in doc["paths"]["/orvos/v1/events"]["get"]["parameters"] if p["name"] == "wait")
    assert wait["schema"] == {"type": "number", "default": 0.0}  # fractions of a second are allowed
    current = doc["paths"]["/orvos/v1/users/current"]["get"]
    assert current["responses"]["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/User"}
    assert "401" in current["responses"]


async def test_both_documents_cover_exactly_the_routed_methods(service: ServiceHarness, settings: Settings) -> None:
    discovery = await fetch_discovery(service)
    openapi = await fetch_openapi(service)
    from_discovery = {
        (entry["httpMethod"], discovery["basePath"] + entry["path"]) for entry in discovery_entries(discovery).values()
    }
    from_openapi = {(http.upper(), path) for path, item in openapi["paths"].items() for http in item}
    assert from_discovery == from_openapi == routed_methods(settings)


def test_a_new_method_shows_up_in_both_documents() -> None:
    async def handler(request: Any) -> Any:
        raise AssertionError("never called")

    extra = Method("widgets", "spin", "POST", "widgets/{uuid}/spin", handler, "Spin a widget.",
                   (Param("uuid", "string", "The widget.", location="path", required=True),
                    Param("speed", "integer", "How fast.", default="3")),
                   request="StartRequest", response="QueueSize")  # fmt: skip
    stream = Method("widgets", "watch", "GET", "widgets/watch", handler, "Watch widgets.", response="Event",
                    response_content_type="text/event-stream")  # fmt: skip
    methods = (*all_methods(), extra, stream)
    discovery = render_discovery("http://example.org/", methods)
    entry = discovery["resources"]["widgets"]["methods"]["spin"]
    assert (entry["path"], entry["httpMethod"], entry["parameterOrder"]) == ("widgets/{uuid}/spin", "POST", ["uuid"])
    assert entry["parameters"]["speed"] == {
        "type": "integer", "description": "How fast.", "location": "query", "required": False, "default": "3"
    }  # fmt: skip
    openapi = render_openapi("http://example.org/", methods)
    validate(openapi)
    operation = openapi["paths"]["/orvos/v1/widgets/{uuid}/spin"]["post"]
    assert operation["operationId"] == "widgets_spin"
    assert [param["name"] for param in operation["parameters"]] == ["uuid", "speed"]
    assert operation["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/StartRequest"
    }
    watched = openapi["paths"]["/orvos/v1/widgets/watch"]["get"]["responses"]["200"]["content"]
    assert watched["text/event-stream"]["x-item-schema"] == {"$ref": "#/components/schemas/Event"}
    assert discovery["resources"]["widgets"]["methods"]["watch"]["description"].endswith("text/event-stream.")

    undeclared = Method("widgets", "stop", "POST", "widgets/stop", handler, "Stop.", response="Widget")
    assert undeclared_schemas((*all_methods(), undeclared)) == [("arvados.widgets.stop", "Widget")]
    # Rendered all the same (a missing schema must not take the whole document down), with a stand-in.
    discovery = render_discovery("http://example.org/", (*all_methods(), undeclared))
    assert discovery["schemas"]["Widget"]["type"] == "object"
    validate(render_openapi("http://example.org/", (*all_methods(), undeclared)))


def test_every_schema_a_method_names_is_declared() -> None:
    assert undeclared_schemas(all_methods()) == []
