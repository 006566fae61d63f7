"""Running the real service for a test: the aiohttp app on a loopback port, and clients that speak HTTP to it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import asyncpg
from aiohttp import web
from multidict import CIMultiDict

from api.app import create_app
from api.context import POOL
from ledger.access import Role
from ledger.config import Settings
from ledger.users import IssuedToken, create_token, create_user

if TYPE_CHECKING:
    from tests.tls_support import TestTls


@dataclass
class Response:
    """What a test needs of an HTTP response."""

    status: int
    headers: Mapping[str, str]  # case-insensitive, as HTTP header names are
    body: Any

    @property
    def errors(self) -> list[str]:
        """The Orvos error messages (empty for a success)."""
        return self.body.get("errors", []) if isinstance(self.body, dict) else []


@dataclass
class ApiClient:
    """An HTTP client holding one token."""

    session: aiohttp.ClientSession
    base_url: str
    token: str | None
    user_uuid: str = ""
    role: str = ""

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        """Send a request to ``/orvos/v1/<path>`` (or an absolute ``/path``) and decode the JSON answer."""
        url = self.base_url + (path if path.startswith("/") else "/orvos/v1/" + path)
        all_headers = {} if self.token is None else {"Authorization": f"Bearer {self.token}"}
        all_headers.update(headers or {})
        async with self.session.request(
            method, url, json=json, data=data, params=params, headers=all_headers
        ) as response:
            raw = await response.read()
            try:
                body: Any = await response.json(content_type=None) if raw else None
            except ValueError:
                body = raw.decode(errors="replace")
            return Response(response.status, CIMultiDict(response.headers), body)

    async def get(self, path: str, **kwargs: Any) -> Response:
        """GET."""
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> Response:
        """POST."""
        return await self.request("POST", path, **kwargs)

    async def create_job(self, **attrs: Any) -> Response:
        """POST jobs with sensible defaults for the required attributes."""
        job = {"script_name": "hash.py", "script_version": "main", "script_parameters": {"input": "x"}}
        job.update(attrs)
        return await self.post("jobs", json={"job": job}, params={"allow_duplicate": "true"})


@dataclass
class ServiceHarness:
    """A running service on its own database."""

    base_url: str
    pool: asyncpg.Pool
    settings: Settings
    admin: ApiClient
    session: aiohttp.ClientSession
    _runner: web.AppRunner
    clients: list[ApiClient] = field(default_factory=list)

    def anonymous(self) -> ApiClient:
        """A client without a token."""
        return ApiClient(self.session, self.base_url, None)

    def with_token(self, token: str | None) -> ApiClient:
        """A client presenting an arbitrary token."""
        return ApiClient(self.session, self.base_url, token)

    async def client(
        self, role: Role = "user", *, name: str | None = None, read_only: bool = False, expires_in: float | None = None
    ) -> ApiClient:
        """A new user of ``role`` and a client holding a fresh token of theirs."""
        user = await create_user(self.pool, name or f"{role}-{len(self.clients)}", role, self.settings.uuid_prefix)
        issued = await create_token(
            self.pool, user.uuid, self.settings.uuid_prefix, read_only=read_only, expires_in=expires_in
        )
        return self._client_for(issued, role)

    async def token_for(self, client: ApiClient, **options: Any) -> ApiClient:
        """Another token (e.g. read-only) for the same user as ``client``."""
        issued = await create_token(self.pool, client.user_uuid, self.settings.uuid_prefix, **options)
        return self._client_for(issued, client.role)

    def _client_for(self, issued: IssuedToken, role: str) -> ApiClient:
        api = ApiClient(self.session, self.base_url, issued.token, issued.user_uuid, role)
        self.clients.append(api)
        return api


async def start_service(
    settings: Settings,
    dsn: str,
    *,
    tls: TestTls | None = None,
    configure: Callable[[web.Application], None] | None = None,
) -> ServiceHarness:
    """Start the real aiohttp app on 127.0.0.1 (a free port) against ``dsn``.

    With ``tls``, the service speaks HTTPS only and the harness's clients trust the test CA. ``configure``
    sees the application before it starts (e.g. to add a signal handler that records requests).
    """
    issued: list[IssuedToken] = []
    app = create_app(settings, dsn, admin_token_sink=issued.append)
    if configure is not None:
        configure(app)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=None if tls is None else tls.server)
    await site.start()
    port = runner.addresses[0][1]
    base_url = f"{'http' if tls is None else 'https'}://127.0.0.1:{port}"
    connector = aiohttp.TCPConnector(limit=100) if tls is None else aiohttp.TCPConnector(limit=100, ssl=tls.client)
    session = aiohttp.ClientSession(connector=connector)
    admin = ApiClient(session, base_url, issued[0].token, issued[0].user_uuid, "admin")
    return ServiceHarness(base_url, app[POOL], settings, admin, session, runner)


UNEXPECTED_ERRORS = "jobledger_unexpected_errors_total"


async def unexpected_errors(session: aiohttp.ClientSession, base_url: str) -> float:
    """``jobledger_unexpected_errors_total`` as the service's ``/metrics`` reports it (over HTTP, as an operator's
    scraper would read it): how many requests reached the error middleware's catch-all."""
    from prometheus_client.parser import text_string_to_metric_families

    async with session.get(base_url + "/metrics") as response:
        assert response.status == 200, response.status
        text = await response.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == UNEXPECTED_ERRORS
    )


async def stop_service(harness: ServiceHarness) -> None:
    """Close the clients and shut the app down (its pool closes with it)."""
    await harness.session.close()
    await harness._runner.cleanup()
