"""Contract tests of who may do what (CONTRACT §2), over HTTP against the real service.

The role matrix: every role (user, auditor, dispatcher, admin), with a read-write and a read-only token, × every
Jobs method of CONTRACT §3 (and a job's history and the event stream) × the caller's own job and another's,
each cell with its expected status, written out below. Then: unreadable jobs are 404 (never
403, and indistinguishable from jobs that do not exist), read-only tokens may read but writing is 403,
missing, unknown and expired tokens are 401, the three ways of presenting a token, and tokens stored only
hashed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import UTC, datetime
from typing import Final

from ledger.access import Caller, Role
from ledger.service import JobService
from ledger.store import EventStore
from tests.contract import COMMIT, assert_error, attributes, event_count, lock, start, submit
from tests.harness import ApiClient, ServiceHarness
from tests.stream_support import wait_until_sequenced

METHODS: Final = (
    "list", "queue", "queue_size", "get", "get_as_of", "history", "events",
    "create", "update", "put", "delete", "lock", "unlock", "start", "cancel", "finish",
)  # fmt: skip
READS: Final = frozenset({"list", "queue", "queue_size", "get", "get_as_of", "history", "events"})
# For the collections (list, queue, the event stream): 200 and the job is in the answer, or HIDDEN: 200 and it
# is not. queue_size counts everyone's backlog, so it has no own or other's: 200 for any reader.
HIDDEN: Final = 0

# EXPECTED[role][method] = (status on the caller's own job, status on another's job).
#
# "Own": the caller owns the job; for unlock, start and finish the job is locked (and, for finish, started) by
# the caller when its role may lock, otherwise by a helper dispatcher. "Another's": another user owns the job
# and, for unlock, start and finish, another dispatcher holds its lock. For create, "another's" is a body
# naming another user as ``owner_uuid`` (a server-set attribute: ignored, the job is the caller's).
# Unreadable is 404 whatever the method; readable but not allowed is 403; allowed but refused by the job's
# state or lock (another's lock) is 422.
EXPECTED: Final[dict[Role, dict[str, tuple[int, int]]]] = {
    "user": {
        "list": (200, HIDDEN),
        "queue": (200, HIDDEN),
        "queue_size": (200, 200),
        "get": (200, 404),
        "get_as_of": (200, 404),
        "history": (200, 404),
        "events": (200, HIDDEN),
        "create": (201, 201),
        "update": (200, 404),
        "put": (200, 404),
        "delete": (405, 405),
        "lock": (403, 404),
        "unlock": (403, 404),
        "start": (403, 404),
        "cancel": (200, 404),
        "finish": (403, 404),
    },
    "auditor": {
        "list": (200, 200),
        "queue": (200, 200),
        "queue_size": (200, 200),
        "get": (200, 200),
        "get_as_of": (200, 200),
        "history": (200, 200),
        "events": (200, 200),
        "create": (403, 403),
        "update": (403, 403),
        "put": (403, 403),
        "delete": (405, 405),
        "lock": (403, 403),
        "unlock": (403, 403),
        "start": (403, 403),
        "cancel": (403, 403),
        "finish": (403, 403),
    },
    "dispatcher": {
        "list": (200, 200),
        "queue": (200, 200),
        "queue_size": (200, 200),
        "get": (200, 200),
        "get_as_of": (200, 200),
        "history": (200, 200),
        "events": (200, 200),
        "create": (403, 403),
        "update": (403, 403),
        "put": (403, 403),
        "delete": (405, 405),
        "lock": (200, 200),
        "unlock": (200, 422),
        "start": (200, 422),
        "cancel": (200, 200),
        "finish": (200, 422),
    },
    "admin": {
        "list": (200, 200),
        "queue": (200, 200),
        "queue_size": (200, 200),
        "get": (200, 200),
        "get_as_of": (200, 200),
        "history": (200, 200),
        "events": (200, 200),
        "create": (201, 201),
        "update": (200, 200),
        "put": (200, 200),
        "delete": (405, 405),
        "lock": (200, 200),
        "unlock": (200, 200),
        "start": (200, 422),
        "cancel": (200, 200),
        "finish": (200, 422),
    },
}


class Matrix:
    """The principals of the role matrix and how to set up a job for one cell."""

    def __init__(
        self, service: ServiceHarness, owner: ApiClient, helper: ApiClient, other_dispatcher: ApiClient
    ) -> None:
        self.service = service
        self.owner = owner  # "another user"
        self.helper = helper  # locks the own jobs of roles that cannot lock
        self.other_dispatcher = other_dispatcher  # holds the locks of another's jobs
        self.jobs = JobService(EventStore(service.pool), service.settings.uuid_prefix)
        self.serial = 0
        # Each user's read-write client: a read-only token's cells are set up with its user's other token.
        self.writers: dict[str, ApiClient] = {}

    async def own_job(self, caller: ApiClient) -> str:
        """A job owned by ``caller``. Auditors and dispatchers cannot submit over HTTP, so theirs is put on the
        ledger directly, as if they had submitted it before their role changed."""
        self.serial += 1
        parameters = {"cell": self.serial}
        caller = self.writers.get(caller.user_uuid, caller)
        if caller.role in ("user", "admin"):
            return (await submit(caller, script_parameters=parameters))["uuid"]
        as_owner = Caller(user_uuid=caller.user_uuid, role="admin", request_id=f"seed-{self.serial}")
        job, created = await self.jobs.create(
            as_owner, script_name="hash.py", script_version="main", script_parameters=parameters, reuse=False
        )
        assert created
        return job.uuid

    async def job_for(self, method: str, caller: ApiClient, own: bool) -> str:
        """The job the cell's request is made on."""
        if own:
            uuid = await self.own_job(caller)
            writer = self.writers.get(caller.user_uuid, caller)
            locker = writer if caller.role in ("dispatcher", "admin") else self.helper
        else:
            self.serial += 1
            uuid = (await submit(self.owner, script_parameters={"cell": self.serial}))["uuid"]
            locker = self.other_dispatcher
        if method in ("unlock", "start"):
            await lock(locker, uuid)
        elif method == "finish":
            await start(locker, uuid)
        return uuid

    async def attempt(self, method: str, caller: ApiClient, own: bool) -> tuple[int, int]:
        """Make the cell's request; return its status and how many events it appended."""
        uuid = "" if method == "create" else await self.job_for(method, caller, own)
        if method == "events":
            await wait_until_sequenced(self.service.pool)  # so that the stream shows the job's events
        before = await event_count(self.service)
        only_this_job = {"filters": json.dumps([["uuid", "=", uuid]])}
        if method in ("list", "queue"):
            response = await caller.get("jobs" if method == "list" else "jobs/queue", params=only_this_job)
            if response.status == 200 and not response.body["items"]:
                return HIDDEN, await event_count(self.service) - before
        elif method == "events":
            stream_filter = {"filters": json.dumps([["job_uuid", "=", uuid]])}
            response = await caller.get("events", params=stream_filter)
            if response.status == 200 and not response.body["items"]:
                return HIDDEN, await event_count(self.service) - before
        elif method == "queue_size":
            response = await caller.get("jobs/queue_size")
        elif method == "get":
            response = await caller.get(f"jobs/{uuid}")
        elif method == "get_as_of":
            response = await caller.get(f"jobs/{uuid}", params={"as_of_version": "1"})
        elif method == "history":
            response = await caller.get(f"jobs/{uuid}/events")
        elif method == "delete":
            response = await caller.request("DELETE", f"jobs/{uuid}")
        elif method == "put":
            response = await caller.request("PUT", f"jobs/{uuid}", json={"job": {"priority": 8}})
        elif method == "create":
            self.serial += 1
            job = attributes(script_parameters={"cell": self.serial})
            if not own:
                job["owner_uuid"] = self.owner.user_uuid
            response = await caller.post("jobs", json={"job": job})
            if response.status == 201:
                assert response.body["owner_uuid"] == caller.user_uuid
        elif method == "update":
            response = await caller.request("PATCH", f"jobs/{uuid}", json={"job": {"priority": 7}})
        elif method == "start":
            response = await caller.post(f"jobs/{uuid}/start", json={"script_version": COMMIT})
        elif method == "finish":
            response = await caller.post(f"jobs/{uuid}/finish", json={"success": True})
        else:
            response = await caller.post(f"jobs/{uuid}/{method}")
        if response.status >= 400:
            assert_error(response, response.status)
        return response.status, await event_count(self.service) - before


def read_only_expectation(method: str, read_write: int) -> int:
    """What a read-only token of the same role gets: reads as before; a write 403, unless the job is not
    readable at all (404: no existence leak) or the method never does anything (405)."""
    if method in READS or read_write in (404, 405):
        return read_write
    return 403


async def test_role_matrix(service: ServiceHarness) -> None:
    callers: dict[Role, ApiClient] = {role: await service.client(role) for role in EXPECTED}
    callers["admin"] = service.admin
    read_only = {role: await service.token_for(client, read_only=True) for role, client in callers.items()}
    matrix = Matrix(
        service,
        owner=await service.client("user", name="another-user"),
        helper=await service.client("dispatcher", name="helper-dispatcher"),
        other_dispatcher=await service.client("dispatcher", name="other-dispatcher"),
    )
    matrix.writers = {client.user_uuid: client for client in callers.values()}
    wrong = []
    for role, row in EXPECTED.items():
        assert set(row) == set(METHODS)
        for method, statuses in row.items():
            for own, expected in zip((True, False), statuses, strict=True):
                for token, caller, wanted in (
                    ("read-write", callers[role], expected),
                    ("read-only", read_only[role], read_only_expectation(method, expected)),
                ):
                    status, appended = await matrix.attempt(method, caller, own)
                    expected_appended = 1 if wanted in (200, 201) and method not in READS else 0
                    if (status, appended) != (wanted, expected_appended):
                        cell = f"{role} ({token}) {method} {'own' if own else 'other'}"
                        wrong.append(f"{cell}: {status} (+{appended} events), expected {wanted}")
    assert not wrong, "cells differing from the matrix:\n" + "\n".join(wrong)


async def test_an_unreadable_job_is_404_exactly_like_a_missing_one(service: ServiceHarness) -> None:
    owner = await service.client("user")
    stranger = await service.client("user")
    read_only_stranger = await service.token_for(stranger, read_only=True)
    job = await submit(owner)
    missing = "zzzzz-8i9sb-000000000000000"
    before = await event_count(service)
    requests = [
        ("GET", "", None),
        ("PATCH", "", {"job": {"priority": 1}}),
        ("PUT", "", {"job": {"priority": 1}}),
        ("POST", "/cancel", None),
        ("POST", "/lock", None),
        ("POST", "/unlock", None),
        ("POST", "/start", {"script_version": COMMIT}),
        ("POST", "/finish", {"success": True}),
    ]
    for client in (stranger, read_only_stranger):
        for verb, suffix, body in requests:
            hidden = await client.request(verb, f"jobs/{job['uuid']}{suffix}", json=body)
            absent = await client.request(verb, f"jobs/{missing}{suffix}", json=body)
            assert_error(hidden, 404)
            assert_error(absent, 404)
            assert hidden.body["errors"] == absent.body["errors"] == ["Path not found"]
    assert await event_count(service) == before
    assert (await owner.get(f"jobs/{job['uuid']}")).body == job


async def test_a_read_only_token_reads_but_writing_is_403(service: ServiceHarness) -> None:
    user = await service.client("user")
    dispatcher = await service.client("dispatcher")
    read_only_user = await service.token_for(user, read_only=True)
    read_only_dispatcher = await service.token_for(dispatcher, read_only=True)
    read_only_admin = await service.token_for(service.admin, read_only=True)
    job = await submit(user)
    uuid = job["uuid"]
    for client in (read_only_user, read_only_dispatcher, read_only_admin):
        got = await client.get(f"jobs/{uuid}")
        assert got.status == 200
        assert got.body == job
    started = await submit(user, script_parameters={"n": 2})
    await start(dispatcher, started["uuid"])
    before = await event_count(service)
    writes = [
        (read_only_user, "POST", "jobs", {"job": attributes(script_parameters={"n": 3})}),
        (read_only_user, "PATCH", f"jobs/{uuid}", {"job": {"priority": 1}}),
        (read_only_user, "POST", f"jobs/{uuid}/cancel", None),
        (read_only_dispatcher, "POST", f"jobs/{uuid}/lock", None),
        (read_only_dispatcher, "POST", f"jobs/{uuid}/cancel", None),
        (read_only_dispatcher, "POST", f"jobs/{started['uuid']}/finish", {"success": True}),
        (read_only_admin, "POST", "jobs", {"job": attributes(script_parameters={"n": 4})}),
        (read_only_admin, "PUT", f"jobs/{uuid}", {"job": {"priority": 1}}),
        (read_only_admin, "POST", f"jobs/{uuid}/lock", None),
    ]
    for client, verb, path, body in writes:
        assert_error(await client.request(verb, path, json=body), 403, "read-only")
    assert await event_count(service) == before


async def test_missing_unknown_and_expired_tokens_are_401(service: ServiceHarness) -> None:
    user = await service.client("user")
    job = await submit(user)
    expiring = await service.token_for(user, expires_in=1.0)
    assert (await expiring.get(f"jobs/{job['uuid']}")).status == 200  # valid (and cached) until it expires
    expired = await service.token_for(user, expires_in=0.01)
    await _wait_until_expired(service, expiring)
    await _wait_until_expired(service, expired)
    before = await event_count(service)
    cases = [
        (service.anonymous(), {}),
        (service.with_token("not-a-token"), {}),
        (service.with_token(""), {}),
        (service.with_token(user.token + "x"), {}),
        (service.anonymous(), {"Authorization": "Basic dXNlcjpwYXNz"}),
        (service.anonymous(), {"Authorization": f"Token {user.token}"}),
        (expiring, {}),
        (expired, {}),
    ]
    for client, headers in cases:
        for verb, path, body in (
            ("GET", f"jobs/{job['uuid']}", None),
            ("POST", "jobs", {"job": attributes(script_parameters={"n": 2})}),
            ("POST", f"jobs/{job['uuid']}/cancel", None),
        ):
            assert_error(await client.request(verb, path, json=body, headers=headers), 401, "Not logged in")
    assert await event_count(service) == before


async def _wait_until_expired(service: ServiceHarness, client: ApiClient) -> None:
    """Wait for the deadline of the client's token (stored with the token) to pass."""
    digest = hashlib.sha256((client.token or "").encode()).digest()
    expires_at = await service.pool.fetchval("SELECT expires_at FROM api_tokens WHERE token_sha256 = $1", digest)
    await asyncio.sleep(max(0.0, (expires_at - datetime.now(UTC)).total_seconds()) + 0.001)
    assert datetime.now(UTC) > expires_at


async def test_a_token_is_accepted_as_bearer_oauth2_or_api_token(service: ServiceHarness) -> None:
    user = await service.client("user")
    job = await submit(user)
    anonymous = service.anonymous()
    token = user.token
    ways = [
        ({"Authorization": f"Bearer {token}"}, None),
        ({"Authorization": f"OAuth2 {token}"}, None),
        ({"Authorization": f"bearer {token}"}, None),
        ({"Authorization": f"oauth2  {token} "}, None),
        ({}, {"api_token": token}),
    ]
    for headers, params in ways:
        got = await anonymous.get(f"jobs/{job['uuid']}", headers=headers, params=params)
        assert got.status == 200, (headers, params, got.body)
        assert got.body == job
    # Writes too: the token's user and API client are the actor.
    response = await anonymous.post(f"jobs/{job['uuid']}/cancel", params={"api_token": token})
    assert response.status == 200, response.body
    assert response.body["cancelled_by_user"] == user.user_uuid
    client_uuid = await service.pool.fetchval(
        "SELECT api_client_uuid FROM api_tokens WHERE user_uuid = $1", user.user_uuid
    )
    assert response.body["cancelled_by_client"] == client_uuid


async def test_tokens_are_stored_only_hashed(service: ServiceHarness) -> None:
    clients = [await service.client("user"), await service.client("dispatcher", read_only=True)]
    clients.append(await service.token_for(clients[0], expires_in=3600))
    clients.append(service.admin)
    # Use them, so that nothing on the way (the auth cache included) could leave the secret behind.
    for client in clients:
        await client.get("jobs/zzzzz-8i9sb-000000000000000")
    rows = await service.pool.fetch("SELECT t::text AS row_text, token_sha256 FROM api_tokens t")
    assert len(rows) == len(clients)
    digests = {bytes(row["token_sha256"]) for row in rows}
    for client in clients:
        assert client.token
        assert all(client.token not in row["row_text"] for row in rows)
        assert client.token.encode().hex() not in " ".join(row["row_text"] for row in rows)
        assert hashlib.sha256(client.token.encode()).digest() in digests


async def test_tokens_never_reach_the_events_or_error_bodies(service: ServiceHarness) -> None:
    """Whatever a request carries its token in, and whether it succeeds or is refused, the secret is written
    to no event and echoed in no error."""
    user = await service.client("user")
    dispatcher = await service.client("dispatcher")
    read_only = await service.token_for(user, read_only=True)
    secrets = [client.token or "" for client in (user, dispatcher, read_only, service.admin)]
    job = await submit(user)
    await start(dispatcher, job["uuid"])
    anonymous = service.anonymous()
    responses = [
        await anonymous.post(f"jobs/{job['uuid']}/finish", params={"api_token": dispatcher.token}, json={"x": 1}),
        await anonymous.post("jobs", params={"api_token": user.token}, json={"job": attributes(submit_id="s")}),
        await read_only.post("jobs", json={"job": attributes()}),
        await anonymous.get("jobs", params={"api_token": user.token, "filters": "[["}),
        await anonymous.get("jobs", params={"api_token": user.token, "limit": "x", "order": "no such"}),
        await anonymous.get(f"jobs/{job['uuid']}", params={"api_token": user.token, "as_of": "then"}),
        await anonymous.get("events", params={"api_token": user.token, "filters": '[["x", "=", 1]]'}),
        await user.request("PATCH", f"jobs/{job['uuid']}", json={"job": {"priority": 1}}, headers={"If-Match": "x"}),
        await service.with_token(f"{user.token}x").get("jobs"),
        await anonymous.get("jobs", headers={"Authorization": f"Basic {user.token}"}),
        await anonymous.post(f"jobs/{job['uuid']}/cancel", params={"api_token": user.token}),
    ]
    assert any(response.status < 400 for response in responses)
    for response in responses:
        if response.status >= 400:
            text = json.dumps(response.body)
            assert not any(secret in text for secret in secrets), response.body
    rows = await service.pool.fetch("SELECT e::text AS row_text FROM events e")
    assert len(rows) >= 4
    assert not any(secret in row["row_text"] for row in rows for secret in secrets)
