"""``jobledger serve``'s access-log handler: its direct path writes exactly what logging itself would."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from api.access_log import LOGGER_NAME, configure_access_log, log_request


@pytest.fixture
def access_logger() -> Iterator[logging.Logger]:
    """The access logger, its handlers, level and propagation restored afterwards."""
    logger = logging.getLogger(LOGGER_NAME)
    saved = (list(logger.handlers), logger.propagate, logger.level, list(logger.filters))
    try:
        yield logger
    finally:
        logger.handlers[:], logger.propagate, logger.level, logger.filters[:] = saved


def _request(path: str) -> Any:
    return SimpleNamespace(
        method="GET", path=path, query_string="limit=2", remote="127.0.0.1", get=lambda key, default=None: None
    )


def test_direct_lines_equal_logged_lines(access_logger: logging.Logger) -> None:
    stream = io.StringIO()
    configure_access_log(True, stream)
    log_request(_request("/direct"), 200, 0.0015, 3)  # the direct path: the handler is the only one
    seen: list[str] = []
    access_logger.addFilter(lambda record: seen.append(record.getMessage()) or True)
    log_request(_request("/logged"), 200, 0.0015, 3)  # a filter: the record goes through logging
    direct, logged = stream.getvalue().splitlines()
    assert logged == seen[0]
    assert direct.replace("/direct", "/logged")[40:] == logged[40:]  # past the time, the same line
    assert stream.getvalue().endswith("\n")


def test_silenced_and_failing_streams(access_logger: logging.Logger, capsys: pytest.CaptureFixture[str]) -> None:
    stream = io.StringIO()
    configure_access_log(False, stream)
    log_request(_request("/quiet"), 200, 0.001, 0)
    assert stream.getvalue() == ""
    closed = io.StringIO()
    closed.close()
    configure_access_log(True, closed)
    log_request(_request("/broken"), 200, 0.001, 0)  # reported as logging reports it, never raised
    assert "Logging error" in capsys.readouterr().err
