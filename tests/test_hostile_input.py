"""Hostile input over HTTP against the real service: injection attempts, oversized and deeply nested bodies,
invalid UTF-8, numbers out of range, bad uuids, wrong content types, odd JSON (CONTRACT §3, §7).

Every refusal is a 4xx with an Orvos error body and writes nothing (the event count is unchanged); every
injection attempt either is refused or finds exactly what the value means literally, and the tables are
intact afterwards. Cases that need bytes no HTTP client library would send go over a raw socket.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

import pytest

from tests.contract import COMMIT, assert_error, attributes, event_count, job_count, lock, start, submit
from tests.harness import ApiClient, Response, ServiceHarness, unexpected_errors

MISSING: Final = "zzzzz-8i9sb-000000000000000"
JSON: Final = "application/json"
INJECTIONS: Final = (
    "uuid; DROP TABLE events",
    "x'; DROP TABLE events; --",
    "' OR '1'='1",
    '" OR ""="',
    "\\",
    "\\'; SELECT pg_sleep(10); --",
    "%' OR 1=1 --",
    "ünïcødé ☃ 𝄞",
    "$1",
    "uuid) OR (1=1",
)


@dataclass
class World:
    """Two users with jobs, a dispatcher, an auditor; the counts a refusal must leave as they are."""

    service: ServiceHarness
    alice: ApiClient
    bob: ApiClient
    dispatcher: ApiClient
    auditor: ApiClient
    alice_jobs: list[str]
    bob_job: str

    async def refused(
        self,
        client: ApiClient,
        method: str,
        path: str,
        status: int | tuple[int, ...],
        *,
        body: bytes | None = None,
        content_type: str | None = JSON,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        """Send the request; assert an Orvos error with ``status`` and that nothing was written."""
        before = await event_count(self.service)
        all_headers = dict(headers or {})
        if content_type is not None and body is not None:
            all_headers["Content-Type"] = content_type
        response = await client.request(method, path, data=body, params=params, headers=all_headers)
        assert_error(response, response.status if isinstance(status, tuple) and response.status in status else status)
        assert await event_count(self.service) == before, (method, path, response.body)
        return response


@pytest.fixture(autouse=True)
async def _catch_all_never_reached(service: ServiceHarness) -> AsyncIterator[None]:
    """After every test: no hostile input reached the error middleware's catch-all. A 422 "unexpected error"
    passes ``assert_error`` (it is a 4xx Orvos body), so the counter is what tells a handled refusal from a bug."""
    yield
    assert await unexpected_errors(service.session, service.base_url) == 0, "an input reached the catch-all"


@pytest.fixture
async def world(service: ServiceHarness) -> World:
    """Jobs of two users (one locked, one started) and the principals to act on them."""
    alice, bob = await service.client("user", name="alice"), await service.client("user", name="bob")
    dispatcher, auditor = await service.client("dispatcher"), await service.client("auditor")
    alice_jobs = [(await submit(alice, script_parameters={"n": n}))["uuid"] for n in range(3)]
    await lock(dispatcher, alice_jobs[1])
    await start(dispatcher, alice_jobs[2])
    bob_job = (await submit(bob, script_name="bob.py"))["uuid"]
    return World(service, alice, bob, dispatcher, auditor, alice_jobs, bob_job)


async def raw_http(service: ServiceHarness, head: bytes, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (``head`` is the request line and headers, without the blank line)."""
    port = int(service.base_url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + b"\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
        async with asyncio.timeout(10):
            answer = await reader.read()
    finally:
        writer.close()
    header_block, _, payload = answer.partition(b"\r\n\r\n")
    status_line, *lines = header_block.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, payload


def _auth(client: ApiClient) -> bytes:
    return b"Authorization: Bearer " + (client.token or "").encode()


def assert_raw_error(status: int, headers: dict[str, str], payload: bytes, expected: int) -> None:
    """A raw response is an Orvos error with ``expected``."""
    assert status == expected, (status, payload)
    body = json.loads(payload)
    assert set(body) == {"errors", "error_token"}, body
    assert headers.get("x-request-id"), headers


# ---------------------------------------------------------------------------------------------------------
# Injection through filters, where, order and select.
# ---------------------------------------------------------------------------------------------------------
async def _tables_intact(world: World, events: int, jobs: int) -> None:
    pool = world.service.pool
    for table in ("events", "jobs", "event_positions", "api_tokens", "users"):
        assert await pool.fetchval("SELECT to_regclass($1)", table) is not None, table
    assert await event_count(world.service) == events
    assert await job_count(world.service) == jobs
    everything = await world.auditor.get("jobs")
    assert everything.status == 200
    assert everything.body["items_available"] == 4


async def test_injection_through_list_parameters_is_refused_or_matches_literally(world: World) -> None:
    events, jobs = await event_count(world.service), await job_count(world.service)
    for value in INJECTIONS:
        # As an attribute name, an operator, an order key or a selected attribute: never a known name, so 422.
        for params in (
            {"filters": json.dumps([[value, "=", "x"]])},
            {"filters": json.dumps([["uuid", value, "x"]])},
            {"where": json.dumps({value: "x"})},
            {"order": json.dumps([value])},
            {"order": json.dumps([f"uuid {value}"])},
            {"select": json.dumps(["uuid", value])},
        ):
            for path in ("jobs", "jobs/queue"):
                await world.refused(world.alice, "GET", path, 422, params=params)
        # As plain-text order (a leading quote makes it JSON text, malformed here: 400).
        await world.refused(world.alice, "GET", "jobs", (400, 422), params={"order": value})
        # As an operand: a literal value that no job has, so an empty page (alice sees only her own jobs).
        for filters in (
            [["uuid", "=", value]],
            [["script_name", "like", value]],
            [["script_name", "ilike", f"%{value}%"]],
            [["owner_uuid", "in", [value, "x"]]],
            [["script_version", "<", value], ["script_version", ">", value]],
            [["script_parameters", "=", {value: value}]],
        ):
            got = await world.alice.get("jobs", params={"filters": json.dumps(filters)})
            if got.status == 422 and filters[0][1] == "like" and value.endswith("\\"):
                assert_error(got, 422)  # a pattern ending in its escape character is no pattern at all
                continue
            assert got.status == 200, (filters, got.body)
            assert got.body["items"] == [], filters
        got = await world.alice.get("jobs", params={"where": json.dumps({"script_name": value})})
        assert (got.status, got.body["items"]) == (200, []), value
        # != of a literal matches every job of alice's, and still none of bob's.
        got = await world.alice.get("jobs", params={"filters": json.dumps([["owner_uuid", "!=", value]])})
        assert sorted(item["uuid"] for item in got.body["items"]) == sorted(world.alice_jobs), value
        got = await world.auditor.get("events", params={"filters": json.dumps([["job_uuid", "=", value]])})
        assert (got.status, got.body["items"]) == (200, []), value
    await _tables_intact(world, events, jobs)


async def test_nul_in_any_structured_parameter_is_422(world: World) -> None:
    """Regression: a NUL in an event stream filter reached PostgreSQL, which refused it (a 422 only by way of
    the catch-all). It is now refused up front, for every structured parameter alike."""
    nul = "a\u0000b"
    cases = [
        ("jobs", {"filters": json.dumps([["uuid", "=", nul]])}),
        ("jobs", {"filters": json.dumps([["uuid", "in", ["x", nul]]])}),
        ("jobs", {"filters": json.dumps([["script_parameters", "=", {nul: 1}]])}),
        ("jobs", {"where": json.dumps({"uuid": nul})}),
        ("jobs", {"order": json.dumps([f"uuid{nul}"])}),
        ("jobs", {"select": json.dumps([nul])}),
        ("jobs/queue", {"filters": json.dumps([["script_name", "like", nul]])}),
        ("events", {"filters": json.dumps([["job_uuid", "=", nul]])}),
        ("events", {"filters": json.dumps([["event_type", "in", [nul]]])}),
        ("events/stream", {"filters": json.dumps([["job_uuid", "not in", [nul]]])}),
    ]
    for path, params in cases:
        response = await world.refused(world.auditor, "GET", path, 422, params=params)
        assert "unexpected" not in response.errors[0], (path, response.body)


# ---------------------------------------------------------------------------------------------------------
# Size and depth.
# ---------------------------------------------------------------------------------------------------------
def _create_body(**job: Any) -> bytes:
    return json.dumps({"job": attributes(**job)}).encode()


def _deep(depth: int, kind: str) -> str:
    return "[" * depth + "1" + "]" * depth if kind == "array" else '{"a":' * depth + "1" + "}" * depth


async def test_oversized_bodies_are_413(world: World) -> None:
    padding = {"pad": "x" * (1024 * 1024)}
    uuid = world.alice_jobs[0]
    for method, path in (("POST", "jobs"), ("PATCH", f"jobs/{uuid}"), ("POST", f"jobs/{uuid}/cancel")):
        await world.refused(world.alice, method, path, 413, body=_create_body(script_parameters=padding))
    # Chunked, so no Content-Length announces the size: still cut off at 1 MiB.
    before = await event_count(world.service)
    chunk = b" " * 65536
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(17)) + b"0\r\n\r\n"
    head = b"POST /orvos/v1/jobs HTTP/1.1\r\n" + _auth(world.alice) + b"\r\nContent-Type: application/json"
    assert_raw_error(*await raw_http(world.service, head + b"\r\nTransfer-Encoding: chunked", chunks), 413)
    assert await event_count(world.service) == before


async def test_compressed_bodies_are_415_and_never_inflated(world: World) -> None:
    # A valid job, gzip-compressed: the old server inflated it (on the event loop) and created the job.
    body = gzip.compress(_create_body())
    for encoding in ("gzip", "deflate", "br"):
        response = await world.refused(
            world.alice, "POST", "jobs", 415, body=body, headers={"Content-Encoding": encoding}
        )
        assert encoding in response.body["errors"][0], response.body
    # Not gzip at all: still the same refusal, decided from the header before any byte is decoded.
    await world.refused(world.alice, "POST", "jobs", 415, body=b"not gzip", headers={"Content-Encoding": "gzip"})


async def test_a_body_announced_over_the_limit_is_413_before_it_is_sent(world: World) -> None:
    # The body never comes: only an answer decided from Content-Length can arrive within the timeout.
    before = await event_count(world.service)
    head = b"POST /orvos/v1/jobs HTTP/1.1\r\n" + _auth(world.alice) + b"\r\nContent-Type: application/json"
    port = int(world.service.base_url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + b"\r\nHost: 127.0.0.1\r\nContent-Length: 2097152\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(10):
            header_block = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            status_line, *lines = header_block.strip().split("\r\n")
            headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
            payload = await reader.readexactly(int(headers["content-length"]))
    finally:
        writer.close()
    assert_raw_error(int(status_line.split()[1]), headers, payload, 413)
    assert await event_count(world.service) == before


async def test_deep_nesting_never_crashes_the_server(world: World) -> None:
    uuid = world.alice_jobs[0]
    for kind in ("array", "object"):
        for depth in (1000, 100_000):
            deep = _deep(depth, kind)
            bodies = [
                (
                    "POST",
                    "jobs",
                    '{"job": {"script_name": "a", "script_version": "b", "script_parameters": {"x": %s}}}',
                ),
                ("PATCH", f"jobs/{uuid}", '{"job": {"script_parameters": {"x": %s}}}'),
                ("POST", f"jobs/{world.alice_jobs[2]}/finish", '{"success": true, "output": %s}'),
                ("POST", "jobs", '{"filters": [["script_parameters", "=", %s]]}'),
            ]
            for method, path, template in bodies:
                client = world.dispatcher if path.endswith("finish") else world.alice
                headers = {"X-HTTP-Method-Override": "GET"} if "filters" in template else None
                await world.refused(client, method, path, 400, body=(template % deep).encode(), headers=headers)
        # In the query string: 1000 levels of arrays fit in a URL, and are beyond the decoder's depth (400);
        # 300 levels decode, and are refused for their shape.
        too_deep = {"array": 400, "object": 422}[kind]
        query_depth = 1000 if kind == "array" else 300
        for name in ("filters", "where", "order", "select"):
            await world.refused(world.alice, "GET", "jobs", too_deep, params={name: _deep(query_depth, kind)})
            await world.refused(world.alice, "GET", "jobs", 422, params={name: _deep(300, kind)})
        await world.refused(world.auditor, "GET", "events", too_deep, params={"filters": _deep(query_depth, kind)})
        await world.refused(world.auditor, "GET", "events", 422, params={"filters": _deep(300, kind)})
    # Within the decoder's reach but beyond what parameters may nest (100 levels): refused by validation.
    parameters = {"x": json.loads(_deep(150, "object"))}
    await world.refused(world.alice, "POST", "jobs", 422, body=_create_body(script_parameters=parameters))
    jsonb = json.dumps([["script_parameters", "=", json.loads(_deep(300, "object"))]])
    got = await world.alice.get("jobs", params={"filters": jsonb})  # a deep operand is just a value
    assert (got.status, got.body["items"]) == (200, [])


async def test_oversized_request_lines_and_headers_are_400(world: World) -> None:
    """aiohttp's HTTP parser refuses these before the application sees them (its own plain-text 400).

    No middleware or signal runs for them, and aiohttp 3.14 has no public hook to render that response
    (aio-libs/aiohttp#3287, #6463 are open): only overriding private runner and protocol methods would, so
    the status is what is asserted.
    """
    before = await event_count(world.service)
    long_url = b"GET /orvos/v1/jobs?filters=" + b"a" * 10_000 + b" HTTP/1.1\r\n" + _auth(world.alice)
    long_header = b"GET /orvos/v1/jobs HTTP/1.1\r\n" + _auth(world.alice) + b"\r\nX-Long: " + b"a" * 10_000
    for head in (long_url, long_header):
        status, _, _ = await raw_http(world.service, head)
        assert status == 400
    assert await event_count(world.service) == before


# ---------------------------------------------------------------------------------------------------------
# Invalid UTF-8 and other bytes.
# ---------------------------------------------------------------------------------------------------------
async def test_invalid_utf8_in_body_query_and_headers(world: World) -> None:
    uuid = world.alice_jobs[0]
    for method, path in (("POST", "jobs"), ("PATCH", f"jobs/{uuid}"), ("POST", f"jobs/{uuid}/cancel")):
        body = b'{"job": {"script_name": "\xff\xfe", "script_version": "main", "script_parameters": {}}}'
        await world.refused(world.alice, method, path, 400, body=body)
    before = await event_count(world.service)
    # Percent-encoded invalid UTF-8 in structured parameters: not JSON text.
    for name in ("filters", "where", "order", "select"):
        head = b"GET /orvos/v1/jobs?" + name.encode() + b"=%5B%22%FF%FE%22%5D HTTP/1.1\r\n" + _auth(world.alice)
        status, headers, payload = await raw_http(world.service, head)
        assert status in (400, 422), (name, payload)
        assert_raw_error(status, headers, payload, status)
    # Raw bytes in the URL: the HTTP parser refuses them.
    for target in (b"/orvos/v1/jobs?filters=\xff", b"/orvos/v1/jobs/\xff\xfe"):
        status, _, _ = await raw_http(world.service, b"GET " + target + b" HTTP/1.1\r\n" + _auth(world.alice))
        assert status == 400
    # In headers. Regressions: a token with invalid UTF-8 reached the token hash and failed there (a 422 by
    # way of the catch-all), now simply an unknown token; an If-Match with invalid UTF-8 was quoted in the 412's
    # message, whose encoding then failed: a 500 from aiohttp itself, now the 412.
    cases = [
        (b"GET /orvos/v1/jobs HTTP/1.1\r\nAuthorization: Bearer \xff\xfe", 401),
        (b"GET /orvos/v1/jobs HTTP/1.1\r\nAuthorization: OAuth2 \xc3\x28" + (world.alice.token or "").encode(), 401),
        (b"GET /orvos/v1/jobs?api_token=%FF%FE HTTP/1.1", 401),
        (b"GET /orvos/v1/jobs?api_token=%ED%A0%80 HTTP/1.1", 401),  # an encoded surrogate
        (b"PATCH /orvos/v1/jobs/" + uuid.encode() + b' HTTP/1.1\r\nIf-Match: "\xff"\r\n' + _auth(world.alice), 412),
    ]
    for head, expected in cases:
        body = b'{"job": {"priority": 5}}' if head.startswith(b"PATCH") else b""
        if body:
            head += b"\r\nContent-Type: application/json\r\nContent-Length: %d" % len(body)
        status, headers, payload = await raw_http(world.service, head, body)
        assert_raw_error(status, headers, payload, expected)
        assert b"unexpected" not in payload, payload
    # A request id that is not sane is replaced, not echoed.
    status, headers, _ = await raw_http(
        world.service, b"GET /orvos/v1/jobs HTTP/1.1\r\nX-Request-Id: \xff\xfe\r\n" + _auth(world.alice)
    )
    assert status == 200
    assert headers["x-request-id"].startswith("req-")
    assert await event_count(world.service) == before


# ---------------------------------------------------------------------------------------------------------
# Numbers.
# ---------------------------------------------------------------------------------------------------------
async def test_numbers_out_of_range_or_of_the_wrong_kind(world: World) -> None:
    uuid = world.alice_jobs[0]
    for value in (2**64, -(2**64), 2**31, -(2**31) - 1, 1.0, 1.5, 1e300, "1", True, None, [1], {"a": 1}):
        await world.refused(world.alice, "POST", "jobs", 422, body=_create_body(priority=value))
        await world.refused(
            world.alice, "PATCH", f"jobs/{uuid}", 422, body=json.dumps({"job": {"priority": value}}).encode()
        )
        if value not in (None, 2**31):  # min_nodes may exceed 32 bits; it must still be a non-negative int64
            limits = {"resource_limits": {"min_nodes": value}}
            await world.refused(world.alice, "POST", "jobs", 422, body=_create_body(**limits))
    for value in (-1, 2**63, 2**64):
        await world.refused(world.alice, "POST", "jobs", 422, body=_create_body(resource_limits={"max_nodes": value}))
    # Integers too big for any JSON decoder's int64 travel as text: still refused, never an overflow.
    raw = b'{"job": {"script_name": "a", "script_version": "b", "script_parameters": {}, "priority": 1%s}}'
    await world.refused(world.alice, "POST", "jobs", 422, body=raw % (b"0" * 40))
    for params in (
        {"limit": str(2**64)},
        {"limit": "-1"},
        {"offset": "-1"},
        {"offset": str(2**64)},
        {"limit": "1.5"},
        {"limit": "1e3"},
        {"limit": " "},
        {"filters": json.dumps([["priority", ">", 2**64]])},
        {"filters": json.dumps([["priority", "=", 1.5]])},
        {"filters": json.dumps([["version", "in", [1, 2**63]]])},
    ):
        await world.refused(world.alice, "GET", "jobs", 422, params=params)
    for params in ({"after": str(2**64)}, {"after": "-5"}, {"limit": "1e9"}, {"wait": "NaN"}):
        await world.refused(world.auditor, "GET", "events", 422, params=params)
    for params in ({"as_of_version": str(2**64)}, {"as_of_version": "-1"}, {"as_of_version": "1.0"}):
        got = await world.alice.get(f"jobs/{uuid}", params=params)
        assert got.status in (404, 422), (params, got.body)
        assert_error(got, got.status)
    # Large but well-formed: clamped or simply past the end.
    got = await world.alice.get("jobs", params={"limit": "999999999999999999", "offset": "0"})
    assert (got.status, got.body["limit"], len(got.body["items"])) == (200, 1000, 3)
    got = await world.alice.get("jobs", params={"offset": "999999999999999999"})
    assert (got.status, got.body["items"], got.body["items_available"]) == (200, [], 3)


# ---------------------------------------------------------------------------------------------------------
# Uuids, content types, odd JSON.
# ---------------------------------------------------------------------------------------------------------
BAD_UUIDS: Final = (
    "'; DROP TABLE events; --",
    "zzzzz-8i9sb-00000000000000",  # one short
    "zzzzz-8i9sb-0000000000000000",  # one long
    "ZZZZZ-8I9SB-000000000000000",
    "zzzzz-tpzed-000000000000000",  # a user's uuid
    "zzzzz-8i9sb-00000000000000\u00e9",
    "zzzzz-8i9sb-00000000000000\u0000",
    "zzzzz-8i9sb-000000000000000\n",
    "%00",
    "x" * 5000,
)


async def test_bad_uuids_are_404(world: World) -> None:
    for uuid in BAD_UUIDS:
        path = f"jobs/{uuid.replace('%', '%25')}"
        for method, suffix, body in (
            ("GET", "", None),
            ("GET", "/events", None),
            ("PATCH", "", b'{"job": {"priority": 1}}'),
            ("PUT", "", b'{"job": {"priority": 1}}'),
            ("POST", "/lock", None),
            ("POST", "/cancel", None),
            ("POST", "/start", json.dumps({"script_version": COMMIT}).encode()),
            ("POST", "/finish", b'{"success": true}'),
        ):
            client = world.dispatcher if suffix in ("/lock", "/start", "/finish") else world.alice
            await world.refused(client, method, path + suffix, 404, body=body)
        got = await world.auditor.get("jobs", params={"filters": json.dumps([["uuid", "in", [uuid]]])})
        assert (got.status, got.body.get("items")) == (200, []) or got.status == 422, (uuid, got.body)


async def test_wrong_content_types_are_415(world: World) -> None:
    body = _create_body()
    uuid = world.alice_jobs[0]
    for content_type in ("text/plain", "application/xml", "multipart/form-data; boundary=x", "application/jsonp"):
        await world.refused(world.alice, "POST", "jobs", 415, body=body, content_type=content_type)
        await world.refused(world.alice, "PATCH", f"jobs/{uuid}", 415, body=body, content_type=content_type)
    # A form-encoded body is a list's (tunnelled GET) parameters, never a create.
    await world.refused(
        world.alice, "POST", "jobs", 415, body=b"script_name=a", content_type="application/x-www-form-urlencoded"
    )
    # JSON with a charset is JSON.
    created = await world.alice.post("jobs", data=body, headers={"Content-Type": "application/json; charset=utf-8"})
    assert created.status == 201, created.body


async def test_non_object_and_empty_bodies_are_400(world: World) -> None:
    uuid = world.alice_jobs[0]
    for body in (b"", b"  ", b"null", b"[]", b'[{"job": {}}]', b'"job"', b"42", b"true", b"NaN", b"Infinity"):
        await world.refused(world.alice, "POST", "jobs", 400, body=body)
        await world.refused(world.alice, "PATCH", f"jobs/{uuid}", 400, body=body)
        if body.strip():  # an empty body is fine where none is needed
            await world.refused(world.alice, "POST", f"jobs/{uuid}/cancel", 400, body=body)
            await world.refused(world.dispatcher, "POST", f"jobs/{world.alice_jobs[2]}/finish", 400, body=body)


async def test_nan_and_infinity_literals_are_400(world: World) -> None:
    for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999"):
        template = b'{"job": {"script_name": "a", "script_version": "b", "script_parameters": {"x": %s}}}'
        await world.refused(world.alice, "POST", "jobs", 400, body=template % literal)
        await world.refused(world.alice, "POST", "jobs", 400, body=b'{"job": {"priority": %s}}' % literal)
        filters = b'[["priority", "=", %s]]' % literal
        await world.refused(world.alice, "GET", "jobs", 400, params={"filters": filters.decode()})


async def test_duplicate_keys_take_the_last_value_everywhere(world: World) -> None:
    """JSON leaves duplicate keys to the parser; ours keeps the last, and what is stored and answered agree."""
    body = (
        b'{"job": {"script_name": "first.py", "script_version": "main", "script_parameters": {"k": 1, "k": 2},'
        b' "script_name": "last.py"}, "allow_duplicate": false, "allow_duplicate": true}'
    )
    created = await world.alice.post("jobs", data=body, headers={"Content-Type": JSON})
    assert created.status == 201, created.body
    assert (created.body["script_name"], created.body["script_parameters"]) == ("last.py", {"k": 2})
    stored = await world.service.pool.fetchval(
        "SELECT data FROM events WHERE job_uuid = $1 AND event_type = 'submitted'", created.body["uuid"]
    )
    data = stored if isinstance(stored, dict) else json.loads(stored)
    assert (data["script_name"], data["script_parameters"]) == ("last.py", {"k": 2})
    assert (await world.alice.get(f"jobs/{created.body['uuid']}")).body == created.body
