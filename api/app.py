"""The aiohttp application: routes from ``api.methods``, the error middleware, and the database lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Final

from aiohttp import web

from api import provenance
from api.auth import AUTHENTICATOR, Authenticator
from api.context import JOBS, POOL, SETTINGS, STORE
from api.discovery import add_document_routes
from api.errors import error_middleware
from api.events import NOTIFIER, SEQUENCER, end_streams
from api.health import healthz, metrics_endpoint
from api.methods import add_routes
from api.metrics import METRICS, MeteredEventStore, Metrics, follow_sequencer
from api.observe import WORKER, add_worker_header, observe_middleware
from api.params import MAX_BODY_BYTES
from ledger.config import Settings
from ledger.database import apply_schema, create_pool
from ledger.sequencer import Sequencer
from ledger.service import JobService
from ledger.stream import StreamNotifier
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
            store = MeteredEventStore(pool, app[METRICS].appended)
            app[POOL] = pool
            app[STORE] = store
            app[JOBS] = JobService(store, settings.uuid_prefix)
            app[AUTHENTICATOR] = Authenticator(pool)
            # The event stream: this process's LISTEN connection, and its bid to be the sequencer.
            app[NOTIFIER] = notifier = StreamNotifier(dsn, settings)
            app[SEQUENCER] = sequencer = Sequencer(dsn, settings, on_head=notifier.publish)
            store.on_append = sequencer.poke
            notifier.start()
            sequencer.start()
            leader_flag = asyncio.create_task(follow_sequencer(app[METRICS], lambda: sequencer.is_leader))
            try:
                yield
            finally:
                leader_flag.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await leader_flag
                await sequencer.stop()
                await notifier.stop()
        finally:
            await pool.close()

    return lifecycle


def create_app(
    settings: Settings,
    dsn: str,
    *,
    admin_token_sink: Callable[[IssuedToken], None] = _announce_admin,
    worker: int = 0,
) -> web.Application:
    """The service as an aiohttp application on the database at ``dsn`` (``worker``: its index under
    ``serve --workers N``, reported in ``X-Jobledger-Worker``, ``/healthz`` and the access log)."""
    # observe_middleware outermost: it sees the status the error middleware rendered.
    app = web.Application(
        middlewares=[observe_middleware, error_middleware],
        client_max_size=MAX_BODY_BYTES,
        # Never inflate request bodies: aiohttp would do it on the event loop, stalling every client (a gzip
        # bomb); error_middleware refuses any Content-Encoding with 415 instead.
        handler_args={"auto_decompress": False},
    )
    app[SETTINGS] = settings
    app[WORKER] = worker
    app[METRICS] = Metrics()
    app.on_response_prepare.append(add_worker_header)
    app[ADMIN_TOKEN_SINK] = admin_token_sink
    app.cleanup_ctx.append(_database(dsn))
    app.on_shutdown.append(end_streams)
    app.on_startup.append(provenance.load_signing_key)  # the checkpoint key: loaded, or made on first start
    add_routes(app)
    add_document_routes(app)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_endpoint)
    return app
