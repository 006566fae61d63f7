"""Users over HTTP: ``GET users/current``, the caller (what Arvados tools call to check a token).

HTTP only: the caller comes from ``api.auth``, the stored user from ``ledger.users``.
"""

from __future__ import annotations

import hashlib
from typing import Final

import msgspec
from aiohttp import web

from api.auth import authenticate
from api.context import POOL
from api.errors import ApiError
from api.methods import Method
from api.schemas import User
from ledger.users import StoredUser, get_user
from projections.timefmt import format_ts


def user_resource(user: StoredUser) -> User:
    """The API's view of a stored user; its etag is a digest of what the user's attributes say."""
    created_at = format_ts(user.created_at)
    content = msgspec.json.encode([user.uuid, user.name, user.role, created_at])
    etag = hashlib.md5(content, usedforsecurity=False).hexdigest()
    return User(
        uuid=user.uuid,
        etag=etag,
        href=f"/users/{user.uuid}",
        created_at=created_at,
        name=user.name,
        username=user.name,
        role=user.role,
        is_admin=user.role == "admin",
    )


async def current_user(request: web.Request) -> web.Response:
    """GET users/current: the user the request's token belongs to (401 without a valid token)."""
    caller = await authenticate(request)
    stored = await get_user(request.app[POOL], caller.user_uuid)
    if stored is None:  # tokens reference their user (a foreign key): only a concurrent change gets here
        raise ApiError(401, "Not logged in: the token's user no longer exists")
    user = user_resource(stored)
    return web.Response(
        body=msgspec.json.encode(user), content_type="application/json", headers={"ETag": f'"{user.etag}"'}
    )


USER_METHODS: Final[tuple[Method, ...]] = (
    Method("users", "current", "GET", "users/current", current_user,
           "The caller: the user the request's token belongs to (401 without a valid token).", response="User"),
)  # fmt: skip
