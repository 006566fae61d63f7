"""Contract tests of duplicates and idempotence (CONTRACT §4), over HTTP against the real service.

Reuse: without ``allow_duplicate`` (or with ``find_or_create=true``) an identical job that has not failed and
that the caller may reuse is returned (200) and a ``reused`` event is appended to it; what counts as identical,
and which jobs never qualify. ``submit_id``: a retry returns the original job and appends nothing, whether the
original submission created a job or reused one; the same ``submit_id`` with different attributes is 422.
"""

from __future__ import annotations

from typing import Any

from tests.contract import (
    COMMIT,
    OTHER_COMMIT,
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


async def resubmit(client: ApiClient, params: dict[str, str] | None = None, **attrs: Any) -> tuple[int, dict]:
    """POST jobs without allow_duplicate (or with ``params``): the status and the job."""
    response = await client.post("jobs", json={"job": attributes(**attrs)}, params=params)
    assert response.status in (200, 201), response.body
    return response.status, response.body


async def test_an_identical_unfailed_job_is_returned_with_a_reused_event(service: ServiceHarness) -> None:
    user = await service.client("user")
    dispatcher = await service.client("dispatcher")
    queued = await submit(user, script_parameters={"s": "queued"})
    locked = await submit(user, script_parameters={"s": "locked"})
    await lock(dispatcher, locked["uuid"])
    running = await submit(user, script_parameters={"s": "running"})
    await start(dispatcher, running["uuid"])
    complete = await submit(user, script_parameters={"s": "complete"}, script_version=COMMIT)
    await finish(dispatcher, complete["uuid"])
    for job, absent_or_false in ((queued, None), (locked, "false"), (running, "0"), (complete, None)):
        current = (await user.get(f"jobs/{job['uuid']}")).body
        params = None if absent_or_false is None else {"allow_duplicate": absent_or_false}
        before = await event_count(service)
        status, body = await resubmit(
            user,
            params,
            script_parameters=job["script_parameters"],
            script_version=current["script_version"],  # the commit it started with, once started
            priority=99,  # not part of identity
            resource_limits={"max_nodes": 9},  # nor this
            submit_id=f"again-{job['uuid']}",
        )
        assert status == 200
        # No attribute changes; only the history grew by one event (so version and etag move on).
        assert {**body, "version": None, "etag": None} == {**current, "version": None, "etag": None}
        assert body["etag"] != current["etag"]
        assert body["version"] == current["version"] + 1
        assert await event_count(service) == before + 1
        event = await last_event(service, job["uuid"])
        assert event["event_type"] == "reused"
        assert event["data"] == {"submit_id": f"again-{job['uuid']}"}
        assert event["actor_user_uuid"] == user.user_uuid
    assert await job_count(service) == 4


async def test_parameter_key_order_does_not_matter(service: ServiceHarness) -> None:
    user = await service.client("user")
    original = await submit(user, script_parameters={"a": 1, "b": {"x": [1, {"p": 1, "q": 2}], "y": None}})
    status, body = await resubmit(user, script_parameters={"b": {"y": None, "x": [1, {"q": 2, "p": 1}]}, "a": 1})
    assert status == 200
    assert body["uuid"] == original["uuid"]
    assert await event_types(service, original["uuid"]) == ["submitted", "reused"]


async def test_jobs_that_are_not_identical_are_not_reused(service: ServiceHarness) -> None:
    user = await service.client("user")
    await submit(user, script_name="a.py", script_version="main", script_parameters={"n": 1, "list": [1, 2]})
    different: list[dict[str, Any]] = [
        {"script_name": "b.py", "script_version": "main", "script_parameters": {"n": 1, "list": [1, 2]}},
        {"script_name": "a.py", "script_version": "dev", "script_parameters": {"n": 1, "list": [1, 2]}},
        {"script_name": "a.py", "script_version": "main", "script_parameters": {"n": 2, "list": [1, 2]}},
        {"script_name": "a.py", "script_version": "main", "script_parameters": {"n": True, "list": [1, 2]}},
        {"script_name": "a.py", "script_version": "main", "script_parameters": {"n": 1, "list": [2, 1]}},
        {"script_name": "a.py", "script_version": "main", "script_parameters": {"n": 1}},
        {"script_name": "a.py", "script_version": "main", "script_parameters": {"n": 1, "list": [1, 2], "z": 0}},
    ]
    for attrs in different:
        status, body = await resubmit(user, **attrs)
        assert status == 201, attrs
        assert await event_types(service, body["uuid"]) == ["submitted"]
    assert await job_count(service) == 1 + len(different)
    assert await service.pool.fetchval("SELECT count(*) FROM events WHERE event_type = 'reused'") == 0


async def test_another_users_unfinished_job_is_never_reused(service: ServiceHarness) -> None:
    owner = await service.client("user")
    other = await service.client("user")
    dispatcher = await service.client("dispatcher")
    queued = await submit(owner, script_parameters={"s": "queued"})
    running = await submit(owner, script_parameters={"s": "running"})
    await start(dispatcher, running["uuid"])
    for job in (queued, running):
        for client in (other, service.admin):
            status, body = await resubmit(client, script_parameters=job["script_parameters"])
            assert status == 201
            assert body["owner_uuid"] == client.user_uuid
    assert await service.pool.fetchval("SELECT count(*) FROM events WHERE event_type = 'reused'") == 0


async def test_failed_and_cancelled_jobs_are_never_reused(service: ServiceHarness) -> None:
    user = await service.client("user")
    dispatcher = await service.client("dispatcher")
    failed = await submit(user, script_parameters={"s": "failed"}, script_version=COMMIT)
    await finish(dispatcher, failed["uuid"], success=False)
    cancelled_queued = await submit(user, script_parameters={"s": "cancelled"})
    await cancel(user, cancelled_queued["uuid"])
    cancelled_running = await submit(user, script_parameters={"s": "cancelled-running"}, script_version=COMMIT)
    await start(dispatcher, cancelled_running["uuid"])
    await cancel(user, cancelled_running["uuid"])
    # Finished after the cancel, successfully even: still Cancelled, still not reusable.
    response = await dispatcher.post(f"jobs/{cancelled_running['uuid']}/finish", json={"success": True, "output": "o"})
    assert response.body["state"] == "Cancelled"
    for job in (failed, cancelled_queued, cancelled_running):
        status, body = await resubmit(
            user, script_parameters=job["script_parameters"], script_version=job["script_version"]
        )
        assert status == 201
        assert body["uuid"] != job["uuid"]
    assert await service.pool.fetchval("SELECT count(*) FROM events WHERE event_type = 'reused'") == 0


async def test_another_users_complete_job_is_reused_only_by_callers_who_can_read_it(service: ServiceHarness) -> None:
    owner = await service.client("user")
    other = await service.client("user")
    dispatcher = await service.client("dispatcher")
    complete = await submit(owner, script_version=COMMIT)
    await finish(dispatcher, complete["uuid"])
    # Another user cannot read it: a new job, and nothing on the complete job's record.
    status, body = await resubmit(other, script_version=COMMIT)
    assert status == 201
    assert body["owner_uuid"] == other.user_uuid
    assert await event_types(service, complete["uuid"]) == ["submitted", "locked", "started", "finished"]
    # An admin reads every job: the complete one is returned.
    status, body = await resubmit(service.admin, script_version=COMMIT)
    assert status == 200
    assert body["uuid"] == complete["uuid"]
    event = await last_event(service, complete["uuid"])
    assert (event["event_type"], event["actor_user_uuid"]) == ("reused", service.admin.user_uuid)


async def test_the_resolved_commit_counts_as_the_version(service: ServiceHarness) -> None:
    user = await service.client("user")
    dispatcher = await service.client("dispatcher")
    job = await submit(user, script_version="main")
    await finish(dispatcher, job["uuid"])  # started at COMMIT
    status, body = await resubmit(user, script_version=COMMIT)
    assert (status, body["uuid"]) == (200, job["uuid"])
    # "main" may have moved on since: a branch name does not match the commit a finished job ran.
    status, body = await resubmit(user, script_version="main")
    assert status == 201
    status, _ = await resubmit(user, script_version=OTHER_COMMIT)
    assert status == 201


async def test_complete_jobs_that_disagree_on_output_are_not_reused(service: ServiceHarness) -> None:
    user = await service.client("user")
    dispatcher = await service.client("dispatcher")
    first = await submit(user, script_version=COMMIT)
    await finish(dispatcher, first["uuid"], output="out-1")
    status, body = await resubmit(user, script_version=COMMIT)
    assert (status, body["uuid"]) == (200, first["uuid"])
    second = await submit(user, script_version=COMMIT)
    await finish(dispatcher, second["uuid"], output="out-2")
    status, body = await resubmit(user, script_version=COMMIT)
    assert status == 201
    assert body["uuid"] not in (first["uuid"], second["uuid"])


async def test_find_or_create_is_accepted_as_the_negation(service: ServiceHarness) -> None:
    user = await service.client("user")
    original = await submit(user)
    cases: list[tuple[dict[str, str], int]] = [
        ({"find_or_create": "true"}, 200),
        ({"find_or_create": "1"}, 200),
        ({"find_or_create": "false"}, 201),
        ({"find_or_create": "true", "allow_duplicate": "false"}, 200),
        ({"find_or_create": "false", "allow_duplicate": "true"}, 201),
    ]
    for params, expected in cases:
        status, body = await resubmit(user, params)
        assert status == expected, params
        if expected == 200:
            assert body["uuid"] == original["uuid"]
    # In the body, beside the job, as Arvados clients send it.
    response = await user.post("jobs", json={"job": attributes(), "find_or_create": True})
    assert (response.status, response.body["uuid"]) == (200, original["uuid"])


async def test_contradicting_allow_duplicate_and_find_or_create_is_422(service: ServiceHarness) -> None:
    user = await service.client("user")
    await submit(user)
    before = await event_count(service)
    for allow_duplicate, find_or_create in (("true", "true"), ("false", "false"), ("1", "true"), ("0", "0")):
        params = {"allow_duplicate": allow_duplicate, "find_or_create": find_or_create}
        response = await user.post("jobs", json={"job": attributes()}, params=params)
        assert_error(response, 422, "allow_duplicate", "find_or_create")
        mixed = await user.post(
            "jobs",
            json={"job": attributes(), "find_or_create": find_or_create},
            params={"allow_duplicate": allow_duplicate},
        )
        assert_error(mixed, 422, "contradict")
    assert await event_count(service) == before


# ---- submit_id ---------------------------------------------------------------------------------------------
async def test_a_submit_id_retry_returns_the_original_job_and_appends_nothing(service: ServiceHarness) -> None:
    user = await service.client("user")
    dispatcher = await service.client("dispatcher")
    original = await submit(user, submit_id="run-1", priority=3)
    before = await event_count(service)
    for params in ({"allow_duplicate": "true"}, {"allow_duplicate": "false"}, {}):
        response = await user.post("jobs", json={"job": attributes(submit_id="run-1", priority=3)}, params=params)
        assert response.status == 200, response.body
        assert response.body == original
    assert await event_count(service) == before
    # Whatever happened to the job since (even a failure), a retry gets it back as it is now.
    await finish(dispatcher, original["uuid"], success=False)
    response = await user.post("jobs", json={"job": attributes(submit_id="run-1", priority=3)})
    assert (response.status, response.body["uuid"], response.body["state"]) == (200, original["uuid"], "Failed")
    assert await event_types(service, original["uuid"]) == ["submitted", "locked", "started", "finished"]


async def test_a_submit_id_retry_of_a_reusing_submission_appends_nothing(service: ServiceHarness) -> None:
    user = await service.client("user")
    dispatcher = await service.client("dispatcher")
    existing = await submit(user)  # no submit_id
    status, body = await resubmit(user, submit_id="reuse-1")
    assert (status, body["uuid"]) == (200, existing["uuid"])
    assert await event_types(service, existing["uuid"]) == ["submitted", "reused"]
    for params in ({}, {"allow_duplicate": "true"}):
        status, body = await resubmit(user, params, submit_id="reuse-1")
        assert (status, body["uuid"]) == (200, existing["uuid"])
    assert await event_types(service, existing["uuid"]) == ["submitted", "reused"]
    # Even once the reused job has failed (and could no longer be reused), the retry gets that job.
    await finish(dispatcher, existing["uuid"], success=False)
    status, body = await resubmit(user, submit_id="reuse-1")
    assert (status, body["uuid"], body["state"]) == (200, existing["uuid"], "Failed")
    assert await job_count(service) == 1
    # And a different submission under that submit_id is refused.
    assert_error(await user.post("jobs", json={"job": attributes(submit_id="reuse-1", script_name="b.py")}), 422)


async def test_the_same_submit_id_with_different_attributes_is_422(service: ServiceHarness) -> None:
    user = await service.client("user")
    same: dict[str, Any] = {
        "submit_id": "run-2",
        "priority": 1,
        "resource_limits": {"min_nodes": 1},
        "script_parameters": {"input": "x", "n": 1},
    }
    original = await submit(user, **same)
    before = await event_count(service)
    changes: list[dict[str, Any]] = [
        {"script_name": "other.py"},
        {"script_version": "dev"},
        {"script_parameters": {"input": "y", "n": 1}},
        {"script_parameters": {"input": "x", "n": True}},  # true is not 1
        {"priority": 2},
        {"resource_limits": {"min_nodes": 2}},
    ]
    for change in changes:
        (name,) = change
        for params in ({"allow_duplicate": "true"}, {}):
            response = await user.post("jobs", json={"job": attributes(**{**same, **change})}, params=params)
            assert_error(response, 422, "submit_id", "run-2", name)
    assert await event_count(service) == before
    assert await job_count(service) == 1
    # An update since does not make the original submission's retry a different one.
    patched = await user.request("PATCH", f"jobs/{original['uuid']}", json={"job": {"priority": 5}})
    assert patched.status == 200
    retry = await user.post("jobs", json={"job": attributes(**same)})
    assert (retry.status, retry.body["uuid"], retry.body["priority"]) == (200, original["uuid"], 5)


async def test_submit_id_is_unique_per_owner(service: ServiceHarness) -> None:
    first = await service.client("user")
    second = await service.client("user")
    one = await submit(first, submit_id="shared")
    other = await submit(second, submit_id="shared", script_parameters={"other": True})
    assert one["uuid"] != other["uuid"]
    assert (one["submit_id"], other["submit_id"]) == ("shared", "shared")
