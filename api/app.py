"""The aiohttp application: routes from ``api.methods``, the error middleware, and the database lifecycle."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Final

from aiohttp import web

from api.auth import AUTHENTICATOR, Authenticator
from api.context import JOBS, POOL, SETTINGS, STORE
from api.errors import error_middleware
from api.health import healthz
from api.methods import add_routes
from api.params import MAX_BODY_BYTES
from ledger.config import Settings
from ledger.database import apply_schema, create_pool
from ledger.service import JobService
from ledger.store import EventStore
from ledger.users import IssuedToken, bootstrap_admin

_log = logging.getLogger("jobledger")
ADMIN_TOKEN_SINK: Final = web.AppKey("admin_token_sink", Callable[[IssuedToken], None])


def _announce_admin(issued: IssuedToken) -> None:
    # Printed once, on the first start of an empty database: the only time the secret is ever shown.
    print(f'{{"admin_user_uuid": "{issued.user_uuid}", "token": "{issued.token}"}}', flush=True)


def _database(dsn: str) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        pool = await create_pool(dsn, settings)
        try:
            async with pool.acquire() as conn:
                await apply_schema(conn)
            issued = await bootstrap_admin(pool, settings.uuid_prefix)
            if issued is not None:
                app[ADMIN_TOKEN_SINK](issued)
            store = EventStore(pool)
            app[POOL] = pool
            app[STORE] = store
            app[JOBS] = JobService(store, settings.uuid_prefix)
            app[AUTHENTICATOR] = Authenticator(pool)
            yield
        finally:
            await pool.close()

    return lifecycle


def create_app(
    settings: Settings, dsn: str, *, admin_token_sink: Callable[[IssuedToken], None] = _announce_admin
) -> web.Application:
    """The service as an aiohttp application on the database at ``dsn``."""
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY_BYTES)
    app[SETTINGS] = settings
    app[ADMIN_TOKEN_SINK] = admin_token_sink
    app.cleanup_ctx.append(_database(dsn))
    add_routes(app)
    app.router.add_get("/healthz", healthz)
    return app
