"""Access logs: one JSON line per request through ``logging`` (``jobledger.access``), and no token ever logged,
whether it came in the ``Authorization`` header, in ``?api_token=``, encoded, valid or not."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from yarl import URL

from api.access_log import LOGGER_NAME
from tests.harness import ServiceHarness


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The access-log lines captured so far, decoded."""
    return [json.loads(record.getMessage()) for record in caplog.records if record.name == LOGGER_NAME]


async def test_one_json_line_per_request_and_tokens_never_appear(
    service: ServiceHarness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, not only the access log: no token anywhere
    user = await service.client("user")
    secret = user.token
    assert secret is not None
    unknown = "u" * 50

    by_header = await user.get("jobs", params={"limit": "5"}, headers={"X-Request-Id": "req-access-header"})
    by_query = await service.anonymous().get("jobs", params={"api_token": secret, "limit": "3"})
    # The same parameter name percent-encoded: still the token (the query is decoded before it is read).
    encoded = URL(f"{service.base_url}/orvos/v1/jobs?api%5Ftoken={secret}&limit=2", encoded=True)
    async with service.session.get(encoded) as response:
        assert response.status == 200
    bad_header = await service.with_token(unknown).get("jobs")
    bad_query = await service.anonymous().get("/nowhere", params={"api_token": unknown})
    assert (by_header.status, by_query.status, bad_header.status, bad_query.status) == (200, 200, 401, 404)

    lines = access_lines(caplog)
    assert len(lines) == 5
    for record in caplog.records:
        text = f"{record.getMessage()} {record.__dict__}"
        assert secret not in text
        assert unknown not in text
    assert secret not in caplog.text
    assert unknown not in caplog.text

    first = lines[0]
    assert first == {
        "time": first["time"],
        "method": "GET",
        "path": "/orvos/v1/jobs",
        "query": "limit=5",
        "status": 200,
        "duration_ms": first["duration_ms"],
        "request_id": "req-access-header",
        "user_uuid": user.user_uuid,
        "remote": "127.0.0.1",
        "worker": 0,
    }
    assert first["duration_ms"] > 0
    assert by_header.headers["X-Request-Id"] == "req-access-header"
    assert [line["query"] for line in lines[1:]] == ["limit=3", "limit=2", None, ""]
    assert [line["user_uuid"] for line in lines[1:]] == [user.user_uuid, user.user_uuid, None, None]
    assert [line["status"] for line in lines] == [200, 200, 200, 401, 404]
    assert [line["request_id"] for line in lines[1:]] == [
        by_query.headers["X-Request-Id"],
        lines[2]["request_id"],
        bad_header.headers["X-Request-Id"],
        bad_query.headers["X-Request-Id"],
    ]


async def test_nothing_is_built_when_the_access_log_is_off(
    service: ServiceHarness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER_NAME)
    assert (await service.anonymous().get("/healthz")).status == 200
    assert access_lines(caplog) == []
