"""Users, API clients and tokens (CONTRACT §2). Tokens are stored as SHA-256 digests only."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime, timedelta
from typing import Final

import asyncpg
import msgspec

from ledger.access import ROLES, Role
from ledger.service import new_uuid

# Serialises the first-start bootstrap across service processes starting together.
_BOOTSTRAP_LOCK_KEY: Final = 0x6A6F6275  # "jobu"
DEFAULT_CLIENT: Final = "jobledger"
_TOKEN_ALPHABET: Final = "0123456789abcdefghijklmnopqrstuvwxyz"


class UserExists(ValueError):
    """A user with that name already exists."""


class UnknownUser(ValueError):
    """No user with that uuid."""


class User(msgspec.Struct, frozen=True, kw_only=True):
    """A user account."""

    uuid: str
    name: str
    role: Role


class StoredUser(User, frozen=True, kw_only=True):
    """A user account as read back from the database, with when it was created."""

    created_at: datetime


class IssuedToken(msgspec.Struct, frozen=True, kw_only=True):
    """A freshly made token: ``token`` is the secret, shown only this once."""

    uuid: str
    token: str
    user_uuid: str
    api_client_uuid: str
    read_only: bool
    expires_at: datetime | None


class TokenInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What a presented token grants."""

    token_uuid: str
    user_uuid: str
    role: Role
    api_client_uuid: str | None
    read_only: bool
    expires_at: datetime | None


def token_digest(secret: str) -> bytes:
    """The stored form of a token."""
    return hashlib.sha256(secret.encode()).digest()


def _new_secret() -> str:
    return "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(50))


async def create_user(pool: asyncpg.Pool, name: str, role: Role, uuid_prefix: str) -> User:
    """Create a user; ``UserExists`` if the name is taken."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    uuid = new_uuid(uuid_prefix, "tpzed")
    try:
        await pool.execute("INSERT INTO users (uuid, name, role) VALUES ($1, $2, $3)", uuid, name, role)
    except asyncpg.UniqueViolationError:
        raise UserExists(f"a user named {name!r} already exists") from None
    return User(uuid=uuid, name=name, role=role)


async def _ensure_client(conn: asyncpg.Connection, name: str, uuid_prefix: str) -> str:
    row = await conn.fetchrow(
        "INSERT INTO api_clients (uuid, name) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING RETURNING uuid",
        new_uuid(uuid_prefix, "ozdt8"),
        name,
    )
    if row is not None:
        return row["uuid"]
    return await conn.fetchval("SELECT uuid FROM api_clients WHERE name = $1", name)


async def create_token(
    db: asyncpg.Pool | asyncpg.Connection,
    user_uuid: str,
    uuid_prefix: str,
    *,
    read_only: bool = False,
    expires_in: float | None = None,
    client_name: str = DEFAULT_CLIENT,
) -> IssuedToken:
    """Issue a token for a user, on behalf of the named API client (created if new).

    ``db``: a pool (the token gets a transaction of its own) or a connection (in the caller's transaction).
    """
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn, conn.transaction():
            return await create_token(
                conn, user_uuid, uuid_prefix, read_only=read_only, expires_in=expires_in, client_name=client_name
            )
    conn = db
    secret = _new_secret()
    expires_at = None if expires_in is None else datetime.now(UTC) + timedelta(seconds=expires_in)
    uuid = new_uuid(uuid_prefix, "gj3su")
    if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM users WHERE uuid = $1)", user_uuid):
        raise UnknownUser(f"no user {user_uuid}")
    client_uuid = await _ensure_client(conn, client_name, uuid_prefix)
    await conn.execute(
        """INSERT INTO api_tokens (uuid, token_sha256, user_uuid, api_client_uuid, read_only, expires_at)
           VALUES ($1, $2, $3, $4, $5, $6)""",
        uuid,
        token_digest(secret),
        user_uuid,
        client_uuid,
        read_only,
        expires_at,
    )
    return IssuedToken(
        uuid=uuid,
        token=secret,
        user_uuid=user_uuid,
        api_client_uuid=client_uuid,
        read_only=read_only,
        expires_at=expires_at,
    )


async def lookup_token(pool: asyncpg.Pool, secret: str) -> TokenInfo | None:
    """What a token grants, or None if it is unknown. Expiry is the caller's to check."""
    row = await pool.fetchrow(
        """SELECT t.uuid, t.user_uuid, u.role, t.api_client_uuid, t.read_only, t.expires_at
           FROM api_tokens t JOIN users u ON u.uuid = t.user_uuid WHERE t.token_sha256 = $1""",
        token_digest(secret),
    )
    if row is None:
        return None
    return TokenInfo(
        token_uuid=row["uuid"],
        user_uuid=row["user_uuid"],
        role=row["role"],
        api_client_uuid=row["api_client_uuid"],
        read_only=row["read_only"],
        expires_at=row["expires_at"],
    )


async def get_user(pool: asyncpg.Pool, uuid: str) -> StoredUser | None:
    """The user with ``uuid`` as stored (with when it was created), or None if there is none."""
    row = await pool.fetchrow("SELECT uuid, name, role, created_at FROM users WHERE uuid = $1", uuid)
    if row is None:
        return None
    return StoredUser(uuid=row["uuid"], name=row["name"], role=row["role"], created_at=row["created_at"])


async def bootstrap_admin(pool: asyncpg.Pool, uuid_prefix: str) -> IssuedToken | None:
    """On a database with no users, create an ``admin`` user and a token for it; otherwise do nothing.

    Safe when several service processes start at once on an empty database: exactly one creates the admin.
    They queue on a transaction-scoped advisory lock, and the transaction is explicitly READ COMMITTED so the
    check after the lock sees a winner's commit: under REPEATABLE READ or SERIALIZABLE (a database's
    ``default_transaction_isolation`` may say so) the snapshot would be taken by the lock statement itself,
    before the wait, and every loser would try to insert a second ``admin`` too. The user and its token
    commit together, so a crash can never leave an admin that nobody holds a token for.
    """
    async with pool.acquire() as conn, conn.transaction(isolation="read_committed"):
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _BOOTSTRAP_LOCK_KEY)
        if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM users)"):
            return None
        uuid = new_uuid(uuid_prefix, "tpzed")
        await conn.execute("INSERT INTO users (uuid, name, role) VALUES ($1, 'admin', 'admin')", uuid)
        return await create_token(conn, uuid, uuid_prefix)
