"""Authentication: the token in ``Authorization: Bearer|OAuth2 <t>`` or ``?api_token=`` → a ``Caller``.

Lookups are cached for a couple of seconds (by the token's digest, never the token), so a busy client does
not cost a query per request; expiry is still checked against the clock on every request.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, Final

import asyncpg
from aiohttp import web

from api.errors import REQUEST_ID, ApiError
from ledger.access import Caller
from ledger.users import TokenInfo, lookup_token, token_digest

CACHE_SECONDS: Final = 2.0
# The authenticated caller, kept on the request for the access log.
CALLER: Final[Any] = web.RequestKey("caller", Caller) if hasattr(web, "RequestKey") else "caller"
# Set (by api.methods' tunnel) on a POST that carries a GET in a form body: its api_token may be in the body.
TUNNELLED_GET: Final[Any] = web.RequestKey("tunnelled_get", bool) if hasattr(web, "RequestKey") else "tunnelled_get"
_CACHE_LIMIT: Final = 10_000
_FORM_TYPE: Final = "application/x-www-form-urlencoded"


def presented_token(request: web.Request) -> str | None:
    """The token the request carries, if any."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() in ("bearer", "oauth2") and value.strip():
        return value.strip()
    return request.query.get("api_token") or None


async def tunnelled_token(request: web.Request) -> str | None:
    """``api_token`` from the form body of a tunnelled GET (googleapiclient moves the whole query there,
    the token with it); never from any other body."""
    if not request.get(TUNNELLED_GET) or request.content_type != _FORM_TYPE:
        return None
    value = (await request.post()).get("api_token")  # parsed once; request_parameters reuses it
    return value if isinstance(value, str) and value else None


class Authenticator:
    """Resolves tokens to callers, with a short-lived cache."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._cache: dict[bytes, tuple[float, TokenInfo | None]] = {}

    async def _info(self, token: str) -> TokenInfo | None:
        key = token_digest(token)
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < CACHE_SECONDS:
            return hit[1]
        info = await lookup_token(self.pool, token)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = (now, info)
        return info

    async def caller(self, request: web.Request) -> Caller:
        """The authenticated caller, or ``ApiError(401)``."""
        token = presented_token(request) or await tunnelled_token(request)
        if token is None:
            raise ApiError(401, "Not logged in")
        if not token.isascii() or not token.isprintable():
            # Tokens are printable ASCII; anything else (invalid UTF-8 arrives as surrogates) cannot be one.
            raise ApiError(401, "Not logged in: unknown token")
        info = await self._info(token)
        if info is None:
            raise ApiError(401, "Not logged in: unknown token")
        if info.expires_at is not None and info.expires_at <= datetime.now(UTC):
            raise ApiError(401, "Not logged in: token expired")
        caller = Caller(
            user_uuid=info.user_uuid,
            role=info.role,
            api_client_uuid=info.api_client_uuid,
            token_uuid=info.token_uuid,
            read_only=info.read_only,
            request_id=request.get(REQUEST_ID, ""),
        )
        request[CALLER] = caller
        return caller


AUTHENTICATOR: Final = web.AppKey("authenticator", Authenticator)


async def authenticate(request: web.Request) -> Caller:
    """The request's caller (401 if none)."""
    return await request.app[AUTHENTICATOR].caller(request)
