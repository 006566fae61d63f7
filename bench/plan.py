"""The shape of a ``python -m bench`` run: its sizes and durations, and what a suite of figures must offer."""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bench.report import Results


@dataclass(frozen=True, slots=True)
class RunConfig:
    """Sizes and durations of one run (``full`` or ``quick``)."""

    name: str
    rounds: int  # every interleaved figure is measured once per round
    seconds: float  # per load run
    warmup: float  # unmeasured, before each load run
    writers: tuple[int, ...]  # store-level concurrency
    peer_writers: tuple[int, ...]  # eventsourcing threads and Message DB connections
    connections: tuple[int, ...]  # HTTP concurrency
    backlog: int  # events read by the catch-up figures (jobledger, eventsourcing, Message DB)
    latency_rate: float  # appends/s while measuring stream delivery latency
    fold_events: int  # events folded per fold sample
    sizes: tuple[int, ...]  # ledger sizes (events) for the growth figures
    history: int  # events of the long job read as-of
    growth_requests: int  # sequential requests per latency figure and ledger size
    rebuilds: int  # rebuilds timed per ledger size
    out: Path  # where the charts and the raw samples go (bench/out)


FULL = dict(
    name="full",
    rounds=3,
    seconds=4.0,
    warmup=1.0,
    writers=(1, 8, 32),
    peer_writers=(1, 8),
    connections=(1, 32),
    backlog=50_000,
    latency_rate=1000.0,
    fold_events=100_000,
    sizes=(10_000, 100_000, 1_000_000),
    history=10_000,
    growth_requests=200,
    rebuilds=2,
)
QUICK = {
    **FULL,
    "name": "quick",
    "rounds": 2,
    "seconds": 1.0,
    "warmup": 0.3,
    "backlog": 5_000,
    "latency_rate": 500.0,
    "fold_events": 50_000,
    "sizes": (2_000, 10_000, 30_000),
    "history": 2_000,
    "growth_requests": 40,
    "rebuilds": 1,
}


class Suite(Protocol):
    """A group of figures sharing a set-up (a database, servers); measured once per round, interleaved."""

    title: str

    async def setup(self, stack: AsyncExitStack) -> None:
        """Create what the figures need; register its teardown on ``stack``. Raise ``Skip`` if impossible."""

    async def round(self, index: int) -> None:
        """Measure each figure once, recording into the run's ``Results``."""


class Skip(Exception):
    """A suite that cannot run here (a missing tool); its reason goes into RESULTS.md."""


__all__ = ["FULL", "QUICK", "Results", "RunConfig", "Skip", "Suite"]
