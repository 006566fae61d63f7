"""Fold rate: events per second folded in memory by ``projections.job.fold``, the same fold every read uses.

The events are ``bench.provenance.ledger_rows``' (jobs of five: submitted, updated, locked, started,
finished), decoded into ``Recorded`` once before timing; each sample folds every job's history from scratch.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from contextlib import AsyncExitStack

import msgspec

from bench.plan import RunConfig
from bench.provenance import ledger_rows
from bench.report import Results
from projections.job import Recorded, decode_event, fold
from projections.timefmt import format_ts


def histories(events: int) -> list[list[Recorded]]:
    """``events`` events of ``ledger_rows`` as each job's list of ``Recorded``, in version order."""
    jobs: dict[str, list[Recorded]] = defaultdict(list)
    for job, version, kind, data, actor, client, request, at, _prev, _hash in ledger_rows(events):
        jobs[job].append(
            Recorded(
                job_uuid=job,
                version=version,
                event=decode_event(kind, msgspec.json.decode(data)),
                actor_user_uuid=actor,
                actor_client_uuid=client,
                request_id=request,
                recorded_at=format_ts(at),
            )
        )
    return list(jobs.values())


def fold_rate(jobs: list[list[Recorded]]) -> tuple[float, float]:
    """Events per second of folding every history in ``jobs``: per second of wall time, and of this thread's CPU.

    The fold is pure computation in one thread, so its CPU time is what it costs; wall time adds whatever
    share of the cores other work on a shared machine took meanwhile.
    """
    count = sum(len(history) for history in jobs)
    began, cpu_began = time.perf_counter(), time.thread_time()
    for history in jobs:
        fold(history)
    return count / (time.perf_counter() - began), count / (time.thread_time() - cpu_began)


class FoldSuite:
    """fold in memory, one sample per round."""

    title = "fold"

    def __init__(self, server: str, config: RunConfig, results: Results) -> None:
        self.config, self.results = config, results
        self.jobs: list[list[Recorded]] = []

    async def setup(self, stack: AsyncExitStack) -> None:
        """Build and decode the histories (not timed)."""
        self.jobs = await asyncio.to_thread(histories, self.config.fold_events)

    async def round(self, index: int) -> None:
        """One timed fold of every history."""
        wall, cpu = fold_rate(self.jobs)
        self.results.add("fold in memory (per CPU second)", cpu, "events/s")
        self.results.add("fold in memory (wall time)", wall, "events/s")
