"""Typed keys for what the application holds: the pool, the services, the settings."""

from __future__ import annotations

from typing import Final

import asyncpg
from aiohttp import web

from ledger.config import Settings
from ledger.service import JobService
from ledger.store import EventStore

SETTINGS: Final = web.AppKey("settings", Settings)
POOL: Final = web.AppKey("pool", asyncpg.Pool)
STORE: Final = web.AppKey("store", EventStore)
JOBS: Final = web.AppKey("jobs", JobService)
