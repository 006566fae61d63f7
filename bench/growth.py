"""How cost grows with the ledger: get, list and as-of latency, and rebuild time, at each ledger size.

For each size a fresh scratch database gets one long job (``RunConfig.history`` events: a submission and
priority updates) and ``size`` events of five-event jobs, built by ``bench.provenance`` with the real hashes
and loaded with COPY (its ``load`` also gives positions and rebuilds the read model, so the ledger is valid;
the smallest is also run through ``verify_ledger``). Then ``jobledger serve`` (its own process) answers
sequential requests over one connection, the plans of the queries behind them are taken with
``EXPLAIN ANALYZE``, the service is stopped and the read model is rebuilt ``RunConfig.rebuilds`` times.
"""

from __future__ import annotations

import itertools
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
import asyncpg

from bench.common import markdown_table, scratch_database
from bench.plan import RunConfig
from bench.provenance import LIFECYCLE, _uuid, ledger_rows, load, long_history_rows
from bench.report import Results
from bench.stream import served
from ledger.asof import UP_TO_VERSION
from ledger.config import Settings
from ledger.database import create_pool
from ledger.queries import ListQuery, build_sql
from ledger.rebuild import rebuild_read_model
from ledger.store import GET_JOB
from ledger.verify import verify_ledger

LONG_JOB: Final = 10**9  # provenance._uuid number of the long job, far from the five-event jobs' 0..n
FIGURES: Final = ("get", "list", "list count=none", "as-of (5-event job)", "as-of (long job)")


@dataclass(slots=True)
class SizeResult:
    """What one ledger size measured: latencies (ms) by figure, rebuild seconds, plans by query."""

    events: int
    load_seconds: float = 0.0
    latencies: dict[str, list[float]] = field(default_factory=dict)
    rebuilds: list[float] = field(default_factory=list)
    plans: dict[str, str] = field(default_factory=dict)
    plan_ms: dict[str, float] = field(default_factory=dict)


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def _requests(base_url: str, token: str, size: int, history: int, count: int) -> dict[str, list[float]]:
    jobs = size // LIFECYCLE
    base = f"{base_url}/orvos/v1/jobs"
    cases: dict[str, Any] = {
        "get": lambda: (f"{base}/{_uuid(random.randrange(jobs))}", {}),
        "list": lambda: (base, {"limit": "20"}),
        "list count=none": lambda: (base, {"limit": "20", "count": "none"}),
        "as-of (5-event job)": lambda: (f"{base}/{_uuid(random.randrange(jobs))}", {"as_of_version": "3"}),
        "as-of (long job)": lambda: (f"{base}/{_uuid(LONG_JOB)}", {"as_of_version": str(history)}),
    }
    headers = {"Authorization": f"Bearer {token}"}
    out: dict[str, list[float]] = {name: [] for name in cases}
    async with aiohttp.ClientSession() as session:
        # Interleaved request by request, so that a burst of outside load hits every figure alike.
        for attempt in range(count + 2):
            for name, case in cases.items():
                url, params = case()
                began = time.perf_counter()
                async with session.get(url, params=params, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"{name}: {response.status}")
                if attempt >= 2:  # two warm-up requests each
                    out[name].append((time.perf_counter() - began) * 1000)
    return out


async def explain(pool: asyncpg.Pool, size: int, history: int) -> tuple[dict[str, str], dict[str, float]]:
    """``EXPLAIN ANALYZE`` of the statements behind the figures; the plans and their execution times (ms)."""
    page_sql, count_sql, values = build_sql(ListQuery(limit=20))
    assert count_sql is not None
    job = _uuid(size // LIFECYCLE // 2)
    statements = {
        "get (GET_JOB)": (GET_JOB, [job]),
        "list page": (page_sql, values),
        "list count (items_available)": (count_sql, values[:-2]),
        "as-of long job (UP_TO_VERSION)": (UP_TO_VERSION, [_uuid(LONG_JOB), history]),
    }
    plans, times = {}, {}
    for name, (sql, args) in statements.items():
        rows = await pool.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", *args)
        lines = [row[0] for row in rows]
        plans[name] = "\n".join(lines)
        times[name] = next(float(line.split()[2]) for line in lines if line.startswith("Execution Time"))
    return plans, times


async def measure_size(server: str, config: RunConfig, size: int, *, verify: bool) -> SizeResult:
    """Load a ledger of ``size`` events (plus the long job) and measure it."""
    async with scratch_database(server) as dsn:
        pool = await create_pool(dsn, Settings(pool_min_size=1, pool_max_size=4, statement_timeout_ms=0))
        try:
            began = time.perf_counter()
            rows = itertools.chain(long_history_rows(config.history, LONG_JOB), ledger_rows(size))
            events = await load(dsn, rows, pool)
            result = SizeResult(events=events, load_seconds=time.perf_counter() - began)
            if verify:
                report = await verify_ledger(pool)
                if not report.ok:
                    raise AssertionError(f"the generated ledger does not verify: {report.findings}")
            with tempfile.TemporaryDirectory(prefix="jobledger-bench-growth-") as folder:
                async with served(dsn, Path(folder)) as (base_url, _process, _pool, token):
                    result.latencies = await _requests(base_url, token, size, config.history, config.growth_requests)
            result.plans, result.plan_ms = await explain(pool, size, config.history)
            for _ in range(config.rebuilds):
                report = await rebuild_read_model(pool)
                result.rebuilds.append(report.seconds)
            return result
        finally:
            await pool.close()


async def run_growth(server: str, config: RunConfig, results: Results) -> list[SizeResult]:
    """Every configured size in turn; the largest also feeds the rebuild and as-of targets."""
    sizes = []
    for index, size in enumerate(config.sizes):
        print(f"growth: {size:,} events", file=sys.stderr, flush=True)
        measured = await measure_size(server, config, size, verify=index == 0)
        results.sample_load()
        sizes.append(measured)
        print(
            f"  loaded in {measured.load_seconds:.1f} s; rebuild {measured.rebuilds} s; "
            + ", ".join(f"{k} {statistics.median(v):.2f} ms" for k, v in measured.latencies.items()),
            file=sys.stderr,
            flush=True,
        )
    largest = sizes[-1]
    for seconds in largest.rebuilds:
        results.add("rebuild (largest ledger)", seconds, "s")
    long_job = largest.latencies["as-of (long job)"]
    results.add(
        "as-of long job (last version)",
        statistics.median(long_job),
        "ms",
        p50_ms=statistics.median(long_job),
        p99_ms=_percentile(long_job, 0.99),
    )
    return sizes


WHY: Final = (
    "Why (see the plans below): get, the list page and as-of are index lookups (`jobs_pkey`; `jobs_modified_at` "
    "read for LIMIT 20 rows only; the events' `(job_uuid, version)` unique index), so their cost is logarithmic "
    "in the ledger, flat in practice; as-of grows with the job's own history (the long job folds every one of "
    "its events), not with the ledger. Two costs grow linearly with the ledger: the exact `count(*)` behind "
    "list's `items_available` (the default `count=exact` scans every job row it counts) and rebuild (it "
    "re-folds every event). With `count=none` list stays flat; a client paging a large ledger should ask for it."
)


def _scan(plan: str) -> str:
    """The plan's scan nodes, e.g. ``Seq Scan on jobs``, without costs."""
    nodes = [line.strip(" ->").split("  (")[0] for line in plan.splitlines() if "Scan" in line and "(" in line]
    return "; ".join(nodes) or plan.splitlines()[0].split("  (")[0]


def growth_section(sizes: list[SizeResult], config: RunConfig) -> str:
    """The growth tables, each figure's growth factor, and the plans at the largest size."""
    headers = ["events in the ledger"] + [f"{name} p50 ms" for name in FIGURES] + ["rebuild s", "rebuild events/s"]
    rows = []
    for size in sizes:
        rebuild = statistics.median(size.rebuilds)
        rows.append(
            [size.events, *(statistics.median(size.latencies[name]) for name in FIGURES), rebuild,
             size.events / rebuild]
        )  # fmt: skip
    p99_headers = ["events in the ledger"] + [f"{name} p99 ms" for name in FIGURES]
    p99_rows = [[size.events, *(_percentile(size.latencies[n], 0.99) for n in FIGURES)] for size in sizes]
    plan_names = list(sizes[0].plan_ms)
    plan_rows = [[size.events, *(size.plan_ms[n] for n in plan_names)] for size in sizes]
    first, last = sizes[0], sizes[-1]
    scale = last.events / first.events
    factors = []
    for name in FIGURES:
        factor = statistics.median(last.latencies[name]) / statistics.median(first.latencies[name])
        factors.append([name, f"{factor:.1f}×", "grows" if factor > 2 else "flat"])
    factor = statistics.median(last.rebuilds) / statistics.median(first.rebuilds)
    factors.append(["rebuild", f"{factor:.1f}×", "grows" if factor > 2 else "flat"])
    for name in plan_names:
        factor = last.plan_ms[name] / max(first.plan_ms[name], 1e-3)
        verdict = "grows" if factor > 2 else "flat"
        factors.append([f"EXPLAIN ANALYZE {name}", f"{factor:.1f}×", f"{verdict}: {_scan(last.plans[name])}"])
    out = [
        f"Each size is a fresh database: one job of {config.history:,} events plus five-event jobs, built with the "
        f"real fold and hashes and loaded with COPY; {config.growth_requests} sequential requests per figure "
        "over one connection (interleaved), median of the rebuilds.",
        "",
        markdown_table(headers, rows),
        "",
        markdown_table(p99_headers, p99_rows),
        "",
        "Server-side execution time of the statements behind them (EXPLAIN ANALYZE, ms):",
        "",
        markdown_table(["events in the ledger", *plan_names], plan_rows),
        "",
        f"Growth from {first.events:,} to {last.events:,} events ({scale:.0f}× the events):",
        "",
        markdown_table(["figure", "largest ÷ smallest", "verdict"], factors),
        "",
        WHY,
        "",
        f"Plans at {last.events:,} events:",
        "",
    ]
    for name, plan in last.plans.items():
        out += [f"**{name}**", "", "```", plan, "```", ""]
    return "\n".join(out)
