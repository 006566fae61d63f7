"""The stock Arvados Python SDK (``arvados-python-client`` 3.x, unmodified) drives jobledger over HTTPS.

``arvados.api('v1', host=..., token=...)`` fetches ``https://<host>/discovery/v1/apis/arvados/v1/rest``, builds
a googleapiclient client from it, and sends every call through its own patched ``httplib2`` (token, request
id, retries). The service runs in this test's event loop over TLS with a throwaway CA (``tests/tls_support``);
the SDK trusts that CA through ``SSL_CERT_FILE``, as its documentation says, and verifies the certificate and
the host name. The SDK is synchronous, so every SDK call runs in a worker thread (``sdk``), never on the loop
the server needs. The server records each request it answers, so the tests can see what the SDK really sent.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import arvados
import arvados.errors
import arvados.util
import pytest
from aiohttp import web

from api.discovery import DISCOVERY_PATHS
from ledger.config import Settings
from ledger.database import create_pool
from ledger.rebuild import check_read_model
from ledger.users import create_token, create_user
from tests.harness import ApiClient, ServiceHarness, start_service, stop_service
from tests.process_support import serve
from tests.tls_support import TestTls, make_tls

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
JOB = {"script_name": "hash.py", "script_version": "main", "script_parameters": {"input": "x"}}
UNKNOWN_JOB = "zzzzz-8i9sb-000000000000000"
COMMIT = "a" * 40
# A wrongly retried error (a 409 or 5xx for a conflict) then shows up as a second request within seconds, not
# as a test that hangs through the SDK's default ten retries with exponential backoff.
NUM_RETRIES = 1
TIMEOUT = 30  # seconds per HTTP request (the SDK's default is 300)


@dataclass(frozen=True)
class SeenRequest:
    """A request the service answered, as it saw it."""

    method: str
    path: str
    override: str | None  # the X-HTTP-Method-Override header
    status: int
    query: str = field(default="", compare=False)  # the query string as sent


@dataclass
class SdkService:
    """The service over HTTPS, what it answered, and SDK clients for it."""

    harness: ServiceHarness
    seen: list[SeenRequest] = field(default_factory=list)

    @property
    def host(self) -> str:
        """``127.0.0.1:<port>``: what ``arvados.api(host=...)`` and ``ARVADOS_API_HOST`` take."""
        return self.harness.base_url.removeprefix("https://")

    async def api(self, token: str, **options: Any) -> Any:
        """An SDK client for this service holding ``token`` (see ``connect``)."""
        return await connect(self.host, token, **options)

    async def user(self, role: str = "user", **options: Any) -> tuple[ApiClient, Any]:
        """A new user of ``role``: the harness's client (uuid, token) and an SDK client holding its token."""
        client = await self.harness.client(role)  # type: ignore[arg-type]
        assert client.token is not None
        return client, await self.api(client.token, **options)

    def requests_to(self, path: str) -> list[SeenRequest]:
        """The requests to ``/orvos/v1/<path>`` the service answered, in order."""
        return [seen for seen in self.seen if seen.path == "/orvos/v1/" + path]


async def sdk(call: Callable[[], T]) -> T:
    """Run a blocking SDK call in a worker thread (the service runs on this loop)."""
    return await asyncio.to_thread(call)


async def connect(host: str, token: str, **options: Any) -> Any:
    """``arvados.api('v1', host=..., token=...)``, built in a worker thread: it fetches the discovery document
    at once (its KeepClient asks the client for things), and each other thread that uses the client builds
    its own (``ThreadSafeAPIClient``)."""
    # cache=False: no discovery document left in ~/.cache/arvados by a test.
    options = {"cache": False, "num_retries": NUM_RETRIES, "timeout": TIMEOUT, **options}
    return await sdk(lambda: arvados.api("v1", host=host, token=token, **options))


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TestTls:
    """One throwaway CA and loopback certificate for the module."""
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture
async def sdk_service(
    database_dsn: str, settings: Settings, tls: TestTls, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[SdkService]:
    """The real service over TLS on this test's database, trusted by the SDK; after the test, the read model
    must still equal a replay of the events."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.ca_file))  # arvados.util.ca_certs_path() looks here first
    seen: list[SeenRequest] = []

    async def record(request: web.Request, response: web.StreamResponse) -> None:
        # on_response_prepare runs before the response leaves: the record exists before the SDK call returns.
        override = request.headers.get("X-HTTP-Method-Override")
        seen.append(SeenRequest(request.method, request.path, override, response.status, request.query_string))

    harness = await start_service(
        settings, database_dsn, tls=tls, configure=lambda app: app.on_response_prepare.append(record)
    )
    try:
        yield SdkService(harness, seen)
        difference = await check_read_model(harness.pool)
        assert difference is None, f"read model differs from a replay after the test: {difference}"
    finally:
        await stop_service(harness)


# ---------------------------------------------------------------------------------------------------------
# Submitting, reading, listing, updating.
# ---------------------------------------------------------------------------------------------------------
async def test_create_reuses_an_identical_job_unless_find_or_create_is_false(sdk_service: SdkService) -> None:
    _, api = await sdk_service.user()
    first = await sdk(lambda: api.jobs().create(body={"job": JOB}, find_or_create=True).execute())
    assert (first["kind"], first["state"], first["version"]) == ("orvos#job", "Queued", 1)
    again = await sdk(lambda: api.jobs().create(body={"job": JOB}, find_or_create=True).execute())
    assert again["uuid"] == first["uuid"]
    # Without find_or_create (what a plain SDK create sends), CONTRACT §4 reuses too.
    plain = await sdk(lambda: api.jobs().create(body={"job": JOB}).execute())
    assert plain["uuid"] == first["uuid"]
    fresh = await sdk(lambda: api.jobs().create(body={"job": JOB}, find_or_create=False).execute())
    assert fresh["uuid"] != first["uuid"]
    assert fresh["version"] == 1
    creates = [seen.status for seen in sdk_service.requests_to("jobs")]
    assert creates == [201, 200, 200, 201]
    # Every submission is on the record: the two reuses are events of the first job.
    history = await sdk(lambda: api.jobs().events(uuid=first["uuid"]).execute())
    assert [event["event_type"] for event in history["items"]] == ["submitted", "reused", "reused"]


async def test_get_returns_what_create_returned_and_carries_the_sdk_request_id(sdk_service: SdkService) -> None:
    request_id = "req-sdkfixedrequest01"
    user, api = await sdk_service.user(request_id=request_id)  # the SDK sends it as X-Request-Id on every call
    created = await sdk(lambda: api.jobs().create(body={"job": JOB}).execute())
    got = await sdk(lambda: api.jobs().get(uuid=created["uuid"]).execute())
    assert got == created
    assert got["owner_uuid"] == user.user_uuid
    history = await sdk(lambda: api.jobs().events(uuid=created["uuid"]).execute())
    assert [event["request_id"] for event in history["items"]] == [request_id]


async def test_users_current_is_the_token_holder_and_checks_the_token(sdk_service: SdkService) -> None:
    user, api = await sdk_service.user("dispatcher")
    current = await sdk(lambda: api.users().current().execute())
    assert (current["kind"], current["uuid"], current["role"]) == ("orvos#user", user.user_uuid, "dispatcher")
    assert (current["is_admin"], current["is_active"]) == (False, True)
    # Arvados tools check a token this way: an unknown one is a 401 (not retried).
    stranger = await sdk_service.api("v2-not-a-token")
    with pytest.raises(arvados.errors.ApiError) as refused:
        await sdk(lambda: stranger.users().current().execute())
    assert refused.value.resp.status == 401
    assert [seen.status for seen in sdk_service.requests_to("users/current")] == [200, 401]


async def test_get_with_select_and_a_fractional_wait(sdk_service: SdkService) -> None:
    _, api = await sdk_service.user()
    # wait is a number: 0.5 travels as 0.5 (as an integer parameter, googleapiclient sent int(0.5), "0"). The
    # ledger is empty, so the long poll waits it out.
    started = asyncio.get_running_loop().time()
    idle = await sdk(lambda: api.events().list(wait=0.5).execute())
    assert (idle["items"], idle["head"]) == ([], 0)
    assert asyncio.get_running_loop().time() - started >= 0.5  # it waited, so it was not sent as 0
    assert "wait=0.5" in sdk_service.requests_to("events")[-1].query.split("&")
    job = await sdk(lambda: api.jobs().create(body={"job": JOB}).execute())
    # select is declared on get: the SDK sends it (undeclared, googleapiclient raised TypeError client-side).
    narrow = await sdk(lambda: api.jobs().get(uuid=job["uuid"], select=["uuid", "state"]).execute())
    assert narrow == {"kind": "orvos#job", "uuid": job["uuid"], "state": "Queued"}
    with pytest.raises(arvados.errors.ApiError) as invalid:
        await sdk(lambda: api.jobs().get(uuid=job["uuid"], select=["no_such_attribute"]).execute())
    assert invalid.value.resp.status == 422


async def test_list_filters_orders_and_pages(sdk_service: SdkService) -> None:
    _, api = await sdk_service.user()

    def jobs() -> Any:
        return api.jobs()  # called in the worker threads only: the client is built per thread

    def submit_six() -> list[dict[str, Any]]:
        return [
            jobs().create(body={"job": {**JOB, "priority": n, "script_parameters": {"n": n}}}).execute()
            for n in range(6)
        ]

    submitted = await sdk(submit_six)
    # The SDK serialises filters and order (lists) as JSON text itself.
    wanted = [["priority", ">=", 1], ["script_name", "=", "hash.py"]]
    expected = [job["uuid"] for job in sorted(submitted, key=lambda job: -job["priority"]) if job["priority"] >= 1]

    def page(offset: int) -> dict[str, Any]:
        return jobs().list(filters=wanted, order=["priority desc"], limit=2, offset=offset).execute()

    pages = [await sdk(lambda offset=offset: page(offset)) for offset in (0, 2, 4)]
    assert [listing["items_available"] for listing in pages] == [5, 5, 5]
    assert [(listing["offset"], listing["limit"]) for listing in pages] == [(0, 2), (2, 2), (4, 2)]
    assert [len(listing["items"]) for listing in pages] == [2, 2, 1]
    assert [item["uuid"] for listing in pages for item in listing["items"]] == expected
    # select: only the attributes asked for (and kind); count=none: no items_available.
    narrow = await sdk(lambda: jobs().list(filters=wanted, select=["uuid", "priority"], count="none").execute())
    assert "items_available" not in narrow
    assert {tuple(sorted(item)) for item in narrow["items"]} == {("kind", "priority", "uuid")}  # kind: always
    # The SDK's own pager: keyset paging (order created_at asc, uuid asc; filters created_at >= ..., uuid !=
    # ...; count=none), until a page comes back empty.
    every = await sdk(lambda: list(arvados.util.keyset_list_all(jobs().list, filters=wanted)))
    assert sorted(item["uuid"] for item in every) == sorted(expected)


async def test_long_queries_travel_as_post_with_method_override(sdk_service: SdkService) -> None:
    user, api = await sdk_service.user()
    job = await sdk(lambda: api.jobs().create(body={"job": JOB}).execute())
    # Over googleapiclient's 2048-character URL limit it sends POST, X-HTTP-Method-Override: GET, and the query
    # in a form body: for jobs.list, and for every other GET method with long parameters.
    many = [job["uuid"]] + [f"zzzzz-8i9sb-{n:015d}" for n in range(150)]
    request = await sdk(lambda: api.jobs().list(filters=[["uuid", "in", many]]))
    assert len(request.uri) > 2048  # googleapiclient switches to POST when it executes the request
    listed = await sdk(request.execute)
    assert listed["kind"] == "orvos#jobList"
    assert [item["uuid"] for item in listed["items"]] == [job["uuid"]]
    queued = await sdk(lambda: api.jobs().queue(filters=[["uuid", "in", many]]).execute())
    assert [item["uuid"] for item in queued["items"]] == [job["uuid"]]
    # wait: the long poll answers as soon as the submitted event has its position.
    events = await sdk(lambda: api.events().list(filters=[["job_uuid", "in", many]], wait=20).execute())
    assert [(event["job_uuid"], event["event_type"]) for event in events["items"]] == [(job["uuid"], "submitted")]
    tunnelled = [SeenRequest("POST", "/orvos/v1/" + path, "GET", 200) for path in ("jobs", "jobs/queue", "events")]
    assert [seen for seen in sdk_service.seen if seen.override] == tunnelled
    count = await sdk(lambda: api.jobs().list(limit=0).execute())
    assert count["items_available"] == 1  # lists, not creates
    # Only a GET tunnels: a plain POST, or another override, to a GET-only path is still 405.
    assert (await user.post("jobs/queue", data={"limit": "1"})).status == 405
    assert (await user.post("events", headers={"X-HTTP-Method-Override": "DELETE"})).status == 405


async def test_update_changes_the_supplied_attributes(sdk_service: SdkService) -> None:
    _, api = await sdk_service.user()
    job = await sdk(lambda: api.jobs().create(body={"job": JOB}).execute())
    change = {"job": {"priority": 7, "resource_limits": {"min_nodes": 1, "max_nodes": 2}}}
    updated = await sdk(lambda: api.jobs().update(uuid=job["uuid"], body=change).execute())
    assert (updated["priority"], updated["resource_limits"]) == (7, {"min_nodes": 1, "max_nodes": 2})
    assert updated["script_parameters"] == job["script_parameters"]
    assert (updated["version"], updated["etag"] != job["etag"]) == (2, True)
    assert sdk_service.requests_to(f"jobs/{job['uuid']}")[-1] == SeenRequest(
        "PUT", f"/orvos/v1/jobs/{job['uuid']}", None, 200
    )


# ---------------------------------------------------------------------------------------------------------
# The lifecycle methods.
# ---------------------------------------------------------------------------------------------------------
async def test_lock_unlock_start_cancel_finish(sdk_service: SdkService) -> None:
    user, api = await sdk_service.user()
    dispatcher, dispatch = await sdk_service.user("dispatcher")

    def lifecycle() -> list[dict[str, Any]]:
        job = api.jobs().create(body={"job": JOB}).execute()
        jobs = dispatch.jobs()
        return [
            job,
            jobs.lock(uuid=job["uuid"]).execute(),
            jobs.unlock(uuid=job["uuid"]).execute(),
            jobs.lock(uuid=job["uuid"]).execute(),
            jobs.start(uuid=job["uuid"], body={"script_version": COMMIT}).execute(),
            api.jobs().cancel(uuid=job["uuid"]).execute(),  # the owner cancels the running job
            jobs.finish(uuid=job["uuid"], body={"success": False, "output": "partial", "log": "killed"}).execute(),
        ]

    submitted, locked, unlocked, relocked, started, cancelled, finished = await sdk(lifecycle)
    assert locked["is_locked_by"] == dispatcher.user_uuid
    assert (unlocked["is_locked_by"], unlocked["state"]) == (None, "Queued")
    assert relocked["is_locked_by"] == dispatcher.user_uuid
    assert (started["state"], started["running"], started["script_version"]) == ("Running", True, COMMIT)
    assert started["supplied_script_version"] == "main"
    assert (cancelled["state"], cancelled["cancelled_by_user"]) == ("Cancelled", user.user_uuid)
    assert (finished["state"], finished["success"], finished["output"]) == ("Cancelled", False, "partial")
    assert finished["version"] == 7
    history = await sdk(lambda: api.jobs().events(uuid=submitted["uuid"]).execute())
    assert [event["event_type"] for event in history["items"]] == [
        "submitted", "locked", "unlocked", "locked", "started", "cancelled", "finished"
    ]  # fmt: skip


async def test_a_dispatcher_runs_the_queue_to_completion(sdk_service: SdkService) -> None:
    _, api = await sdk_service.user()
    _, dispatch = await sdk_service.user("dispatcher")

    def dispatch_all() -> list[dict[str, Any]]:
        for n in range(3):
            api.jobs().create(body={"job": {**JOB, "priority": n, "script_parameters": {"n": n}}}).execute()
        done = []
        while dispatch.jobs().queue_size().execute()["queue_size"]:
            job = dispatch.jobs().queue(limit=1).execute()["items"][0]
            dispatch.jobs().lock(uuid=job["uuid"]).execute()
            dispatch.jobs().start(uuid=job["uuid"], body={"script_version": COMMIT}).execute()
            done.append(dispatch.jobs().finish(uuid=job["uuid"], body={"success": True, "output": "o"}).execute())
        return done

    done = await sdk(dispatch_all)
    assert [job["priority"] for job in done] == [2, 1, 0]  # the queue is priority desc
    assert {job["state"] for job in done} == {"Complete"}


# ---------------------------------------------------------------------------------------------------------
# Errors: arvados.errors.ApiError with our status and Orvos message, and no retries.
# ---------------------------------------------------------------------------------------------------------
async def test_errors_surface_as_api_error_with_our_message_and_are_not_retried(sdk_service: SdkService) -> None:
    _, api = await sdk_service.user()
    _, first = await sdk_service.user("dispatcher")
    _, second = await sdk_service.user("dispatcher")
    job = await sdk(lambda: api.jobs().create(body={"job": JOB}).execute())
    await sdk(lambda: first.jobs().lock(uuid=job["uuid"]).execute())

    with pytest.raises(arvados.errors.ApiError) as conflict:
        await sdk(lambda: second.jobs().lock(uuid=job["uuid"]).execute())
    assert conflict.value.resp.status == 422
    reason = conflict.value._get_reason()  # ApiError joins our "errors" with "; "
    assert "lock" in reason.lower()
    assert reason in str(conflict.value)
    # The lock conflict is 422, which the SDK does not retry (a 409 or 5xx it would): one request each.
    assert [seen.status for seen in sdk_service.requests_to(f"jobs/{job['uuid']}/lock")] == [200, 422]

    with pytest.raises(arvados.errors.ApiError) as missing:
        await sdk(lambda: api.jobs().get(uuid=UNKNOWN_JOB).execute())
    assert (missing.value.resp.status, missing.value._get_reason()) == (404, "Path not found")

    with pytest.raises(arvados.errors.ApiError) as contradiction:
        await sdk(lambda: api.jobs().create(body={"job": JOB}, find_or_create=True, allow_duplicate=True).execute())
    assert contradiction.value.resp.status == 422
    assert contradiction.value._get_reason() == "allow_duplicate and find_or_create contradict each other"

    with pytest.raises(arvados.errors.ApiError) as invalid:
        await sdk(lambda: api.jobs().update(uuid=job["uuid"], body={"job": {"running": True}}).execute())
    assert invalid.value.resp.status == 422
    assert "running" in invalid.value._get_reason()

    # The SDK refuses a body over the published maxRequestSize itself, before sending anything.
    huge = {"job": {**JOB, "script_parameters": {"blob": "x" * (1 << 20)}}}
    creates = len(sdk_service.requests_to("jobs"))
    with pytest.raises(Exception, match="exceeds published limit"):
        await sdk(lambda: api.jobs().create(body=huge).execute())
    # (The SDK may fetch the discovery document again meanwhile; no request reaches the jobs.)
    assert len(sdk_service.requests_to("jobs")) == creates


async def test_an_unknown_token_still_gets_the_discovery_document_then_401(sdk_service: SdkService) -> None:
    api = await sdk_service.api("v2-not-a-token")
    with pytest.raises(arvados.errors.ApiError) as refused:
        await sdk(lambda: api.jobs().list().execute())
    assert refused.value.resp.status == 401
    # The SDK sends the token with the discovery request too (once per thread that uses the client): the
    # document needs none, so an unknown token gets it.
    discovery = [seen.status for seen in sdk_service.seen if seen.path == DISCOVERY_PATHS[0]]
    assert discovery
    assert set(discovery) == {200}
    assert [seen.status for seen in sdk_service.requests_to("jobs")] == [401]


# ---------------------------------------------------------------------------------------------------------
# TLS: verified by default, ARVADOS_API_HOST_INSECURE to skip it, and `jobledger serve --tls-cert`.
# ---------------------------------------------------------------------------------------------------------
async def test_the_sdk_verifies_the_certificate_unless_told_insecure(
    sdk_service: SdkService, monkeypatch: pytest.MonkeyPatch
) -> None:
    user, _ = await sdk_service.user()
    assert user.token is not None
    monkeypatch.delenv("SSL_CERT_FILE")  # now the SDK trusts only the system's CAs, not the test CA
    with pytest.raises(ssl.SSLCertVerificationError):
        await sdk_service.api(user.token)
    # The configuration the SDK reads from settings.conf or the environment, insecure flag set.
    config = {"ARVADOS_API_HOST": sdk_service.host, "ARVADOS_API_TOKEN": user.token, "ARVADOS_API_HOST_INSECURE": "1"}
    insecure = await sdk(
        lambda: arvados.api_from_config("v1", apiconfig=config, cache=False, num_retries=NUM_RETRIES, timeout=TIMEOUT)
    )
    listed = await sdk(lambda: insecure.jobs().list().execute())
    assert listed["items"] == []


async def test_jobledger_serve_with_tls_cert_and_key_serves_the_sdk(
    tmp_path: Path, database_dsn: str, settings: Settings, tls: TestTls, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.ca_file))
    pool = await create_pool(database_dsn, settings, min_size=1, max_size=2)
    try:
        user = await create_user(pool, "sdk-cli", "user", settings.uuid_prefix)
        token = (await create_token(pool, user.uuid, settings.uuid_prefix)).token
        tls_args = ("--tls-cert", str(tls.cert_file), "--tls-key", str(tls.key_file))
        async with serve(tmp_path, database_dsn, *tls_args) as server:
            assert server.base_url.startswith("https://")
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls.client)) as session:
                await server.wait_healthy(session, within=30)
            api = await connect(f"127.0.0.1:{server.port}", token)
            job = await sdk(lambda: api.jobs().create(body={"job": JOB}).execute())
            assert (job["owner_uuid"], job["state"]) == (user.uuid, "Queued")
        assert await check_read_model(pool) is None
    finally:
        await pool.close()
