"""A job's history and its state as of a version or time (CONTRACT §5). Placeholder until that work lands."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from aiohttp import web

from api.errors import ApiError
from ledger.access import Caller

if TYPE_CHECKING:
    from api.methods import Method


async def job_as_of(request: web.Request, caller: Caller, uuid: str) -> web.Response:
    """GET jobs/{uuid}?as_of_version=N | as_of=T."""
    raise ApiError(404, "Path not found")


LEDGER_METHODS: Final[tuple[Method, ...]] = ()
