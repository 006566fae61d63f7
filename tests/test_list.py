"""List, queue and queue_size over HTTP against the running service (CONTRACT §3, reference §2.2–2.4)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from projections.timefmt import parse_ts
from tests.harness import ApiClient, Response, ServiceHarness

COMMIT = "a" * 40


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------
def _encode(params: dict[str, Any]) -> dict[str, str]:
    """Query parameters as a client sends them: structured values as JSON text."""
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in params.items()}


async def listing(client: ApiClient, path: str = "jobs", **params: Any) -> Response:
    """GET a list method with ``params`` (JSON-encoded unless already text)."""
    return await client.get(path, params=_encode(params))


async def uuids(client: ApiClient, path: str = "jobs", **params: Any) -> list[str]:
    """The uuids a successful list call returns, in order."""
    response = await listing(client, path, **params)
    assert response.status == 200, response.body
    return [item["uuid"] for item in response.body["items"]]


async def filtered(client: ApiClient, *filters: list[Any]) -> set[str]:
    """The uuids matching ``filters``, as a set."""
    return set(await uuids(client, filters=list(filters), limit=1000))


async def refused(client: ApiClient, status: int = 422, path: str = "jobs", **params: Any) -> list[str]:
    """Assert a list call fails with ``status`` and an Orvos error body; return its messages."""
    response = await listing(client, path, **params)
    assert response.status == status, (params, response.status, response.body)
    assert response.errors, response.body
    assert "error_token" in response.body
    # A deliberate refusal, not the middleware's catch-all for an exception nobody anticipated.
    assert not any("unexpected error" in message for message in response.errors), response.body
    return response.errors


async def created(client: ApiClient, **attrs: Any) -> dict[str, Any]:
    """Submit a new job; return it."""
    response = await client.create_job(**attrs)
    assert response.status == 201, response.body
    return response.body


async def act(client: ApiClient, uuid: str, action: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """POST a lifecycle method; return the job after it."""
    response = await client.post(f"jobs/{uuid}/{action}", json=body)
    assert response.status == 200, (action, response.body)
    return response.body


@dataclass
class World:
    """Eight jobs in every state, two owners, a dispatcher and an auditor."""

    alice: ApiClient
    bob: ApiClient
    dispatcher: ApiClient
    auditor: ApiClient
    jobs: dict[str, dict[str, Any]]

    def uuid(self, *names: str) -> set[str]:
        """The uuids of the named jobs."""
        return {self.jobs[name]["uuid"] for name in names}

    def all(self) -> set[str]:
        """Every job's uuid."""
        return self.uuid(*self.jobs)


@pytest.fixture
async def world(service: ServiceHarness) -> World:
    """Jobs: queued (priority 0 and 5), locked, running, complete, failed, cancelled (alice's); bob's queued."""
    alice, bob = await service.client("user", name="alice"), await service.client("user", name="bob")
    dispatcher, auditor = await service.client("dispatcher"), await service.client("auditor")
    jobs: dict[str, dict[str, Any]] = {}
    jobs["q0"] = await created(alice, script_name="alpha.py", submit_id="s-1", script_parameters={"a": 1, "b": [2]})
    jobs["q5"] = await created(alice, script_name="beta.py", submit_id="s-2", priority=5)
    for name in ("locked", "running", "complete", "failed", "cancelled"):
        jobs[name] = await created(alice, script_name="gamma_1.py", priority=9, resource_limits={"min_nodes": 2})
    jobs["other"] = await created(bob, script_name="Alpha.py", priority=5)
    for name in ("locked", "running", "complete", "failed"):
        jobs[name] = await act(dispatcher, jobs[name]["uuid"], "lock")
    for name in ("running", "complete", "failed"):
        jobs[name] = await act(dispatcher, jobs[name]["uuid"], "start", {"script_version": COMMIT})
    jobs["complete"] = await act(dispatcher, jobs["complete"]["uuid"], "finish", {"success": True, "output": "o"})
    jobs["failed"] = await act(dispatcher, jobs["failed"]["uuid"], "finish", {"success": False})
    jobs["cancelled"] = await act(alice, jobs["cancelled"]["uuid"], "cancel")
    return World(alice, bob, dispatcher, auditor, jobs)


# ---------------------------------------------------------------------------------------------------------
# Envelope, default order, visibility
# ---------------------------------------------------------------------------------------------------------
async def test_envelope_and_default_order(service: ServiceHarness, world: World) -> None:
    response = await listing(world.auditor)
    assert response.status == 200, response.body
    body = response.body
    assert {k: body[k] for k in ("kind", "etag", "self_link", "offset", "limit", "items_available")} == {
        "kind": "orvos#jobList",
        "etag": "",
        "self_link": "",
        "offset": 0,
        "limit": 100,
        "items_available": 8,
    }
    keys = [(item["modified_at"], item["uuid"]) for item in body["items"]]
    # modified_at desc, then uuid asc: sort ascending by uuid, then (stably) descending by time.
    expected = sorted(sorted(keys, key=lambda k: k[1]), key=lambda k: k[0], reverse=True)
    assert keys == expected
    assert {item["uuid"] for item in body["items"]} == world.all()
    # Items are exactly what `get` returns.
    running = world.jobs["running"]
    assert next(item for item in body["items"] if item["uuid"] == running["uuid"]) == running
    assert all(item["kind"] == "orvos#job" for item in body["items"])


async def test_a_user_sees_only_their_own_jobs(world: World) -> None:
    everything = world.all()
    assert set(await uuids(world.alice)) == everything - world.uuid("other")
    assert set(await uuids(world.bob)) == world.uuid("other")
    assert set(await uuids(world.auditor)) == everything
    assert set(await uuids(world.dispatcher)) == everything
    # A filter naming someone else's job does not reveal it, and the count does not either.
    response = await listing(world.alice, filters=[["uuid", "=", world.jobs["other"]["uuid"]]])
    assert response.body["items"] == []
    assert response.body["items_available"] == 0
    assert set(await uuids(world.bob, "jobs/queue")) == world.uuid("other")


async def test_unauthenticated_list_is_401(service: ServiceHarness) -> None:
    for path in ("jobs", "jobs/queue", "jobs/queue_size"):
        response = await service.anonymous().get(path)
        assert response.status == 401, path


# ---------------------------------------------------------------------------------------------------------
# Operators
# ---------------------------------------------------------------------------------------------------------
async def test_equality_and_null_semantics(world: World) -> None:
    client, w = world.auditor, world
    unfinished = w.uuid("q0", "q5", "locked", "running", "cancelled", "other")
    assert await filtered(client, ["uuid", "=", w.jobs["q0"]["uuid"]]) == w.uuid("q0")
    assert await filtered(client, ["success", "=", None]) == unfinished
    assert await filtered(client, ["success", "!=", None]) == w.uuid("complete", "failed")
    # `!=` also matches NULL: every job that did not succeed, finished or not.
    assert await filtered(client, ["success", "!=", True]) == unfinished | w.uuid("failed")
    assert await filtered(client, ["success", "=", False]) == w.uuid("failed")
    held = w.uuid("locked", "running", "complete", "failed")
    assert await filtered(client, ["is_locked_by", "=", w.dispatcher.user_uuid]) == held
    assert await filtered(client, ["is_locked_by", "!=", w.dispatcher.user_uuid]) == w.all() - held
    assert await filtered(client, ["state", "!=", "Queued"]) == w.uuid("running", "complete", "failed", "cancelled")
    assert await filtered(client, ["state", "=", "queued"]) == set()  # values are compared exactly
    # Conditions are ANDed.
    assert await filtered(client, ["state", "=", "Queued"], ["priority", "=", 5]) == w.uuid("q5", "other")


async def test_in_and_not_in_with_nulls(world: World) -> None:
    client, w = world.auditor, world
    no_submit_id = w.all() - w.uuid("q0", "q5")
    assert await filtered(client, ["submit_id", "in", ["s-1", "s-9"]]) == w.uuid("q0")
    assert await filtered(client, ["submit_id", "in", ["s-1", None]]) == w.uuid("q0") | no_submit_id
    # `not in` also matches NULL, unless null is listed.
    assert await filtered(client, ["submit_id", "not in", ["s-1"]]) == w.uuid("q5") | no_submit_id
    assert await filtered(client, ["submit_id", "not in", ["s-1", None]]) == w.uuid("q5")
    assert await filtered(client, ["submit_id", "not in", [None]]) == w.uuid("q0", "q5")
    assert await filtered(client, ["submit_id", "in", []]) == set()
    assert await filtered(client, ["submit_id", "not in", []]) == w.all()
    assert await filtered(client, ["priority", "in", [0, 5]]) == w.uuid("q0", "q5", "other")
    assert await filtered(client, ["priority", "not in", [9]]) == w.uuid("q0", "q5", "other")
    assert await filtered(client, ["state", "not in", ["Queued", "Running"]]) == w.uuid(
        "complete", "failed", "cancelled"
    )
    assert await filtered(client, ["success", "in", [True, None]]) == w.all() - w.uuid("failed")
    moments = [w.jobs["q0"]["created_at"], w.jobs["other"]["created_at"]]
    assert await filtered(client, ["created_at", "in", moments]) == w.uuid("q0", "other")


async def test_range_operators(world: World) -> None:
    client, w = world.auditor, world
    assert await filtered(client, ["priority", ">", 5]) == w.uuid(
        "locked", "running", "complete", "failed", "cancelled"
    )
    assert await filtered(client, ["priority", ">=", 5]) == w.all() - w.uuid("q0")
    assert await filtered(client, ["priority", "<", 5]) == w.uuid("q0")
    assert await filtered(client, ["priority", "<=", "5"]) == w.uuid("q0", "q5", "other")  # a decimal string
    assert await filtered(client, ["priority", "<", 10**12]) == w.all()  # beyond int4 is still a number
    assert await filtered(client, ["version", ">=", 3]) == w.uuid("running", "complete", "failed")
    assert await filtered(client, ["script_name", ">=", "beta"]) == w.all() - w.uuid("q0", "other")
    # Timestamps: strictly before the job created third, in Z form and as an equivalent offset.
    pivot = w.jobs["locked"]["created_at"]
    before = w.uuid("q0", "q5")
    assert await filtered(client, ["created_at", "<", pivot]) == before
    shifted = (parse_ts(pivot) + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%S.%f+02:00")
    assert await filtered(client, ["created_at", "<", shifted]) == before
    assert await filtered(client, ["created_at", "<=", pivot]) == before | w.uuid("locked")
    assert await filtered(client, ["finished_at", ">", "2000-01-01T00:00:00Z"]) == w.uuid("complete", "failed")


async def test_like_and_ilike(world: World) -> None:
    client, w = world.auditor, world
    assert await filtered(client, ["script_name", "like", "alpha%"]) == w.uuid("q0")
    assert await filtered(client, ["script_name", "ilike", "ALPHA%"]) == w.uuid("q0", "other")
    assert await filtered(client, ["script_name", "like", "gamma\\_1%"]) == w.uuid(
        "locked", "running", "complete", "failed", "cancelled"
    )
    assert await filtered(client, ["script_name", "like", "_eta.py"]) == w.uuid("q5")
    assert await filtered(client, ["output", "like", "%"]) == w.uuid("complete")


async def test_booleans_and_hashes(world: World) -> None:
    client, w = world.auditor, world
    for spelling in (True, "true", "t", "yes", "1", 1):
        assert await filtered(client, ["running", "=", spelling]) == w.uuid("running"), spelling
    for spelling in (False, "false", "f", "no", "0", 0):
        assert await filtered(client, ["running", "=", spelling]) == w.all() - w.uuid("running"), spelling
    # Hashes compare as JSON values: key order does not matter.
    assert await filtered(client, ["script_parameters", "=", {"b": [2], "a": 1}]) == w.uuid("q0")
    assert await filtered(client, ["script_parameters", "!=", {"b": [2], "a": 1}]) == w.all() - w.uuid("q0")
    assert await filtered(client, ["resource_limits", "=", {"min_nodes": 2}]) == w.uuid(
        "locked", "running", "complete", "failed", "cancelled"
    )
    assert await filtered(client, ["resource_limits", "=", {}]) == w.uuid("q0", "q5", "other")


async def test_where_legacy_hash(world: World) -> None:
    client, w = world.auditor, world
    assert set(await uuids(client, where={"script_name": "alpha.py"})) == w.uuid("q0")
    assert set(await uuids(client, where={"priority": [0, 5]})) == w.uuid("q0", "q5", "other")
    assert set(await uuids(client, where={"success": None, "priority": 9})) == w.uuid("locked", "running", "cancelled")
    # where and filters are ANDed.
    both = await uuids(client, where={"priority": 5}, filters=[["owner_uuid", "=", w.bob.user_uuid]])
    assert set(both) == w.uuid("other")
    assert "nope" in (await refused(client, where={"nope": 1}))[0]
    await refused(client, where={"script_name": {"like": "a%"}})
    await refused(client, where=["script_name", "alpha.py"])
    await refused(client, 400, where="{not json")


# ---------------------------------------------------------------------------------------------------------
# Order, limit, offset, count, select
# ---------------------------------------------------------------------------------------------------------
async def test_order(world: World) -> None:
    client, jobs = world.auditor, world.jobs

    def expected(key: Callable[[dict[str, Any]], Any]) -> list[str]:
        return [job["uuid"] for job in sorted(sorted(jobs.values(), key=lambda j: j["uuid"]), key=key)]

    by_priority_then_age = expected(lambda j: (-j["priority"], j["created_at"]))
    assert await uuids(client, order=["priority desc", "created_at asc"]) == by_priority_then_age
    assert await uuids(client, order="priority desc, created_at") == by_priority_then_age  # plain text
    assert await uuids(client, order="PRIORITY DESC,created_at ASC".lower()) == by_priority_then_age
    assert await uuids(client, order=json.dumps("created_at desc")) == expected(lambda j: j["created_at"])[::-1]
    # A single key with ties: uuid asc breaks them.
    assert await uuids(client, order=["priority"]) == expected(lambda j: j["priority"])
    assert await uuids(client, order=["priority desc", "uuid desc"]) == [
        job["uuid"] for job in sorted(jobs.values(), key=lambda j: (j["priority"], j["uuid"]), reverse=True)
    ]
    assert await uuids(client, order=[]) == await uuids(client)


async def test_invalid_order(world: World) -> None:
    client = world.auditor
    assert "nope" in (await refused(client, order=["nope asc"]))[0]
    await refused(client, order=["priority sideways"])
    await refused(client, order=["priority desc nulls last"])
    await refused(client, order=["kind"])  # not stored: cannot be ordered by
    await refused(client, order=[["priority", "desc"]])
    await refused(client, order={"priority": "desc"})
    await refused(client, 400, order="[priority desc")


async def test_limit_offset_and_count(world: World) -> None:
    client = world.auditor
    everything = await uuids(client)
    clamped = await listing(client, limit=5000)
    assert clamped.status == 200
    assert clamped.body["limit"] == 1000
    assert len(clamped.body["items"]) == 8
    page = await listing(client, limit=3, offset=2)
    assert (page.body["limit"], page.body["offset"], page.body["items_available"]) == (3, 2, 8)
    assert [item["uuid"] for item in page.body["items"]] == everything[2:5]
    empty = await listing(client, limit=0)
    assert (empty.body["items"], empty.body["items_available"]) == ([], 8)
    beyond = await listing(client, offset=100)
    assert (beyond.body["items"], beyond.body["items_available"]) == ([], 8)
    uncounted = await listing(client, count="none", limit=2)
    assert "items_available" not in uncounted.body
    assert len(uncounted.body["items"]) == 2
    assert (await listing(client, count="exact")).body["items_available"] == 8
    for bad in ({"limit": "-1"}, {"limit": "ten"}, {"offset": "-3"}, {"offset": "1.5"}, {"count": "maybe"}):
        await refused(client, **bad)


async def test_select(world: World) -> None:
    client = world.auditor
    response = await listing(client, select=["priority", "uuid"], order=["priority desc"])
    assert response.status == 200, response.body
    assert all(set(item) == {"uuid", "priority", "kind"} for item in response.body["items"])
    assert response.body["items"][0] == {"kind": "orvos#job", "uuid": response.body["items"][0]["uuid"], "priority": 9}
    assert response.body["items_available"] == 8
    only_kind = await listing(client, select=[])
    assert all(item == {"kind": "orvos#job"} for item in only_kind.body["items"])
    messages = await refused(client, select=["uuid", "nope"])
    assert "Invalid attribute(s)" in messages[0]
    assert "nope" in messages[0]
    await refused(client, 400, select="uuid")  # not JSON
    await refused(client, select=[1])


# ---------------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------------
async def test_bad_filters_are_422_and_bad_json_400(world: World) -> None:
    client, uuid = world.auditor, world.jobs["q0"]["uuid"]
    assert "nope" in (await refused(client, filters=[["nope", "=", 1]]))[0]
    assert "~" in (await refused(client, filters=[["uuid", "~", uuid]]))[0]
    bad = [
        [["priority", "=", "high"]],
        [["priority", "=", True]],
        [["priority", "=", 1.5]],
        [["created_at", ">", "yesterday"]],
        [["created_at", ">", "2026-01-01T00:00:00"]],  # no zone
        [["created_at", ">", "0001-01-01T00:00:00+01:00"]],  # before year 1 in UTC
        [["uuid", "in", uuid]],  # in needs an array
        [["uuid", "in", [uuid, 3]]],
        [["priority", "<", None]],
        [["priority", "like", "1%"]],
        [["running", "like", "t%"]],
        [["running", "<", True]],
        [["running", "=", "maybe"]],
        [["script_parameters", "=", "x"]],
        [["script_parameters", "like", "%x%"]],
        [["resource_limits", "in", [{}]]],
        [["uuid", "=", {"a": 1}]],
        [["uuid", "=", "nul\u0000byte"]],
        [["kind", "=", "orvos#job"]],
        [[1, "=", 1]],
        [["uuid", None, uuid]],
        [["uuid", "="]],
        ["uuid", "=", uuid],
        {"uuid": uuid},
    ]
    for filters in bad:
        await refused(client, filters=filters)
    await refused(client, 400, filters='[["uuid", "="')
    await refused(client, 400, filters="not json at all")


async def test_unknown_parameters_are_ignored(world: World) -> None:
    response = await listing(world.auditor, alt="json", _profile="true", reader_tokens="[]", bogus="1")
    assert response.status == 200, response.body
    assert response.body["items_available"] == 8
    assert (await listing(world.auditor, distinct="true")).status == 200


# ---------------------------------------------------------------------------------------------------------
# Paging
# ---------------------------------------------------------------------------------------------------------
_ORDERS: list[list[str] | None] = [None, ["priority desc"], ["priority asc", "created_at desc"], ["script_name"]]


def sorted_like(items: list[dict[str, Any]], order: list[str] | None) -> list[dict[str, Any]]:
    """``items`` in the order the service promises: the given keys (default ``modified_at desc``), then uuid."""
    keys = [entry.split() for entry in (order or ["modified_at desc"])]
    result = sorted(items, key=lambda item: item["uuid"])
    for attribute, *direction in reversed(keys):  # stable sorts, least significant key first
        result.sort(key=lambda item, a=attribute: item[a], reverse=direction == ["desc"])
    return result


async def test_paging_yields_every_job_exactly_once(service: ServiceHarness) -> None:
    """Whatever the page size and order, walking pages gives the unpaged list: every job once, ties stable."""
    user = await service.client("user")
    total = 30
    made = await asyncio.gather(
        *(created(user, priority=i % 3, script_name=f"s{i % 4}.py", submit_id=f"p{i}") for i in range(total))
    )
    loop = asyncio.get_running_loop()

    def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
        # Hypothesis drives a synchronous test; it runs in a worker thread and sends each request to the loop.
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=30)

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(page=st.integers(min_value=1, max_value=total + 2), order=st.sampled_from(_ORDERS))
    def walk(page: int, order: list[str] | None) -> None:
        params: dict[str, Any] = {} if order is None else {"order": order}
        whole = run(listing(user, **params, limit=1000)).body["items"]
        seen: list[str] = []
        for offset in range(0, total + page, page):
            response = run(listing(user, **params, limit=page, offset=offset))
            assert response.body["items_available"] == total
            assert (response.body["limit"], response.body["offset"]) == (page, offset)
            seen += [item["uuid"] for item in response.body["items"]]
        assert whole == sorted_like(whole, order)
        assert seen == [item["uuid"] for item in whole]
        assert set(seen) == {job["uuid"] for job in made}

    await asyncio.to_thread(walk)


# ---------------------------------------------------------------------------------------------------------
# googleapiclient's long GET, tunnelled through POST
# ---------------------------------------------------------------------------------------------------------
async def test_method_override_post_with_form_body_is_a_list(service: ServiceHarness) -> None:
    user = await service.client("user")
    jobs = await asyncio.gather(*(created(user, submit_id=f"o{i}") for i in range(20)))
    real = [job["uuid"] for job in sorted(jobs, key=lambda job: (job["created_at"], job["uuid"]))]
    invented = [f"zzzzz-8i9sb-{i:015d}" for i in range(100)]
    filters = json.dumps([["uuid", "in", real + invented]])
    form = {"filters": filters, "order": json.dumps(["created_at asc"]), "alt": "json", "limit": "1000"}
    assert len(filters) > 2048
    before = await service.pool.fetchval("SELECT count(*) FROM events")
    response = await user.post("jobs", data=form, headers={"X-HTTP-Method-Override": "GET"})
    assert response.status == 200, response.body
    assert response.body["kind"] == "orvos#jobList"
    assert [item["uuid"] for item in response.body["items"]] == real
    assert response.body["items_available"] == 20
    assert await service.pool.fetchval("SELECT count(*) FROM events") == before  # nothing was created
    # The same parameters as a JSON body work too; bad JSON inside the form is still 400.
    as_json = await user.post("jobs", json=form, headers={"X-HTTP-Method-Override": "GET"})
    assert [item["uuid"] for item in as_json.body["items"]] == real
    broken = await user.post("jobs", data={"filters": "[["}, headers={"X-HTTP-Method-Override": "GET"})
    assert broken.status == 400, broken.body


# ---------------------------------------------------------------------------------------------------------
# Queue
# ---------------------------------------------------------------------------------------------------------
async def test_queue_order_and_size(service: ServiceHarness, world: World) -> None:
    w = world
    queue = await uuids(w.dispatcher, "jobs/queue")
    # priority desc, then oldest first: q5 and bob's job tie on priority 5, q5 is older.
    assert queue == [w.jobs[name]["uuid"] for name in ("q5", "other", "q0")]
    size = await w.alice.get("jobs/queue_size")
    assert (size.status, size.body) == (200, {"queue_size": 3})
    assert await uuids(w.alice, "jobs/queue") == [w.jobs[name]["uuid"] for name in ("q5", "q0")]
    # Unlocking puts the job back, at the head (priority 9); list parameters apply to the queue.
    await act(w.dispatcher, w.jobs["locked"]["uuid"], "unlock")
    assert (await uuids(w.dispatcher, "jobs/queue"))[0] == w.jobs["locked"]["uuid"]
    assert (await w.auditor.get("jobs/queue_size")).body == {"queue_size": 4}
    page = await listing(w.dispatcher, "jobs/queue", filters=[["priority", "<", 9]], limit=1, order=["created_at"])
    assert [item["uuid"] for item in page.body["items"]] == [w.jobs["q0"]["uuid"]]
    assert page.body["items_available"] == 3
    await refused(w.dispatcher, path="jobs/queue", order=["nope"])


# ---------------------------------------------------------------------------------------------------------
# SQL injection
# ---------------------------------------------------------------------------------------------------------
async def test_sql_injection_is_refused_or_taken_literally(service: ServiceHarness, world: World) -> None:
    client = world.auditor
    quoted = await created(world.alice, script_name='it\'s "quoted"; --', submit_id="x' OR '1'='1")
    counts = await _table_counts(service)
    for attribute in ("uuid; DROP TABLE jobs", "uuid = uuid OR 1=1 --", '"uuid"', "jobs.uuid", "(uuid)"):
        await refused(client, filters=[[attribute, "=", "x"]])
        await refused(client, where={attribute: "x"})
        await refused(client, select=[attribute])
    for operator in ("= 'x' OR 1=1 --", "=;", "IS NOT", "@@", "~*"):
        await refused(client, filters=[["uuid", operator, "x"]])
    for order in ("modified_at desc; select 1", "modified_at desc, (select 1)", "uuid desc --", "pg_sleep(1)"):
        await refused(client, order=[order])
        await refused(client, order=order)
    # Operands are values: they match what they literally say, and nothing else.
    for operand in ("x' OR '1'='1", "'; DROP TABLE jobs; --", "\\'; DELETE FROM events; --"):
        assert await filtered(client, ["script_name", "=", operand]) == set()
        assert await filtered(client, ["script_name", "in", [operand]]) == set()
    assert await filtered(client, ["submit_id", "=", "x' OR '1'='1"]) == {quoted["uuid"]}
    assert await filtered(client, ["script_name", "like", '%\'s "quoted"%']) == {quoted["uuid"]}
    await refused(client, filters=[["created_at", "<", "2030-01-01T00:00:00Z'; DROP TABLE jobs; --"]])
    await refused(client, filters=[["priority", "=", "1; DROP TABLE jobs"]])
    assert await _table_counts(service) == counts
    assert (await listing(client)).body["items_available"] == 9


async def _table_counts(service: ServiceHarness) -> tuple[int, int]:
    """Rows in ``jobs`` and ``events`` (the query fails if either table is gone)."""
    async with service.pool.acquire() as conn:
        return await conn.fetchval("SELECT count(*) FROM jobs"), await conn.fetchval("SELECT count(*) FROM events")
