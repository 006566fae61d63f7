"""The error middleware's catch-all: counted in ``jobledger_unexpected_errors_total`` and logged with its token.

No input should reach it (the hostile-input and fuzz suites assert the counter stays 0), so the test reaches it
the only honest way left: an extra route, added through ``start_service``'s ``configure`` hook to the app the
factory built, whose handler raises what no handler is written to raise.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from ledger.config import Settings
from tests.contract import ERROR_TOKEN, assert_error
from tests.harness import ServiceHarness, start_service, stop_service, unexpected_errors

BROKEN_PATH = "/test-only/broken"


class _Bug(RuntimeError):
    """What the broken route raises: a name the traceback in the log must carry."""


async def _broken(request: web.Request) -> web.Response:
    raise _Bug("a bug in a handler")


@pytest.fixture
async def broken_service(database_dsn: str, tmp_path: Path) -> AsyncIterator[ServiceHarness]:
    """The real service (through the app factory) plus one route whose handler always raises."""
    settings = Settings(data_dir=tmp_path / "data", pool_min_size=1, pool_max_size=5)
    harness = await start_service(
        settings, database_dsn, configure=lambda app: app.router.add_get(BROKEN_PATH, _broken)
    )
    try:
        yield harness
    finally:
        await stop_service(harness)


async def test_catch_all_is_counted_and_logged_with_its_token(
    broken_service: ServiceHarness, caplog: pytest.LogCaptureFixture
) -> None:
    service = broken_service
    assert await unexpected_errors(service.session, service.base_url) == 0
    # An ordinary refusal is not the catch-all.
    assert (await service.anonymous().get("jobs")).status == 401
    tokens = []
    with caplog.at_level(logging.ERROR, logger="jobledger.api"):
        for _ in range(2):
            response = await service.admin.get(BROKEN_PATH)
            assert_error(response, 422)
            assert response.errors == ["unexpected error; the server log has the details"]
            tokens.append(response.body["error_token"])
    assert await unexpected_errors(service.session, service.base_url) == 2
    assert all(ERROR_TOKEN.fullmatch(token) for token in tokens)
    for token in tokens:
        # One ERROR record per request, carrying the token the client was given and the traceback.
        [record] = [r for r in caplog.records if token in r.getMessage()]
        assert record.levelno == logging.ERROR
        assert record.exc_info is not None
        assert record.exc_info[0] is _Bug
        assert BROKEN_PATH in record.getMessage()
    assert "_Bug: a bug in a handler" in caplog.text  # the formatted traceback, as the log file shows it
    assert "Traceback (most recent call last)" in caplog.text
