"""Service configuration, read from the environment once at start."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

_PREFIX = re.compile(r"^[0-9a-z]{5}$")


def default_data_dir() -> Path:
    """Where the embedded PostgreSQL and the signing key live when ``JOBLEDGER_DATA`` is not set.

    As root, pgserver makes every parent folder of its data world-readable, so the default there is a
    folder whose parents already are (``/var/lib/jobledger``); otherwise the XDG data home.
    """
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/lib/jobledger")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "jobledger"


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment."""

    database_url: str | None = None
    data_dir: Path = field(default_factory=default_data_dir)
    uuid_prefix: str = "zzzzz"
    pool_min_size: int = 2
    pool_max_size: int = 20
    # A statement that runs longer than this is cancelled: no request may hold a connection for long.
    statement_timeout_ms: int = 5_000
    # An abandoned transaction holds back the sequencer's horizon (see docs/operations.md); end it fast.
    idle_in_transaction_timeout_ms: int = 5_000
    lock_timeout_ms: int = 2_000
    # The sequencer lease: a leader that has not renewed it for this long (frozen, partitioned, stuck) has lost
    # the lead, its writes are refused by PostgreSQL, and another process takes over (ledger/sequencer.py).
    sequencer_lease_ms: int = 3_000
    # The Ed25519 key that signs ledger checkpoints; None: ``data_dir / "signing-key.pem"``, made on first start.
    signing_key_path: Path | None = None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        """Build settings from ``env`` (default: ``os.environ``)."""
        env = dict(os.environ if env is None else env)
        prefix = env.get("JOBLEDGER_UUID_PREFIX", "zzzzz")
        if not _PREFIX.match(prefix):
            raise ValueError("JOBLEDGER_UUID_PREFIX must be five characters of [0-9a-z]")
        data_dir = Path(env["JOBLEDGER_DATA"]).expanduser() if env.get("JOBLEDGER_DATA") else default_data_dir()
        key = env.get("JOBLEDGER_SIGNING_KEY")
        signing_key_path = Path(key).expanduser() if key else None
        return cls(
            database_url=env.get("DATABASE_URL") or None,
            data_dir=data_dir,
            uuid_prefix=prefix,
            pool_min_size=int(env.get("JOBLEDGER_POOL_MIN", "2")),
            pool_max_size=int(env.get("JOBLEDGER_POOL_MAX", "20")),
            statement_timeout_ms=int(env.get("JOBLEDGER_STATEMENT_TIMEOUT_MS", "5000")),
            idle_in_transaction_timeout_ms=int(env.get("JOBLEDGER_IDLE_TX_TIMEOUT_MS", "5000")),
            lock_timeout_ms=int(env.get("JOBLEDGER_LOCK_TIMEOUT_MS", "2000")),
            sequencer_lease_ms=max(int(env.get("JOBLEDGER_SEQUENCER_LEASE_MS", "3000")), 100),
            signing_key_path=signing_key_path,
        )
