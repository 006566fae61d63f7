"""``GET users/current``, ``select`` on ``jobs.get`` and ``api_token`` in a tunnelled GET, over HTTP against the
real service (the SDK's side of each is in ``tests/test_arvados_sdk.py``)."""

from __future__ import annotations

import json

from tests.contract import assert_error, event_count, submit
from tests.harness import ServiceHarness

USER_ATTRIBUTES = {"kind", "uuid", "etag", "href", "created_at", "name", "username", "role", "is_admin", "is_active"}


async def test_current_user_is_the_token_holder(service: ServiceHarness) -> None:
    alice = await service.client("dispatcher", name="alice")
    got = await alice.get("users/current")
    assert got.status == 200
    body = got.body
    assert set(body) == USER_ATTRIBUTES
    assert (body["kind"], body["uuid"], body["name"], body["username"]) == (
        "orvos#user", alice.user_uuid, "alice", "alice"
    )  # fmt: skip
    assert (body["role"], body["is_admin"], body["is_active"]) == ("dispatcher", False, True)
    assert body["href"] == f"/users/{alice.user_uuid}"
    assert body["created_at"].endswith("Z")
    assert got.headers["ETag"] == f'"{body["etag"]}"'
    # Another token of the same user, read-only or not, is the same user; the admin is an admin.
    again = await (await service.token_for(alice, read_only=True)).get("users/current")
    assert again.body == body
    admin = await service.admin.get("users/current")
    assert (admin.body["role"], admin.body["is_admin"]) == ("admin", True)
    assert admin.body["etag"] != body["etag"]
    # The token can also travel as api_token.
    by_parameter = await service.anonymous().get("users/current", params={"api_token": alice.token})
    assert by_parameter.body == body


async def test_current_user_without_a_valid_token_is_401(service: ServiceHarness) -> None:
    expired = await service.client(expires_in=-1)
    for client in (service.anonymous(), service.with_token("v2-not-a-token"), expired):
        assert_error(await client.get("users/current"), 401)
    # A read of users/current writes nothing.
    before = await event_count(service)
    await service.admin.get("users/current")
    assert await event_count(service) == before


async def test_get_with_select_returns_only_those_attributes(service: ServiceHarness) -> None:
    alice = await service.client()
    job = await submit(alice, priority=3)
    full = await alice.get(f"jobs/{job['uuid']}")
    narrow = await alice.get(f"jobs/{job['uuid']}", params={"select": json.dumps(["priority", "uuid"])})
    assert narrow.status == 200
    assert narrow.body == {"uuid": job["uuid"], "kind": "orvos#job", "priority": 3}  # kind: always
    assert narrow.headers["ETag"] == full.headers["ETag"] == f'"{job["etag"]}"'
    # With as_of_version too: the selected attributes of that version.
    before = await alice.get(
        f"jobs/{job['uuid']}", params={"as_of_version": "1", "select": json.dumps(["version", "state"])}
    )
    assert before.body == {"kind": "orvos#job", "state": "Queued", "version": 1}
    # The list's validation: not JSON is 400; not an array of known attribute names is 422.
    path = f"jobs/{job['uuid']}"
    assert_error(await alice.get(path, params={"select": "[uuid"}), 400, "select")
    for bad in (json.dumps(["no_such_attribute"]), json.dumps("uuid"), json.dumps([1]), json.dumps(["\u0000"])):
        assert_error(await alice.get(path, params={"select": bad}), 422, "select")
    empty = await alice.get(path, params={"select": "[]"})
    assert empty.body == {"kind": "orvos#job"}
    # A bad select is refused before the job is looked up (unknown or not): nothing to learn from the order.
    other = await service.client()
    assert_error(await other.get(path, params={"select": '["nope"]'}), 422, "select")
    assert_error(await other.get(path, params={"select": '["uuid"]'}), 404)


async def test_api_token_travels_in_a_tunnelled_get_form_body(service: ServiceHarness) -> None:
    alice = await service.client()
    job = await submit(alice)
    anonymous = service.anonymous()
    tunnel = {"X-HTTP-Method-Override": "GET"}
    form = {"api_token": alice.token or "", "filters": json.dumps([["uuid", "=", job["uuid"]]])}
    # googleapiclient moves the whole query, api_token too, into the form body of a tunnelled GET.
    for path in ("jobs", "jobs/queue"):
        listed = await anonymous.post(path, data=form, headers=tunnel)
        assert listed.status == 200, listed.body
        assert [item["uuid"] for item in listed.body["items"]] == [job["uuid"]]
    events = await anonymous.post("events", data={"api_token": alice.token or ""}, headers=tunnel)
    assert (events.status, events.body["kind"]) == (200, "orvos#eventList")
    current = await anonymous.post("users/current", data={"api_token": alice.token or ""}, headers=tunnel)
    assert current.body["uuid"] == alice.user_uuid
    # A wrong token in the body is still a wrong token.
    assert_error(await anonymous.post("jobs", data={"api_token": "v2-not-a-token"}, headers=tunnel), 401)
    # Never from other POST bodies: a create, a lifecycle method "tunnelled" to a path with no GET, a JSON body.
    before = await event_count(service)
    create = {"api_token": alice.token or "", "script_name": "x.py", "script_version": "main"}
    assert_error(await anonymous.post("jobs", data=create), 401)
    assert_error(await anonymous.post(f"jobs/{job['uuid']}/cancel", data=form, headers=tunnel), 401)
    assert_error(await anonymous.post("jobs", json={"api_token": alice.token}, headers=tunnel), 401)
    assert await event_count(service) == before
