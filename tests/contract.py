"""Helpers shared by the Jobs API contract tests (``test_jobs_api``, ``test_reuse``, ``test_access``,
``test_errors``): submitting jobs, driving them through their lifecycle, and reading the ledger's tables to
check what a request wrote (or, for a refused request, that it wrote nothing).
"""

from __future__ import annotations

import re
import time
from typing import Any, Final

from tests.harness import ApiClient, Response, ServiceHarness

COMMIT: Final = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT: Final = "89abcdef0123456789abcdef0123456789abcdef"
ERROR_TOKEN: Final = re.compile(r"(\d+)\+[0-9a-f]{8}")
TIMESTAMP: Final = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
GENERATED_REQUEST_ID: Final = re.compile(r"req-[0-9a-z]{20}")


def attributes(**overrides: Any) -> dict[str, Any]:
    """A valid job object for a create body, with ``overrides`` applied."""
    job: dict[str, Any] = {"script_name": "hash.py", "script_version": "main", "script_parameters": {"input": "x"}}
    job.update(overrides)
    return job


async def submit(client: ApiClient, *, expect: int = 201, params: dict[str, str] | None = None, **attrs: Any) -> dict:
    """POST jobs with ``{"job": attributes(**attrs)}`` (``allow_duplicate=true`` unless ``params`` say otherwise);
    assert the status and return the job."""
    response = await client.post(
        "jobs", json={"job": attributes(**attrs)}, params={"allow_duplicate": "true"} if params is None else params
    )
    assert response.status == expect, response.body
    return response.body


async def lock(dispatcher: ApiClient, uuid: str) -> dict:
    """Lock the job as ``dispatcher`` (must succeed)."""
    response = await dispatcher.post(f"jobs/{uuid}/lock")
    assert response.status == 200, response.body
    return response.body


async def start(dispatcher: ApiClient, uuid: str, version: str = COMMIT) -> dict:
    """Lock and start the job as ``dispatcher`` (must succeed)."""
    await lock(dispatcher, uuid)
    response = await dispatcher.post(f"jobs/{uuid}/start", json={"script_version": version})
    assert response.status == 200, response.body
    return response.body


async def finish(dispatcher: ApiClient, uuid: str, *, success: bool = True, output: str | None = "out") -> dict:
    """Lock, start and finish the job as ``dispatcher`` (must succeed)."""
    await start(dispatcher, uuid)
    response = await dispatcher.post(f"jobs/{uuid}/finish", json={"success": success, "output": output, "log": "l"})
    assert response.status == 200, response.body
    return response.body


async def cancel(client: ApiClient, uuid: str) -> dict:
    """Cancel the job as ``client`` (must succeed)."""
    response = await client.post(f"jobs/{uuid}/cancel")
    assert response.status == 200, response.body
    return response.body


async def event_count(service: ServiceHarness) -> int:
    """How many events the ledger holds."""
    return await service.pool.fetchval("SELECT count(*) FROM events")


async def job_count(service: ServiceHarness) -> int:
    """How many jobs the read model holds."""
    return await service.pool.fetchval("SELECT count(*) FROM jobs")


async def event_types(service: ServiceHarness, uuid: str) -> list[str]:
    """The types of the job's events, in version order."""
    rows = await service.pool.fetch("SELECT event_type FROM events WHERE job_uuid = $1 ORDER BY version", uuid)
    return [row["event_type"] for row in rows]


async def last_event(service: ServiceHarness, uuid: str) -> dict[str, Any]:
    """The job's latest event row, as a dict."""
    row = await service.pool.fetchrow("SELECT * FROM events WHERE job_uuid = $1 ORDER BY version DESC LIMIT 1", uuid)
    assert row is not None
    return dict(row)


def assert_error(response: Response, status: int, *mentions: str) -> None:
    """``response`` is an Orvos error with ``status``: exactly ``errors`` (non-empty strings) and a fresh
    ``error_token``, JSON, with ``X-Request-Id``; and its messages mention each of ``mentions``."""
    assert response.status == status, (response.status, response.body)
    body = response.body
    assert isinstance(body, dict), body
    assert set(body) == {"errors", "error_token"}, body
    assert isinstance(body["errors"], list), body
    assert body["errors"], body
    assert all(isinstance(message, str) and message for message in body["errors"]), body
    token = ERROR_TOKEN.fullmatch(body["error_token"])
    assert token is not None, body
    assert abs(int(token.group(1)) - time.time()) < 60, body
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers.get("X-Request-Id"), response.headers
    text = " ".join(body["errors"])
    for mention in mentions:
        assert mention in text, (mention, text)
