"""Contract tests of the single-job methods of the Jobs API (CONTRACT §1, §3), over HTTP against the real service.

One test (or one table) per row of CONTRACT §3 except list/queue: get, create, update (PUT and PATCH), delete,
lock, unlock, start, cancel, finish; the tunnelled GET, unknown parameters, booleans, ``If-Match`` and the
``ETag`` header; and the races that must have exactly one winner, run with real parallel clients.
Every refused request is also checked to have written nothing.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from tests.contract import (
    COMMIT,
    TIMESTAMP,
    assert_error,
    attributes,
    cancel,
    event_count,
    event_types,
    finish,
    job_count,
    last_event,
    lock,
    start,
    submit,
)
from tests.harness import ApiClient, ServiceHarness

JOB_KEYS = {
    "uuid", "kind", "etag", "href", "owner_uuid", "created_at", "modified_at", "modified_by_user_uuid",
    "modified_by_client_uuid", "submit_id", "priority", "resource_limits", "script_name", "script_parameters",
    "script_version", "supplied_script_version", "cancelled_by_client", "cancelled_by_user", "cancelled_at",
    "started_at", "finished_at", "running", "success", "is_locked_by", "state", "output", "log",
}  # fmt: skip


async def client_uuid(service: ServiceHarness, user_uuid: str) -> str:
    """The API client of the user's (only) token."""
    return await service.pool.fetchval("SELECT api_client_uuid FROM api_tokens WHERE user_uuid = $1", user_uuid)


# ---- get ---------------------------------------------------------------------------------------------------
async def test_get_returns_the_job_with_its_etag(service: ServiceHarness) -> None:
    user = await service.client("user")
    created = await submit(user, priority=3)
    got = await user.get(f"jobs/{created['uuid']}")
    assert got.status == 200
    assert got.body == created
    assert got.headers["ETag"] == f'"{got.body["etag"]}"'
    job = got.body
    assert set(job) >= JOB_KEYS
    assert job["kind"] == "orvos#job"
    assert job["href"] == f"/jobs/{job['uuid']}"
    assert job["uuid"].startswith("zzzzz-8i9sb-")
    assert job["owner_uuid"] == job["modified_by_user_uuid"] == user.user_uuid
    assert job["modified_by_client_uuid"] == await client_uuid(service, user.user_uuid)
    assert TIMESTAMP.fullmatch(job["created_at"])
    assert job["modified_at"] == job["created_at"]


# ---- create ------------------------------------------------------------------------------------------------
async def test_create_new_job_is_201_with_location(service: ServiceHarness) -> None:
    user = await service.client("user")
    limits = {"min_nodes": 1, "max_nodes": 2, "max_tasks_per_node": 4, "min_ram_per_task": 1024, "min_ram_per_node": 0}
    response = await user.post(
        "jobs",
        json={"job": attributes(priority=7, resource_limits=limits, submit_id="s-1")},
        params={"allow_duplicate": "true"},
    )
    assert response.status == 201, response.body
    job = response.body
    assert response.headers["Location"] == f"/orvos/v1/jobs/{job['uuid']}"
    assert response.headers["ETag"] == f'"{job["etag"]}"'
    expected = {
        "owner_uuid": user.user_uuid, "script_name": "hash.py", "script_version": "main",
        "supplied_script_version": "main", "script_parameters": {"input": "x"}, "priority": 7,
        "resource_limits": limits, "submit_id": "s-1", "state": "Queued", "running": False, "success": None,
        "is_locked_by": None, "started_at": None, "finished_at": None, "cancelled_at": None,
        "cancelled_by_user": None, "cancelled_by_client": None, "output": None, "log": None,
    }  # fmt: skip
    assert {key: job[key] for key in expected} == expected
    assert await event_types(service, job["uuid"]) == ["submitted"]
    followed = await user.get(response.headers["Location"])
    assert followed.status == 200
    assert followed.body == job


async def test_create_returning_an_existing_job_is_200(service: ServiceHarness) -> None:
    user = await service.client("user")
    first = await submit(user)
    again = await user.post("jobs", json={"job": attributes()})
    assert again.status == 200, again.body
    assert again.body["uuid"] == first["uuid"]
    assert "Location" not in again.headers
    assert again.headers["ETag"] == f'"{again.body["etag"]}"'


async def test_create_accepts_a_bare_attribute_object(service: ServiceHarness) -> None:
    user = await service.client("user")
    response = await user.post("jobs", json=attributes(priority=2), params={"allow_duplicate": "true"})
    assert response.status == 201, response.body
    assert response.body["priority"] == 2
    assert response.body["script_parameters"] == {"input": "x"}
    # Control parameters may sit beside the attributes, too.
    beside = await user.post("jobs", json={**attributes(priority=2), "allow_duplicate": False})
    assert beside.status == 200, beside.body
    assert beside.body["uuid"] == response.body["uuid"]


MISSING_REQUIRED: list[tuple[list[str], dict[str, Any]]] = [
    (["script_name"], {"script_version": "main", "script_parameters": {}}),
    (["script_version"], {"script_name": "a.py", "script_parameters": {}}),
    (["script_parameters"], {"script_name": "a.py", "script_version": "main"}),
    (["script_parameters"], {"script_name": "a.py", "script_version": "main", "script_parameters": None}),
    (["script_name"], {"script_name": None, "script_version": "main", "script_parameters": {}}),
    (["script_name", "script_version", "script_parameters"], {"priority": 1}),
]


async def test_create_without_required_attributes_is_422_naming_them(service: ServiceHarness) -> None:
    user = await service.client("user")
    for missing, body in MISSING_REQUIRED:
        for wrapped in ({"job": body}, body):
            response = await user.post("jobs", json=wrapped)
            assert_error(response, 422, *(f"{name} attribute must be specified" for name in missing))
            named = [
                name for name in ("script_name", "script_version", "script_parameters") if name in str(response.body)
            ]
            assert named == missing, response.body
    assert_error(await user.post("jobs", json={"job": {}}), 422, "attribute must be specified")
    assert await event_count(service) == 0


# ---- update ------------------------------------------------------------------------------------------------
async def test_update_changes_only_the_supplied_attributes(service: ServiceHarness) -> None:
    user = await service.client("user")
    for method in ("PUT", "PATCH"):
        await _check_partial_update(service, user, method)


async def _check_partial_update(service: ServiceHarness, user: ApiClient, method: str) -> None:
    job = await submit(
        user, priority=1, resource_limits={"min_nodes": 1, "max_nodes": 2}, script_parameters={"a": 1, "m": method}
    )
    uuid = job["uuid"]
    response = await user.request(method, f"jobs/{uuid}", json={"job": {"script_parameters": {"b": {"d": 3}}}})
    assert response.status == 200, response.body
    updated = response.body
    assert updated["script_parameters"] == {"b": {"d": 3}}  # replaced whole, not merged
    unchanged = ("priority", "resource_limits", "script_name", "script_version", "owner_uuid", "created_at", "state")
    assert {key: updated[key] for key in unchanged} == {key: job[key] for key in unchanged}
    assert updated["etag"] != job["etag"]
    assert updated["modified_at"] > job["modified_at"]
    assert response.headers["ETag"] == f'"{updated["etag"]}"'

    response = await user.request(method, f"jobs/{uuid}", json={"job": {"resource_limits": {"max_nodes": 4}}})
    assert response.status == 200, response.body
    assert response.body["resource_limits"] == {"max_nodes": 4}
    assert response.body["script_parameters"] == {"b": {"d": 3}}
    event = await last_event(service, uuid)
    assert (event["event_type"], event["data"]) == ("updated", {"resource_limits": {"max_nodes": 4}})
    assert (await user.get(f"jobs/{uuid}")).body == response.body


async def test_update_by_owner_or_admin_only(service: ServiceHarness) -> None:
    owner = await service.client("user")
    stranger = await service.client("user")
    job = await submit(owner)
    before = await event_count(service)
    assert_error(await stranger.request("PATCH", f"jobs/{job['uuid']}", json={"job": {"priority": 5}}), 404)
    for role in ("dispatcher", "auditor"):
        other = await service.client(role)
        assert_error(await other.request("PATCH", f"jobs/{job['uuid']}", json={"job": {"priority": 5}}), 403)
    assert await event_count(service) == before
    by_admin = await service.admin.request("PATCH", f"jobs/{job['uuid']}", json={"job": {"priority": 5}})
    assert by_admin.status == 200, by_admin.body
    assert by_admin.body["priority"] == 5
    assert by_admin.body["modified_by_user_uuid"] == service.admin.user_uuid
    assert by_admin.body["owner_uuid"] == owner.user_uuid


async def test_update_only_while_queued_and_unlocked_except_priority(service: ServiceHarness) -> None:
    user = await service.client("user")
    dispatcher = await service.client("dispatcher")
    locked = await submit(user, script_parameters={"n": 1})
    await lock(dispatcher, locked["uuid"])
    running = await submit(user, script_parameters={"n": 2})
    await start(dispatcher, running["uuid"])
    complete = await submit(user, script_parameters={"n": 3})
    await finish(dispatcher, complete["uuid"])
    cancelled = await submit(user, script_parameters={"n": 4})
    await cancel(user, cancelled["uuid"])

    for job, priority_status in ((locked, 200), (running, 200), (complete, 422), (cancelled, 422)):
        uuid = job["uuid"]
        before = await event_count(service)
        changes = ({"script_name": "other.py"}, {"script_parameters": {"n": 9}}, {"resource_limits": {"min_nodes": 1}})
        for change in changes:
            assert_error(await user.request("PATCH", f"jobs/{uuid}", json={"job": change}), 422)
        assert_error(await service.admin.request("PUT", f"jobs/{uuid}", json={"job": {"script_version": "v2"}}), 422)
        assert await event_count(service) == before
        response = await user.request("PATCH", f"jobs/{uuid}", json={"job": {"priority": 9}})
        assert response.status == priority_status, (job["uuid"], response.body)
        if priority_status == 200:
            assert response.body["priority"] == 9
        else:
            assert_error(response, 422)
            assert await event_count(service) == before


async def test_update_ignores_server_set_attributes(service: ServiceHarness) -> None:
    user = await service.client("user")
    other = await service.client("user")
    job = await submit(user)
    server_set = {
        "uuid": "zzzzz-8i9sb-000000000000000", "kind": "orvos#pipeline", "etag": "x", "href": "/elsewhere",
        "owner_uuid": other.user_uuid, "created_at": "2000-01-01T00:00:00.000000Z",
        "modified_at": "2000-01-01T00:00:00.000000Z", "modified_by_user_uuid": other.user_uuid,
        "modified_by_client_uuid": None, "supplied_script_version": "v0",
    }  # fmt: skip
    response = await user.request("PATCH", f"jobs/{job['uuid']}", json={"job": {**server_set, "priority": 4}})
    assert response.status == 200, response.body
    updated = response.body
    assert updated["priority"] == 4
    kept = ("uuid", "kind", "href", "owner_uuid", "created_at", "modified_by_user_uuid", "supplied_script_version")
    assert {key: updated[key] for key in kept} == {key: job[key] for key in kept}
    assert updated["modified_at"] > job["modified_at"]
    # Only server-set attributes: nothing to change, nothing appended.
    before = await event_count(service)
    response = await user.request("PUT", f"jobs/{job['uuid']}", json={"job": server_set})
    assert response.status == 200, response.body
    assert response.body == updated
    assert await event_count(service) == before


async def test_update_with_unchanged_values_appends_nothing(service: ServiceHarness) -> None:
    user = await service.client("user")
    job = await submit(user, priority=3, script_parameters={"flag": 1})
    before = await event_count(service)
    same = {"priority": 3, "script_parameters": {"flag": 1}, "script_name": job["script_name"]}
    response = await user.request("PATCH", f"jobs/{job['uuid']}", json={"job": same})
    assert response.status == 200, response.body
    assert response.body == job
    assert await event_count(service) == before
    # true is not 1: a change JSON can see is a change.
    response = await user.request("PATCH", f"jobs/{job['uuid']}", json={"job": {"script_parameters": {"flag": True}}})
    assert response.status == 200, response.body
    assert response.body["script_parameters"] == {"flag": True}
    assert await event_count(service) == before + 1


STATE_ATTRIBUTES: list[tuple[str, Any, str]] = [
    ("state", "Complete", "finish"),
    ("running", True, "start"),
    ("started_at", "2026-01-01T00:00:00.000000Z", "start"),
    ("success", True, "finish"),
    ("finished_at", "2026-01-01T00:00:00.000000Z", "finish"),
    ("output", "out", "finish"),
    ("log", "log", "finish"),
    ("cancelled_at", "2026-01-01T00:00:00.000000Z", "cancel"),
    ("cancelled_by_user", "zzzzz-tpzed-000000000000000", "cancel"),
    ("cancelled_by_client", "zzzzz-ozdt8-000000000000000", "cancel"),
    ("is_locked_by", "zzzzz-tpzed-000000000000000", "lock"),
]


async def test_update_of_state_attributes_is_422_naming_the_method(service: ServiceHarness) -> None:
    user = await service.client("user")
    job = await submit(user)
    for attribute, value, method in STATE_ATTRIBUTES:
        for verb in ("PUT", "PATCH"):
            response = await user.request(verb, f"jobs/{job['uuid']}", json={"job": {attribute: value, "priority": 1}})
            assert_error(response, 422, attribute, method)
        # The same attributes are refused on create too.
        assert_error(await user.post("jobs", json={"job": attributes(**{attribute: value})}), 422, attribute, method)
    assert await event_count(service) == 1
    assert (await user.get(f"jobs/{job['uuid']}")).body == job


async def test_update_of_unknown_or_fixed_attributes_is_422(service: ServiceHarness) -> None:
    user = await service.client("user")
    job = await submit(user)
    for attribute in ("colour", "submit_id", "repository", "script", "nondeterministic"):
        response = await user.request("PATCH", f"jobs/{job['uuid']}", json={"job": {attribute: "x", "priority": 1}})
        assert_error(response, 422, attribute)
    assert await event_types(service, job["uuid"]) == ["submitted"]


# ---- delete ------------------------------------------------------------------------------------------------
async def test_delete_is_405_and_deletes_nothing(service: ServiceHarness) -> None:
    user = await service.client("user")
    job = await submit(user)
    for client in (user, service.admin):
        response = await client.request("DELETE", f"jobs/{job['uuid']}")
        assert_error(response, 405, "cancel")
        assert "DELETE" not in response.headers["Allow"]
    assert (await user.get(f"jobs/{job['uuid']}")).body == job
    assert await event_count(service) == 1


# ---- lock --------------------------------------------------------------------------------------------------
async def test_lock_by_dispatcher_or_admin_of_a_queued_unlocked_job(service: ServiceHarness) -> None:
    user = await service.client("user")
    dispatcher = await service.client("dispatcher")
    other_dispatcher = await service.client("dispatcher")
    job = await submit(user)
    uuid = job["uuid"]
    response = await dispatcher.post(f"jobs/{uuid}/lock")
    assert response.status == 200, response.body
    assert response.body["is_locked_by"] == dispatcher.user_uuid
    assert response.body["state"] == "Queued"
    assert response.headers["ETag"] == f'"{response.body["etag"]}"'
    assert await event_types(service, uuid) == ["submitted", "locked"]
    # Locked already: by the holder, another dispatcher or an admin, it is a lock conflict.
    for client in (dispatcher, other_dispatcher, service.admin):
        assert_error(await client.post(f"jobs/{uuid}/lock"), 422, "locked")
    assert_error(await user.post(f"jobs/{uuid}/lock"), 403)

    by_admin = await submit(user, script_parameters={"n": 2})
    response = await service.admin.post(f"jobs/{by_admin['uuid']}/lock")
    assert response.status == 200, response.body
    assert response.body["is_locked_by"] == service.admin.user_uuid

    running = await submit(user, script_parameters={"n": 3})
    await start(dispatcher, running["uuid"])
    cancelled = await submit(user, script_parameters={"n": 4})
    await cancel(user, cancelled["uuid"])
    before = await event_count(service)
    for not_queued in (running, cancelled):
        assert_error(await other_dispatcher.post(f"jobs/{not_queued['uuid']}/lock"), 422, "Queued")
    assert await event_count(service) == before


# ---- unlock ------------------------------------------------------------------------------------------------
async def test_unlock_by_the_holder_or_an_admin_before_start(service: ServiceHarness) -> None:
    user = await service.client("user")
    holder = await service.client("dispatcher")
    other = await service.client("dispatcher")
    job = await submit(user)
    uuid = job["uuid"]
    await lock(holder, uuid)
    assert_error(await other.post(f"jobs/{uuid}/unlock"), 422, "locked by")
    assert_error(await user.post(f"jobs/{uuid}/unlock"), 403)
    response = await holder.post(f"jobs/{uuid}/unlock")
    assert response.status == 200, response.body
    assert response.body["is_locked_by"] is None
    assert response.body["state"] == "Queued"
    assert_error(await holder.post(f"jobs/{uuid}/unlock"), 422, "not locked")
    # Unlocked, it can be locked again; an admin may release anyone's lock.
    await lock(other, uuid)
    response = await service.admin.post(f"jobs/{uuid}/unlock")
    assert response.status == 200, response.body
    assert response.body["is_locked_by"] is None
    assert await event_types(service, uuid) == ["submitted", "locked", "unlocked", "locked", "unlocked"]
    # Once started, nobody unlocks.
    await start(holder, uuid)
    before = await event_count(service)
    for client in (holder, service.admin):
        assert_error(await client.post(f"jobs/{uuid}/unlock"), 422, "Running")
    assert await event_count(service) == before


# ---- start -------------------------------------------------------------------------------------------------
async def test_start_by_the_holder_pins_the_commit(service: ServiceHarness) -> None:
    user = await service.client("user")
    holder = await service.client("dispatcher")
    other = await service.client("dispatcher")
    job = await submit(user, script_version="main")
    uuid = job["uuid"]
    assert_error(await holder.post(f"jobs/{uuid}/start", json={"script_version": COMMIT}), 422, "locked")
    await lock(holder, uuid)
    assert_error(await other.post(f"jobs/{uuid}/start", json={"script_version": COMMIT}), 422, "locked by")
    assert_error(await service.admin.post(f"jobs/{uuid}/start", json={"script_version": COMMIT}), 422, "locked by")
    before = await event_count(service)
    response = await holder.post(f"jobs/{uuid}/start", json={"script_version": COMMIT})
    assert response.status == 200, response.body
    started = response.body
    assert (started["state"], started["running"], started["success"]) == ("Running", True, None)
    assert (started["script_version"], started["supplied_script_version"]) == (COMMIT, "main")
    assert TIMESTAMP.fullmatch(started["started_at"])
    assert started["started_at"] == started["modified_at"]
    assert await event_count(service) == before + 1
    assert_error(await holder.post(f"jobs/{uuid}/start", json={"script_version": COMMIT}), 422, "Running")


START_VERSIONS: list[tuple[str, dict[str, Any], str | None]] = [
    # (script_version submitted, start body, commit pinned or None for a 422)
    ("main", {}, None),  # a branch, and no commit given
    ("v1.0", {"script_version": None}, None),  # a tag, and no commit given
    ("main", {"script_version": "develop"}, None),
    ("main", {"script_version": COMMIT[:39]}, None),
    ("main", {"script_version": COMMIT.upper()}, None),
    ("main", {"script_version": COMMIT + "0"}, None),
    ("main", {"script_version": 12345}, None),
    (COMMIT, {"script_version": "main"}, None),
    ("main", {"script_version": COMMIT}, COMMIT),
    ("main", {"job": {"script_version": COMMIT}}, COMMIT),
    (COMMIT, {}, COMMIT),  # already a commit
]


async def test_start_needs_a_40_hex_commit(service: ServiceHarness) -> None:
    user = await service.client("user")
    dispatcher = await service.client("dispatcher")
    for index, (submitted, body, pinned) in enumerate(START_VERSIONS):
        job = await submit(user, script_version=submitted, script_parameters={"case": index})
        await lock(dispatcher, job["uuid"])
        before = await event_count(service)
        response = await dispatcher.post(f"jobs/{job['uuid']}/start", json=body)
        if pinned is None:
            assert_error(response, 422, "script_version")
            assert await event_count(service) == before
        else:
            assert response.status == 200, response.body
            assert (response.body["script_version"], response.body["supplied_script_version"]) == (pinned, submitted)


# ---- cancel ------------------------------------------------------------------------------------------------
async def test_cancel_sets_the_cancel_attributes_server_side(service: ServiceHarness) -> None:
    user = await service.client("user")
    job = await submit(user)
    before = await service.pool.fetchval("SELECT clock_timestamp()")
    # Cancel attributes in the body are not the client's to set.
    response = await user.post(
        f"jobs/{job['uuid']}/cancel",
        json={"cancelled_at": "2000-01-01T00:00:00.000000Z", "cancelled_by_user": service.admin.user_uuid},
    )
    assert response.status == 200, response.body
    cancelled = response.body
    after = await service.pool.fetchval("SELECT clock_timestamp()")
    assert (cancelled["state"], cancelled["running"]) == ("Cancelled", False)
    assert before < datetime.fromisoformat(cancelled["cancelled_at"]) < after
    assert cancelled["cancelled_by_user"] == user.user_uuid
    assert cancelled["cancelled_by_client"] == await client_uuid(service, user.user_uuid)
    assert cancelled["modified_at"] == cancelled["cancelled_at"]
    event = await last_event(service, job["uuid"])
    assert (event["event_type"], event["actor_user_uuid"]) == ("cancelled", user.user_uuid)


async def test_cancel_queued_or_running_locked_or_not(service: ServiceHarness) -> None:
    user = await service.client("user")
    dispatcher = await service.client("dispatcher")
    queued = await submit(user, script_parameters={"n": 1})
    locked = await submit(user, script_parameters={"n": 2})
    await lock(dispatcher, locked["uuid"])
    running = await submit(user, script_parameters={"n": 3})
    await start(dispatcher, running["uuid"])
    cases = ((queued, user), (locked, user), (running, dispatcher))
    for job, canceller in cases:
        response = await canceller.post(f"jobs/{job['uuid']}/cancel")
        assert response.status == 200, response.body
        assert response.body["state"] == "Cancelled"
        assert response.body["cancelled_by_user"] == canceller.user_uuid
    locked_after = await user.get(f"jobs/{locked['uuid']}")
    assert locked_after.body["is_locked_by"] == dispatcher.user_uuid
    by_admin = await submit(user, script_parameters={"n": 4})
    assert (await cancel(service.admin, by_admin["uuid"]))["cancelled_by_user"] == service.admin.user_uuid


async def test_cancelling_a_cancelled_job_is_200_and_appends_nothing(service: ServiceHarness) -> None:
    user = await service.client("user")
    dispatcher = await service.client("dispatcher")
    job = await submit(user)
    cancelled = await cancel(user, job["uuid"])
    before = await event_count(service)
    for client in (user, dispatcher, service.admin):
        response = await client.post(f"jobs/{job['uuid']}/cancel")
        assert response.status == 200, response.body
        assert response.body == cancelled
    assert await event_count(service) == before


async def test_cancelling_a_finished_job_is_422(service: ServiceHarness) -> None:
    user = await service.client("user")
    dispatcher = await service.client("dispatcher")
    complete = await submit(user, script_parameters={"n": 1})
    await finish(dispatcher, complete["uuid"], success=True)
    failed = await submit(user, script_parameters={"n": 2})
    await finish(dispatcher, failed["uuid"], success=False)
    before = await event_count(service)
    for job in (complete, failed):
        assert_error(await user.post(f"jobs/{job['uuid']}/cancel"), 422, "cannot be cancelled")
    assert await event_count(service) == before


# ---- finish ------------------------------------------------------------------------------------------------
async def test_finish_by_the_holder_of_a_started_job(service: ServiceHarness) -> None:
    user = await service.client("user")
    holder = await service.client("dispatcher")
    other = await service.client("dispatcher")
    for success, state in ((True, "Complete"), (False, "Failed")):
        await _check_finish(service, user, holder, other, success, state)


async def _check_finish(
    service: ServiceHarness, user: ApiClient, holder: ApiClient, other: ApiClient, success: bool, state: str
) -> None:
    job = await submit(user, script_parameters={"success": success})
    uuid = job["uuid"]
    await lock(holder, uuid)
    body = {"success": success, "output": "d41d8cd98f00b204e9800998ecf8427e+0", "log": "log-1"}
    assert_error(await holder.post(f"jobs/{uuid}/finish", json=body), 422, "never started")
    await holder.post(f"jobs/{uuid}/start", json={"script_version": COMMIT})
    before = await event_count(service)
    assert_error(await other.post(f"jobs/{uuid}/finish", json=body), 422, "locked by")
    assert_error(await service.admin.post(f"jobs/{uuid}/finish", json=body), 422, "locked by")
    for bad in ({}, {"success": None}, {"success": "true"}, {"success": 1}, {"success": True, "colour": "red"}):
        assert_error(await holder.post(f"jobs/{uuid}/finish", json=bad), 422)
    assert await event_count(service) == before
    response = await holder.post(f"jobs/{uuid}/finish", json=body)
    assert response.status == 200, response.body
    finished = response.body
    assert (finished["state"], finished["success"], finished["running"]) == (state, success, False)
    assert (finished["output"], finished["log"]) == (body["output"], body["log"])
    assert TIMESTAMP.fullmatch(finished["finished_at"])
    assert_error(await holder.post(f"jobs/{uuid}/finish", json=body), 422, "already finished")


async def test_finish_after_cancel_keeps_the_job_cancelled(service: ServiceHarness) -> None:
    user = await service.client("user")
    dispatcher = await service.client("dispatcher")
    job = await submit(user)
    await start(dispatcher, job["uuid"])
    cancelled = await cancel(user, job["uuid"])
    response = await dispatcher.post(f"jobs/{job['uuid']}/finish", json={"success": False, "log": "killed"})
    assert response.status == 200, response.body
    finished = response.body
    assert finished["state"] == "Cancelled"
    assert (finished["success"], finished["log"], finished["running"]) == (False, "killed", False)
    assert finished["finished_at"] is not None
    assert finished["cancelled_at"] == cancelled["cancelled_at"]
    assert await event_types(service, job["uuid"]) == ["submitted", "locked", "started", "cancelled", "finished"]


# ---- tunnelled GET, parameters, booleans -------------------------------------------------------------------
async def test_post_with_method_override_get_is_a_list_not_a_create(service: ServiceHarness) -> None:
    user = await service.client("user")
    await submit(user)
    override = {"X-HTTP-Method-Override": "GET"}
    responses = [
        await user.post("jobs", data={"limit": "10"}, headers=override),  # googleapiclient: a form body
        await user.post("jobs", json={"job": attributes(script_name="new.py")}, headers=override),
        await user.post("jobs", headers=override),
    ]
    assert await job_count(service) == 1
    assert await event_count(service) == 1
    for response in responses:
        assert response.status != 201, response.body
    listed = responses[0]
    assert listed.status == 200, listed.body
    assert listed.body["kind"] == "orvos#jobList"
    assert [item["script_name"] for item in listed.body["items"]] == ["hash.py"]


async def test_unknown_query_parameters_are_ignored(service: ServiceHarness) -> None:
    user = await service.client("user")
    dispatcher = await service.client("dispatcher")
    extra = {"alt": "json", "prettyPrint": "false", "fields": "uuid", "whatever": "1"}
    created = await user.post("jobs", json={"job": attributes()}, params={**extra, "allow_duplicate": "1"})
    assert created.status == 201, created.body
    uuid = created.body["uuid"]
    got = await user.get(f"jobs/{uuid}", params=extra)
    assert got.status == 200
    assert got.body == created.body
    patched = await user.request("PATCH", f"jobs/{uuid}", json={"job": {"priority": 2}}, params=extra)
    assert patched.status == 200, patched.body
    for action in ("lock", "cancel"):
        response = await dispatcher.post(f"jobs/{uuid}/{action}", params=extra)
        assert response.status == 200, response.body


BOOLEANS: list[tuple[Any, bool]] = [
    ("true", True), ("1", True), ("TRUE", True), (True, True), (1, True),
    ("false", False), ("0", False), ("False", False), (False, False), (0, False),
]  # fmt: skip


async def test_booleans_accept_true_false_1_0(service: ServiceHarness) -> None:
    user = await service.client("user")
    for index, (value, new_job) in enumerate(BOOLEANS):
        job = attributes(script_parameters={"case": index})
        first = await submit(user, script_parameters={"case": index})
        expected_status = 201 if new_job else 200
        in_body = await user.post("jobs", json={"job": job, "allow_duplicate": value})
        assert in_body.status == expected_status, (value, in_body.body)
        in_query = await user.post("jobs", json={"job": job}, params={"allow_duplicate": str(value).lower()})
        assert in_query.status == expected_status, (value, in_query.body)
        uuids = {first["uuid"], in_body.body["uuid"], in_query.body["uuid"]}
        assert len(uuids) == (3 if new_job else 1)


async def test_other_boolean_spellings_are_422(service: ServiceHarness) -> None:
    user = await service.client("user")
    for value in ("yes", "2", "", "null", "truthy", 2, [True], 0.5):
        assert_error(
            await user.post("jobs", json={"job": attributes(), "allow_duplicate": value}), 422, "allow_duplicate"
        )
        assert_error(await user.post("jobs", json={"job": attributes()}, params={"find_or_create": str(value)}), 422)
    assert await event_count(service) == 0


# ---- If-Match and ETag -------------------------------------------------------------------------------------
async def test_if_match_mismatch_is_412_and_appends_nothing(service: ServiceHarness) -> None:
    user = await service.client("user")
    dispatcher = await service.client("dispatcher")
    job = await submit(user)
    uuid = job["uuid"]
    stale = job["etag"]
    changed = await user.request("PATCH", f"jobs/{uuid}", json={"job": {"priority": 1}})
    assert changed.status == 200
    before = await event_count(service)
    for header in (f'"{stale}"', stale, '"nope"', f'W/"{changed.body["etag"]}"', f'"{stale}", "other"'):
        headers = {"If-Match": header}
        assert_error(await user.request("PUT", f"jobs/{uuid}", json={"job": {"priority": 2}}, headers=headers), 412)
        assert_error(await user.request("PATCH", f"jobs/{uuid}", json={"job": {"priority": 2}}, headers=headers), 412)
        actions = (("lock", {}), ("unlock", {}), ("start", {}), ("cancel", {}), ("finish", {"success": True}))
        for action, body in actions:
            # The precondition is checked before the job's state: unlock, start and finish fail on it first.
            assert_error(await dispatcher.post(f"jobs/{uuid}/{action}", json=body, headers=headers), 412)
    assert await event_count(service) == before
    assert (await user.get(f"jobs/{uuid}")).body == changed.body


async def test_if_match_match_is_200(service: ServiceHarness) -> None:
    user = await service.client("user")
    dispatcher = await service.client("dispatcher")
    job = await submit(user)
    uuid = job["uuid"]
    etag = job["etag"]
    forms = ('"{}"', "{}", "*", '"other", "{}"', 'W/"other", "{}"')
    for priority, form in enumerate(forms, start=1):
        header = form.format(etag)
        response = await user.request(
            "PATCH", f"jobs/{uuid}", json={"job": {"priority": priority}}, headers={"If-Match": header}
        )
        assert response.status == 200, (header, response.body)
        assert response.body["priority"] == priority
        etag = response.body["etag"]
    for action, body in (("lock", {}), ("start", {"script_version": COMMIT}), ("finish", {"success": True})):
        response = await dispatcher.post(f"jobs/{uuid}/{action}", json=body, headers={"If-Match": f'"{etag}"'})
        assert response.status == 200, response.body
        etag = response.body["etag"]


async def test_etag_header_is_the_jobs_etag_and_changes_with_it(service: ServiceHarness) -> None:
    user = await service.client("user")
    dispatcher = await service.client("dispatcher")
    created = await user.post("jobs", json={"job": attributes()}, params={"allow_duplicate": "true"})
    uuid = created.body["uuid"]
    responses = [
        created,
        await user.get(f"jobs/{uuid}"),
        await user.request("PATCH", f"jobs/{uuid}", json={"job": {"priority": 1}}),
        await user.request("PUT", f"jobs/{uuid}", json={"job": {"priority": 2}}),
        await dispatcher.post(f"jobs/{uuid}/lock"),
        await dispatcher.post(f"jobs/{uuid}/unlock"),
        await dispatcher.post(f"jobs/{uuid}/lock"),
        await dispatcher.post(f"jobs/{uuid}/start", json={"script_version": COMMIT}),
        await user.post(f"jobs/{uuid}/cancel"),
        await dispatcher.post(f"jobs/{uuid}/finish", json={"success": False}),
        await user.get(f"jobs/{uuid}"),
    ]
    for response in responses:
        assert response.status in (200, 201), response.body
        assert response.headers["ETag"] == f'"{response.body["etag"]}"'
    etags = [response.body["etag"] for response in responses[1:-1]]
    assert len(set(etags)) == len(etags)  # every change changed it
    assert responses[-1].body["etag"] == etags[-1]


# ---- races with real parallel clients ----------------------------------------------------------------------
async def test_lock_race_has_exactly_one_winner(service: ServiceHarness) -> None:
    user = await service.client("user")
    dispatchers = [await service.client("dispatcher") for _ in range(10)]
    for round_ in range(3):
        job = await submit(user, script_parameters={"round": round_})
        uuid = job["uuid"]
        responses = await asyncio.gather(*(d.post(f"jobs/{uuid}/lock") for d in dispatchers))
        winners = [d for d, r in zip(dispatchers, responses, strict=True) if r.status == 200]
        assert len(winners) == 1, [r.status for r in responses]
        for response in responses:
            if response.status != 200:
                assert_error(response, 422, "locked")
        assert (await user.get(f"jobs/{uuid}")).body["is_locked_by"] == winners[0].user_uuid
        assert await event_types(service, uuid) == ["submitted", "locked"]


async def test_parallel_creates_with_one_submit_id_make_one_job(service: ServiceHarness) -> None:
    user = await service.client("user")
    for allow_duplicate in ("true", "false"):
        submit_id = f"retry-{allow_duplicate}"
        body = {"job": attributes(submit_id=submit_id, script_parameters={"mode": allow_duplicate})}
        params = {"allow_duplicate": allow_duplicate}
        responses = await asyncio.gather(*(user.post("jobs", json=body, params=params) for _ in range(8)))
        statuses = sorted(response.status for response in responses)
        assert statuses == [200] * 7 + [201], [response.body for response in responses]
        assert len({response.body["uuid"] for response in responses}) == 1
        rows = await service.pool.fetch("SELECT uuid FROM jobs WHERE submit_id = $1", submit_id)
        assert len(rows) == 1
        assert await event_types(service, rows[0]["uuid"]) == ["submitted"]


async def test_parallel_reusing_creates_with_one_submit_id_append_one_reused_event(service: ServiceHarness) -> None:
    user = await service.client("user")
    original = await submit(user)
    body = {"job": attributes(submit_id="again")}
    responses = await asyncio.gather(*(user.post("jobs", json=body) for _ in range(8)))
    assert [response.status for response in responses] == [200] * 8, [response.body for response in responses]
    assert {response.body["uuid"] for response in responses} == {original["uuid"]}
    assert await event_types(service, original["uuid"]) == ["submitted", "reused"]
    assert await job_count(service) == 1
