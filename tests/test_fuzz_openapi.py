"""Schemathesis against the real service, over HTTP, from the OpenAPI document it serves (CONTRACT §7, §8).

The service runs on a loopback port in a thread of its own (schemathesis' calls are synchronous: on the test's
event loop they would block the server they wait for). Schemathesis loads ``/orvos/v1/openapi.json`` from it
and generates cases for every operation but the endless SSE stream; each case is sent with the token of an
admin, a user, a dispatcher, an auditor, a read-only user, an unknown token or none, and with a path ``uuid``
that is sometimes a real job's (so that cases get past authentication and lookup). Every response must be no
5xx, a status, content type and (where the document declares one) body the document allows, and every error
must be exactly the Orvos error body with the request's ``X-Request-Id`` echoed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import threading
import zlib
from collections import Counter
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import aiohttp
import asyncpg
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.discovery import render_openapi
from ledger.config import Settings
from ledger.database import with_database
from ledger.rebuild import check_read_model
from tests.contract import ERROR_TOKEN, cancel, finish, lock, start, submit
from tests.harness import ServiceHarness, start_service, stop_service, unexpected_errors

T = TypeVar("T")

# Cases per operation in the fuzzing phase; with every operation of the document but the SSE stream, well over
# 2,000 in all (the examples and coverage phases add their own).
MAX_EXAMPLES: Final = 125
MINIMUM_CASES: Final = 2_000
SEED: Final = 20261125
DOCUMENT_ROOT: Final = "http://127.0.0.1/"
PRINCIPALS: Final = ("admin", "user", "dispatcher", "auditor", "read_only", "unknown", "anonymous", "generated")
CHECKS: Final = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
CASES: Final[Counter[str]] = Counter()  # cases sent, per operation, for the summary test at the end
_request_ids = itertools.count()
STATUSES: Final[Counter[int]] = Counter()
# Cases answered by the catch-all ("unexpected error"), kept to name them when the counter check fails.
UNEXPECTED: Final[list[str]] = []


class BackgroundLoop:
    """An event loop in a thread of its own, for a server that must keep serving while the test blocks."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fuzzed-service", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run ``coroutine`` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        """Stop the loop and its thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class LiveService:
    """The service under fuzzing: where it is, who may call it, and which jobs exist."""

    base_url: str
    tokens: dict[str, str | None]
    job_uuids: list[str]
    harness: ServiceHarness
    background: BackgroundLoop


async def _seed(harness: ServiceHarness, background: BackgroundLoop) -> LiveService:
    """Principals of every role, and jobs in every state, so that generated cases reach real objects."""
    user = await harness.client("user")
    dispatcher = await harness.client("dispatcher")
    auditor = await harness.client("auditor")
    read_only = await harness.token_for(user, read_only=True)
    jobs = [(await submit(user, script_parameters={"n": n}))["uuid"] for n in range(6)]
    await lock(dispatcher, jobs[1])
    await start(dispatcher, jobs[2])
    await finish(dispatcher, jobs[3])
    await cancel(user, jobs[4])
    admins = (await submit(harness.admin, script_parameters={"admin": True}))["uuid"]
    tokens = {
        "admin": harness.admin.token,
        "user": user.token,
        "dispatcher": dispatcher.token,
        "auditor": auditor.token,
        "read_only": read_only.token,
        "unknown": "v2/zzzzz-gj3su-000000000000000/not-a-token",
        "anonymous": None,
    }
    return LiveService(harness.base_url, tokens, [*jobs, admins], harness, background)


@pytest.fixture(scope="module")
def live_service(
    server_dsn: str, template_database: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveService]:
    """The real service on its own database, served from a background thread; afterwards the read model must
    still equal a replay of the events."""
    background = BackgroundLoop()
    name = f"jobledger_fuzz_{os.getpid()}"
    settings = Settings(data_dir=Path(tmp_path_factory.mktemp("fuzz")) / "data", pool_min_size=1, pool_max_size=20)

    async def create_database() -> None:
        admin = await asyncpg.connect(server_dsn)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            await admin.execute(f"CREATE DATABASE {name} TEMPLATE {template_database} STRATEGY wal_log")
        finally:
            await admin.close()

    async def drop_database() -> None:
        admin = await asyncpg.connect(server_dsn)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await admin.close()

    background.run(create_database())
    try:
        harness = background.run(start_service(settings, with_database(server_dsn, name)))
        try:
            yield background.run(_seed(harness, background))
            assert background.run(check_read_model(harness.pool)) is None, "read model differs from a replay"
        finally:
            background.run(stop_service(harness))
    finally:
        background.run(drop_database())
        background.close()


def _fuzzed_document() -> dict[str, Any]:
    """The document under test: what ``GET /orvos/v1/openapi.json`` serves (the first test checks it is)."""
    return render_openapi(DOCUMENT_ROOT)


# Loaded when the module is imported, before the service runs: schemathesis 4.32's loader from a fixture
# (``schemathesis.pytest.from_fixture``) fails on pytest 9.2 (it sets ``Node._nodeid``, which 9.2 renamed), so
# the document is taken from the code that serves it, and the first test proves the service serves exactly it.
schema = schemathesis.openapi.from_dict(
    _fuzzed_document(),
    config=schemathesis.Config.from_dict(
        {"seed": SEED, "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"}}
    ),
).exclude(path="/orvos/v1/events/stream")  # the SSE stream never ends by itself (tests/test_stream_sse.py)


FUZZED_OPERATIONS: Final = [
    f"{method.upper()} {path}"
    for path, item in _fuzzed_document()["paths"].items()
    if path != "/orvos/v1/events/stream"
    for method in item
    if method in ("get", "put", "post", "patch", "delete")
]


async def _served_document(base_url: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(f"{base_url}/orvos/v1/openapi.json") as response:
        assert response.status == 200
        return await response.json()


def test_the_fuzzed_document_is_the_one_served(live_service: LiveService) -> None:
    served = live_service.background.run(_served_document(live_service.base_url))
    expected = _fuzzed_document()
    assert served["servers"] == [{"url": live_service.base_url}]
    assert {**served, "servers": expected["servers"]} == expected


def test_a_list_with_select_matches_the_document(live_service: LiveService) -> None:
    """Regression (found by the fuzzing): with ``select`` the items are partial jobs, which the document's
    JobList declared as whole Jobs (every required attribute missing)."""
    for path in ("/orvos/v1/jobs", "/orvos/v1/jobs/queue"):
        case = schema[path]["GET"].Case(query={"select": json.dumps(["uuid", "priority"])})
        response = case.call(base_url=live_service.base_url, headers=_bearer(live_service, "admin"))
        assert response.status_code == 200, response.text
        items = response.json()["items"]
        assert items, path
        assert all(set(item) == {"kind", "uuid", "priority"} for item in items), items
        case.validate_response(response, checks=[response_schema_conformance])


def test_a_get_with_select_matches_the_document(live_service: LiveService) -> None:
    """Regression (found by the fuzzing): ``GET jobs/{uuid}?select=[]`` answers ``{"kind": "orvos#job"}``, which
    the document declared a whole Job."""
    for selected in ([], ["uuid", "state"]):
        case = schema["/orvos/v1/jobs/{uuid}"]["GET"].Case(
            path_parameters={"uuid": live_service.job_uuids[0]}, query={"select": json.dumps(selected)}
        )
        response = case.call(base_url=live_service.base_url, headers=_bearer(live_service, "admin"))
        assert response.status_code == 200, response.text
        assert set(response.json()) == {"kind", *selected}, response.text
        case.validate_response(response, checks=[response_schema_conformance])


def _bearer(live_service: LiveService, principal: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {live_service.tokens[principal]}"}


def _choices(case: schemathesis.Case) -> tuple[str, int]:
    """Who sends the case and which job's uuid it uses, derived from the case itself: the same case (a shrunk
    one replayed, or the next run's) always goes with the same principal. (``schema.given`` would draw them,
    but it turns schemathesis' coverage phase off.)"""
    digest = zlib.crc32(repr((case.operation.label, case.path_parameters, case.query, case.body)).encode())
    return PRINCIPALS[digest % len(PRINCIPALS)], (digest >> 8) % 14


@schema.parametrize()
def test_every_operation_keeps_the_contract(case: schemathesis.Case, live_service: LiveService) -> None:
    principal, pick = _choices(case)
    headers = {"X-Request-Id": f"fuzz-{next(_request_ids)}"}
    if principal != "generated":  # "generated": whatever schemathesis made of the security schemes
        token = live_service.tokens[principal]
        case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
        case.query = {k: v for k, v in (case.query or {}).items() if k != "api_token"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
    if "uuid" in (case.path_parameters or {}) and pick < len(live_service.job_uuids):
        case.path_parameters = {**case.path_parameters, "uuid": live_service.job_uuids[pick]}
    if case.query and "wait" in case.query:
        case.query = {**case.query, "wait": 0}  # a long-poll: keep the run bounded
    response = case.call(base_url=live_service.base_url, headers=headers, timeout=30)
    CASES[case.operation.label] += 1
    STATUSES[response.status_code] += 1
    case.validate_response(response, checks=CHECKS, headers=headers)
    assert response.headers.get("x-request-id") == [headers["X-Request-Id"]], response.headers
    if response.status_code >= 400:
        body = response.json()
        if any("unexpected error" in str(message) for message in body.get("errors", [])):
            UNEXPECTED.append(f"{case.operation.label} path={case.path_parameters} query={case.query} body={case.body}")
        assert isinstance(body, dict), body
        assert set(body) == {"errors", "error_token"}, body
        assert isinstance(body["errors"], list), body
        assert body["errors"], body
        assert all(isinstance(message, str) and message for message in body["errors"]), body
        assert ERROR_TOKEN.fullmatch(body["error_token"]), body


def test_the_fuzzing_sent_enough_cases() -> None:
    """The operations above ran (in this session, before this test) at least MINIMUM_CASES cases in all."""
    statuses = dict(sorted(STATUSES.items()))
    print(f"fuzzing: {sum(CASES.values())} cases over {len(CASES)} operations; statuses {statuses}")
    assert sum(CASES.values()) >= MINIMUM_CASES, dict(CASES)
    assert len(CASES) == len(FUZZED_OPERATIONS), sorted(set(FUZZED_OPERATIONS) - set(CASES))


def test_the_catch_all_was_never_reached(live_service: LiveService) -> None:
    """After all the cases above: ``jobledger_unexpected_errors_total`` on ``/metrics`` is still 0. A catch-all
    answer is a 422 with an Orvos body, which every check above accepts; only this counter tells it apart."""

    async def read() -> float:
        async with aiohttp.ClientSession() as session:
            return await unexpected_errors(session, live_service.base_url)

    count = live_service.background.run(read())
    assert count == 0, f"{count:g} requests reached the catch-all, e.g. {UNEXPECTED[:10]}"
