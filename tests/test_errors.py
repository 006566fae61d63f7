"""Contract tests of errors (CONTRACT §7), over HTTP against the real service: one test per status.

400 malformed JSON, 401, 403, 404, 405, 412, 413, 415, 422 and 503 (the database unavailable, and the service
recovering by itself). Every error body is exactly ``{"errors": [str, ...], "error_token": "<secs>+<8 hex>"}``,
``X-Request-Id`` is echoed or generated, and no refused request writes anything (the events count is unchanged).
"""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import asyncpg

from tests.contract import (
    COMMIT,
    GENERATED_REQUEST_ID,
    assert_error,
    attributes,
    event_count,
    finish,
    lock,
    start,
    submit,
)
from tests.harness import ApiClient, Response, ServiceHarness
from tests.stream_support import SseClient, eventually

MISSING = "zzzzz-8i9sb-000000000000000"
JSON = {"Content-Type": "application/json"}


async def raw(
    client: ApiClient, method: str, path: str, body: bytes | io.BytesIO, content_type: str | None
) -> Response:
    """Send ``body`` as it is, with ``content_type`` (none at all when None)."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    return await client.request(method, path, data=body, headers=headers)


MALFORMED_JSON: list[bytes] = [
    b"{",
    b'{"job": }',
    b'{"job": {"script_name": "a.py",}}',
    b"{'job': {}}",
    b'{"job": {}} trailing',
    b'{"job": {"script_name": "\xff\xfe"}}',  # invalid UTF-8
    b"\xff\xfe{\x00}\x00",
    b'{"job": {"script_parameters": {"x": NaN}}}',
    b'{"job": {"priority": 1e999}}',
    b'{"job": {"script_name": "\\ud800"}}',
    b"\xef\xbb\xbf{}",  # a byte order mark
    b"[" * 100_000 + b"]" * 100_000,  # nested beyond any decoder's limit
    b'{"a":' * 5_000 + b"1" + b"}" * 5_000,
    # Well-formed JSON that is not an object.
    b"[]",
    b'[{"job": {}}]',
    b'"job"',
    b"null",
    b"42",
    b"true",
]


async def test_400_for_malformed_json(service: ServiceHarness) -> None:
    user = await service.client("user")
    dispatcher = await service.client("dispatcher")
    job = await submit(user)
    uuid = job["uuid"]
    await lock(dispatcher, uuid)
    before = await event_count(service)
    endpoints = [
        (user, "POST", "jobs"),
        (user, "PATCH", f"jobs/{uuid}"),
        (user, "PUT", f"jobs/{uuid}"),
        (user, "POST", f"jobs/{uuid}/cancel"),
        (dispatcher, "POST", f"jobs/{uuid}/unlock"),
        (dispatcher, "POST", f"jobs/{uuid}/start"),
        (dispatcher, "POST", f"jobs/{uuid}/finish"),
    ]
    for client, method, path in endpoints:
        for body in MALFORMED_JSON:
            assert_error(await raw(client, method, path, body, "application/json"), 400)
    # A create or an update needs a body at all.
    for method, path in (("POST", "jobs"), ("PATCH", f"jobs/{uuid}"), ("PUT", f"jobs/{uuid}")):
        assert_error(await raw(user, method, path, b"", "application/json"), 400)
        assert_error(await raw(user, method, path, b"  \n", "application/json"), 400)
    assert await event_count(service) == before
    assert (await user.get(f"jobs/{uuid}")).body["is_locked_by"] == dispatcher.user_uuid


async def test_401_without_a_valid_token(service: ServiceHarness) -> None:
    user = await service.client("user")
    job = await submit(user)
    expired = await service.token_for(user, expires_in=0.01)
    expires_at = await service.pool.fetchval("SELECT max(expires_at) FROM api_tokens")
    now = await service.pool.fetchval("SELECT clock_timestamp()")
    await asyncio.sleep(max(0.0, (expires_at - now).total_seconds()) + 0.001)  # until the token's deadline
    before = await event_count(service)
    for client in (service.anonymous(), service.with_token("unknown"), expired):
        assert_error(await client.get(f"jobs/{job['uuid']}"), 401, "Not logged in")
        assert_error(await client.post("jobs", json={"job": attributes()}), 401, "Not logged in")
        # Authentication comes first: even a malformed body or uuid is 401 to a stranger.
        assert_error(await raw(client, "POST", "jobs", b"{", "application/json"), 401)
        assert_error(await client.get("jobs/nonsense"), 401)
    assert await event_count(service) == before


async def test_403_when_not_allowed(service: ServiceHarness) -> None:
    user = await service.client("user")
    auditor = await service.client("auditor")
    read_only = await service.token_for(user, read_only=True)
    job = await submit(user)
    before = await event_count(service)
    assert_error(await read_only.post(f"jobs/{job['uuid']}/cancel"), 403, "read-only")
    assert_error(await read_only.post("jobs", json={"job": attributes()}), 403)
    assert_error(await auditor.post(f"jobs/{job['uuid']}/cancel"), 403, "auditor")
    assert_error(await user.post(f"jobs/{job['uuid']}/lock"), 403, "user")
    assert await event_count(service) == before


MALFORMED_UUIDS = [
    "nonsense",
    "zzzzz-tpzed-000000000000000",  # a user's uuid
    "ZZZZZ-8I9SB-000000000000000",
    "zzzzz-8i9sb-00000000000000",
    "zzzzz-8i9sb-0000000000000000",
    "zzzzz-8i9sb-00000000000000_",
    "zzzzz-8i9sb-00000000000000%00",
    "zzzzz-8i9sb-00000000000000%C3%A9",
    "zzzzz-8i9sb-00000000000000%0A",
    "%00",
]


async def test_404_for_unknown_jobs_paths_and_malformed_uuids(service: ServiceHarness) -> None:
    user = await service.client("user")
    dispatcher = await service.client("dispatcher")
    job = await submit(user)
    before = await event_count(service)
    for uuid in (MISSING, *MALFORMED_UUIDS):
        assert_error(await user.get(f"jobs/{uuid}"), 404, "Path not found")
        assert_error(await user.request("PATCH", f"jobs/{uuid}", json={"job": {"priority": 1}}), 404)
        assert_error(await user.post(f"jobs/{uuid}/cancel"), 404)
        assert_error(await dispatcher.post(f"jobs/{uuid}/lock"), 404)
        assert_error(await dispatcher.post(f"jobs/{uuid}/finish", json={"success": True}), 404)
    unknown_paths = [
        "/orvos/v1/nope",
        "/orvos/v1/job",
        f"/orvos/v1/jobs/{job['uuid']}/nope",
        f"/orvos/v1/jobs/{job['uuid']}/lock/again",
        "/orvos/v2/jobs",
        "/nothing",
        "/",
    ]
    for path in unknown_paths:
        for client in (user, service.anonymous()):
            assert_error(await client.get(path), 404, "Path not found")
            assert_error(await client.post(path, json={}), 404)
    assert await event_count(service) == before


async def test_405_for_a_method_a_path_does_not_have(service: ServiceHarness) -> None:
    user = await service.client("user")
    job = await submit(user)
    uuid = job["uuid"]
    before = await event_count(service)
    for client in (user, service.admin):
        response = await client.request("DELETE", f"jobs/{uuid}")
        assert_error(response, 405, "cancel")
        assert response.headers["Allow"]
    for method, path in (("DELETE", "jobs"), ("PUT", "jobs"), ("POST", f"jobs/{uuid}"), ("GET", f"jobs/{uuid}/lock")):
        response = await user.request(method, path, json={} if method != "GET" else None)
        assert_error(response, 405)
        assert method not in response.headers["Allow"]
    assert (await user.get(f"jobs/{uuid}")).status == 200
    assert await event_count(service) == before


async def test_412_when_if_match_does_not_match(service: ServiceHarness) -> None:
    user = await service.client("user")
    job = await submit(user)
    before = await event_count(service)
    stale = {"If-Match": '"x"'}
    assert_error(await user.request("PATCH", f"jobs/{job['uuid']}", json={"job": {"priority": 1}}, headers=stale), 412)
    assert_error(await user.post(f"jobs/{job['uuid']}/cancel", headers={"If-Match": '"x"'}), 412)
    assert await event_count(service) == before


def _streamed(value: Any) -> io.BytesIO:
    """``value`` as a JSON body aiohttp streams (large raw bytes make the client warn about the event loop)."""
    return io.BytesIO(json.dumps(value).encode())


async def test_413_for_a_body_over_1_mib(service: ServiceHarness) -> None:
    user = await service.client("user")
    dispatcher = await service.client("dispatcher")
    job = await submit(user)
    uuid = job["uuid"]
    await start(dispatcher, uuid)
    before = await event_count(service)
    mib = 1024 * 1024
    too_big: list[tuple[ApiClient, str, str, Any]] = [
        (user, "POST", "jobs", {"job": attributes(script_parameters={"blob": "x" * mib})}),
        (user, "PUT", f"jobs/{uuid}", {"job": {"script_parameters": {"blob": "x" * mib}}}),
        (user, "POST", f"jobs/{uuid}/cancel", {"padding": "x" * mib}),
        (dispatcher, "POST", f"jobs/{uuid}/finish", {"success": True, "log": "x" * (mib + 1)}),
    ]
    for client, method, path, body in too_big:
        assert_error(await raw(client, method, path, _streamed(body), "application/json"), 413)
    assert await event_count(service) == before
    # Just under the limit is a body like any other (here: too long a log, a 422, not a 413).
    near = {"success": True, "log": "x" * (mib - 100)}
    assert_error(await raw(dispatcher, "POST", f"jobs/{uuid}/finish", _streamed(near), "application/json"), 422, "log")
    assert await event_count(service) == before


async def test_415_for_a_body_that_is_not_json(service: ServiceHarness) -> None:
    user = await service.client("user")
    dispatcher = await service.client("dispatcher")
    job = await submit(user)
    uuid = job["uuid"]
    await start(dispatcher, uuid)
    before = await event_count(service)
    body = b'{"job": {"script_name": "a.py", "script_version": "main", "script_parameters": {}}}'
    not_json = ("text/plain", "application/x-www-form-urlencoded", "application/xml", "multipart/form-data", None)
    for content_type in not_json:
        assert_error(await raw(user, "POST", "jobs", body, content_type), 415, "application/json")
        assert_error(await raw(user, "PATCH", f"jobs/{uuid}", b'{"job": {"priority": 1}}', content_type), 415)
        assert_error(await raw(dispatcher, "POST", f"jobs/{uuid}/finish", b'{"success": true}', content_type), 415)
    assert await event_count(service) == before
    # A charset parameter is still JSON.
    ok = await raw(user, "POST", "jobs?allow_duplicate=true", body, "application/json; charset=utf-8")
    assert ok.status == 201, ok.body


def _create(**job: Any) -> dict[str, Any]:
    return {"job": attributes(**job)}


def _nested(levels: int) -> Any:
    """A value ``levels`` arrays deep."""
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


INVALID_CREATES: list[tuple[dict[str, Any], str]] = [
    # (create body, what the message must name)
    (_create(script_name=5), "script_name"),
    (_create(script_name=""), "script_name"),
    (_create(script_name="a\u0000b"), "script_name"),
    (_create(script_name="x" * 5000), "script_name"),
    (_create(script_version=["main"]), "script_version"),
    (_create(script_parameters=[1, 2]), "script_parameters"),
    (_create(script_parameters="x=1"), "script_parameters"),
    (_create(script_parameters={"x": "a\u0000"}), "script_parameters"),
    (_create(script_parameters={"a\u0000": 1}), "script_parameters"),
    (_create(script_parameters={"deep": _nested(99)}), ""),  # deep, but not too deep: accepted
    (_create(script_parameters={"deep": _nested(100)}), "script_parameters"),
    (_create(script_parameters={"deep": _nested(900)}), "script_parameters"),
    (_create(priority="high"), "priority"),
    (_create(priority=1.5), "priority"),
    (_create(priority=True), "priority"),
    (_create(priority=2**31), "priority"),
    (_create(priority=None), "priority"),
    (_create(resource_limits=[]), "resource_limits"),
    (_create(resource_limits={"gpus": 1}), "gpus"),
    (_create(resource_limits={"min_nodes": -1}), "min_nodes"),
    (_create(resource_limits={"max_nodes": "2"}), "max_nodes"),
    (_create(resource_limits={"min_ram_per_task": 1.5}), "min_ram_per_task"),
    (_create(resource_limits={"max_tasks_per_node": True}), "max_tasks_per_node"),
    (_create(resource_limits={"min_ram_per_node": 2**64}), "min_ram_per_node"),
    (_create(resource_limits={"min_nodes": 3, "max_nodes": 2}), "min_nodes"),
    (_create(submit_id=5), "submit_id"),
    (_create(submit_id=""), "submit_id"),
    (_create(colour="red"), "colour"),
    (_create(state="Queued"), "state"),
    ({"job": "hash.py"}, "job"),
    ({"job": None}, "job"),
    ({}, "No job hash"),
    ({"colour": "red"}, "colour"),
]


INVALID_UPDATES: list[tuple[dict[str, Any], str]] = [
    # (update changes, what the message must name)
    ({"script_name": 5}, "script_name"),
    ({"script_name": None}, "script_name"),
    ({"script_version": ""}, "script_version"),
    ({"script_parameters": None}, "script_parameters"),
    ({"script_parameters": [1]}, "script_parameters"),
    ({"priority": "1"}, "priority"),
    ({"priority": -(2**31) - 1}, "priority"),
    ({"resource_limits": None}, "resource_limits"),
    ({"resource_limits": {"min_nodes": 2, "max_nodes": 1}}, "min_nodes"),
    ({"resource_limits": {"max_nodes": -5}}, "max_nodes"),
    ({"resource_limits": {"cpus": 2}}, "cpus"),
    ({"colour": "red"}, "colour"),
    ({"submit_id": "new"}, "submit_id"),
]


async def test_422_for_invalid_attributes(service: ServiceHarness) -> None:
    user = await service.client("user")
    for body, named in INVALID_CREATES:
        response = await user.post("jobs", json=body, params={"allow_duplicate": "true"})
        if named:
            assert_error(response, 422, named)
        else:
            assert response.status == 201, response.body
    assert await event_count(service) == 1
    job = await submit(user)
    for changes, named in INVALID_UPDATES:
        for method in ("PUT", "PATCH"):
            assert_error(await user.request(method, f"jobs/{job['uuid']}", json={"job": changes}), 422, named)
    for body in ({"job": 5}, {"job": [changes]}):
        assert_error(await user.request("PATCH", f"jobs/{job['uuid']}", json=body), 422, "job")
    assert await event_count(service) == 2
    assert (await user.get(f"jobs/{job['uuid']}")).body == job


async def test_422_for_illegal_transitions_and_conflicts(service: ServiceHarness) -> None:
    user = await service.client("user")
    dispatcher = await service.client("dispatcher")
    other_dispatcher = await service.client("dispatcher")
    queued = await submit(user, script_parameters={"n": 1})
    locked = await submit(user, script_parameters={"n": 2})
    await lock(dispatcher, locked["uuid"])
    running = await submit(user, script_parameters={"n": 3})
    await start(dispatcher, running["uuid"])
    complete = await submit(user, script_parameters={"n": 4})
    await finish(dispatcher, complete["uuid"])
    await submit(user, submit_id="taken")
    before = await event_count(service)
    refused: list[tuple[ApiClient, str, str, Any, str]] = [
        (dispatcher, "POST", f"jobs/{queued['uuid']}/start", {"script_version": COMMIT}, "locked"),
        (dispatcher, "POST", f"jobs/{queued['uuid']}/unlock", None, "not locked"),
        (dispatcher, "POST", f"jobs/{queued['uuid']}/finish", {"success": True}, "never started"),
        (other_dispatcher, "POST", f"jobs/{locked['uuid']}/lock", None, "already locked"),  # the lock conflict
        (other_dispatcher, "POST", f"jobs/{locked['uuid']}/unlock", None, "locked by"),
        (dispatcher, "POST", f"jobs/{running['uuid']}/lock", None, "Running"),
        (dispatcher, "POST", f"jobs/{running['uuid']}/start", {"script_version": COMMIT}, "Running"),
        (dispatcher, "POST", f"jobs/{running['uuid']}/unlock", None, "Running"),
        (user, "PATCH", f"jobs/{running['uuid']}", {"job": {"script_name": "b.py"}}, "Queued and unlocked"),
        (user, "PATCH", f"jobs/{locked['uuid']}", {"job": {"script_version": "dev"}}, "Queued and unlocked"),
        (user, "POST", f"jobs/{complete['uuid']}/cancel", None, "Complete"),
        (dispatcher, "POST", f"jobs/{complete['uuid']}/finish", {"success": False}, "already finished"),
        (user, "PATCH", f"jobs/{complete['uuid']}", {"job": {"priority": 5}}, "Complete"),
        (user, "POST", "jobs", {"job": attributes(submit_id="taken", priority=4)}, "submit_id"),  # submit_id conflict
    ]
    for client, method, path, body, mentioned in refused:
        assert_error(await client.request(method, path, json=body), 422, mentioned)
    assert await event_count(service) == before


async def _wait_for_no_backends(admin: asyncpg.Connection, database: str) -> None:
    """Backends exit asynchronously after pg_terminate_backend's signal: wait (up to 10 s) until none is left."""
    for _ in range(1000):
        if not await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = $1", database):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"backends of {database} still running 10 s after being terminated")


async def test_503_with_retry_after_while_the_database_is_unavailable(service: ServiceHarness, server_dsn: str) -> None:
    user = await service.client("user")
    dispatcher = await service.client("dispatcher")
    never_used = await service.client("user")  # its token is not in the service's cache
    job = await submit(user)
    uuid = job["uuid"]
    name = await service.pool.fetchval("SELECT current_database()")
    before = await event_count(service)
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
        await _wait_for_no_backends(admin, name)
        requests = [
            (user, "GET", f"jobs/{uuid}", None),
            (user, "POST", "jobs", {"job": attributes(script_parameters={"during": "outage"})}),
            (user, "PATCH", f"jobs/{uuid}", {"job": {"priority": 3}}),
            (dispatcher, "POST", f"jobs/{uuid}/lock", None),
            (never_used, "GET", f"jobs/{uuid}", None),
            (user, "GET", "jobs", None),
        ]
        for _ in range(3):  # the first attempts find dead connections, the later ones none at all
            for client, method, path, body in requests:
                response = await client.request(method, path, json=body)
                assert_error(response, 503)
                assert response.headers["Retry-After"].isdigit()
                assert int(response.headers["Retry-After"]) >= 1
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()
    # Back: the very next requests succeed, with no restart and nothing written during the outage.
    got = await user.get(f"jobs/{uuid}")
    assert got.status == 200, got.body
    assert got.body == job
    assert await event_count(service) == before
    created = await user.post("jobs", json={"job": attributes(script_parameters={"after": "outage"})})
    assert created.status == 201, created.body
    locked = await dispatcher.post(f"jobs/{uuid}/lock")
    assert locked.status == 200, locked.body
    assert (await never_used.get(f"jobs/{uuid}")).status == 404
    assert await event_count(service) == before + 2


async def test_an_event_stream_open_when_the_database_goes_away_ends_cleanly(
    service: ServiceHarness, server_dsn: str
) -> None:
    auditor = await service.client("auditor")
    await submit(await service.client("user"))
    name = await service.pool.fetchval("SELECT current_database()")
    sse = SseClient(service.session, service.base_url + "/orvos/v1/events/stream", auditor.token)
    sse.tolerate_refusals = True
    reading = asyncio.create_task(sse.run_once(max_seconds=10))
    await eventually(lambda: bool(sse.items), "the stream open and sending")
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
        await _wait_for_no_backends(admin, name)
        # Its next read fails and the stream ends, properly: the 503 it can no longer send (the stream has begun)
        # is not written into it, where no client could parse it and the connection was left hanging.
        assert await asyncio.wait_for(reading, timeout=5) == "eof"
        # Reconnecting while the database is away: a 503 with Retry-After, not a stream that ends at once.
        assert await sse.run_once(max_seconds=5) == "refused"
        status, headers, body = sse.refusals[-1]
        assert_error(Response(status, headers, body), 503)
        assert headers["Retry-After"].isdigit()
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()
    # Back: it resumes after its Last-Event-ID and gets what is new, once.
    await submit(await service.client("user"))
    assert await sse.run_once(max_events=1, max_seconds=10) == "count"
    assert [item["position"] for item in sse.items] == [1, 2]


async def test_x_request_id_is_echoed_or_generated(service: ServiceHarness) -> None:
    user = await service.client("user")
    created = await user.post(
        "jobs", json={"job": attributes()}, params={"allow_duplicate": "1"}, headers={"X-Request-Id": "req-client-1"}
    )
    assert created.status == 201
    assert created.headers["X-Request-Id"] == "req-client-1"
    recorded = await service.pool.fetchval("SELECT request_id FROM events WHERE job_uuid = $1", created.body["uuid"])
    assert recorded == "req-client-1"
    responses = [
        (await user.get(f"jobs/{MISSING}", headers={"X-Request-Id": "abc.DEF_123:4/5"}), "abc.DEF_123:4/5"),
        (await user.get(f"jobs/{MISSING}", headers={"X-Request-Id": "req-missing"}), "req-missing"),
        (await service.anonymous().get(f"jobs/{MISSING}", headers={"X-Request-Id": "req-anon"}), "req-anon"),
        (await user.request("DELETE", f"jobs/{MISSING}", headers={"X-Request-Id": "req-405"}), "req-405"),
        (await user.get("/nothing", headers={"X-Request-Id": "req-404"}), "req-404"),
    ]
    for response, expected in responses:
        assert response.headers["X-Request-Id"] == expected
    generated = [
        await user.get(f"jobs/{created.body['uuid']}"),
        await user.get(f"jobs/{MISSING}"),
        await user.get(f"jobs/{MISSING}", headers={"X-Request-Id": "x" * 500}),  # too long to echo
        await user.get(f"jobs/{MISSING}", headers={"X-Request-Id": "bad id\twith spaces"}),
        await raw(user, "POST", "jobs", b"{", "application/json"),
    ]
    ids = [response.headers["X-Request-Id"] for response in generated]
    assert all(GENERATED_REQUEST_ID.fullmatch(request_id) for request_id in ids), ids
    assert len(set(ids)) == len(ids)
