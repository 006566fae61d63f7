"""HTTP create and get throughput of ``jobledger serve --workers 1`` against ``--workers 2`` (and more).

Usage::

    python -m bench.workers [--seconds S] [--repeat R] [--connections C] [--warmup W] [--workers 1,2]
                            [--serve-arg=--no-access-log ...]

For every repeat and worker count (in alternating order, so each pair runs back to back) the service starts
as a subprocess on a fresh scratch database, ``bench.http_api.Load`` pre-creates its jobs, and ``create``
(POST jobs) and ``get`` (GET jobs/{uuid}) each run for ``S`` seconds over ``C`` connections of one aiohttp
session. Server CPU is that of every service process (the parent and its workers; the parent only waits),
read from ``/proc``; the database's backends are not counted. Medians over the repeats.
"""

from __future__ import annotations

import argparse
import sys
from typing import Final

import aiohttp
import psutil

from bench.common import (
    RunResult,
    add_run_options,
    bench_main,
    int_list,
    markdown_table,
    median,
    process_cpu,
    report_header,
    run_workers,
    scratch_database,
    server_version,
)
from bench.http_api import Load, Servers

VARIANTS: Final = ("create", "get")


class WorkerServers(Servers):
    """``bench.http_api.Servers`` with only the jobledger server, run with ``--workers N``."""

    def __init__(self, dsn: str, workers: int, serve_args: list[str]) -> None:
        super().__init__(dsn)
        self.workers = workers
        self.serve_args = serve_args

    async def start(self) -> None:
        """Start the service, read its admin token, make a user and its token, wait until it answers."""
        await self.start_ledger(["--workers", str(self.workers), *self.serve_args], "bench-workers")

    def service_pids(self) -> list[int]:
        """The parent and its workers."""
        parent = psutil.Process(self.ledger_pid)
        return [parent.pid, *(child.pid for child in parent.children())]


async def measure(server_dsn: str, workers: int, args: argparse.Namespace) -> dict[str, RunResult]:
    """One repeat at one worker count: a fresh database and service, then each variant once."""
    async with scratch_database(server_dsn) as dsn:
        servers = WorkerServers(dsn, workers, args.serve_arg)
        try:
            await servers.start()
            load = Load(servers)
            await load.prepare()
            pids = servers.service_pids()

            async def server_cpu() -> dict[int, float]:
                return process_cpu(pids)

            results = {}
            for variant in VARIANTS:
                op = load.create if variant == "create" else load.get
                connector = aiohttp.TCPConnector(limit=args.connections, limit_per_host=args.connections)
                async with aiohttp.ClientSession(connector=connector) as load.session:
                    results[variant] = await run_workers(
                        op, args.connections, seconds=args.seconds, warmup=args.warmup, server_cpu=server_cpu
                    )
                load.session = None
                result = results[variant]
                print(
                    f"workers {workers} {variant:<6} {result.ops_per_s:>8,.0f} req/s  p50 {result.p50_ms:6.2f} ms  "
                    f"p99 {result.p99_ms:6.2f} ms  server CPU {result.server_us_per_op:6.1f} us/req",
                    file=sys.stderr,
                    flush=True,
                )
            return results
        finally:
            servers.close()


async def benchmark(server_dsn: str, args: argparse.Namespace) -> str:
    """Every repeat at every worker count; the report."""
    version = await server_version(server_dsn)
    runs: dict[tuple[int, str], list[RunResult]] = {(w, v): [] for w in args.workers for v in VARIANTS}
    for repeat in range(args.repeat):
        for workers in args.workers if repeat % 2 == 0 else args.workers[::-1]:
            for variant, result in (await measure(server_dsn, workers, args)).items():
                runs[workers, variant].append(result)

    def stat(workers: int, variant: str, get: object) -> float:
        return median([get(r) for r in runs[workers, variant]])  # type: ignore[operator]

    rows = [
        [
            workers,
            variant,
            stat(workers, variant, lambda r: r.ops_per_s),
            stat(workers, variant, lambda r: r.ops_per_s) / stat(args.workers[0], variant, lambda r: r.ops_per_s),
            stat(workers, variant, lambda r: r.p50_ms),
            stat(workers, variant, lambda r: r.p99_ms),
            stat(workers, variant, lambda r: r.server_us_per_op),
        ]
        for variant in VARIANTS
        for workers in args.workers
    ]
    headers = ["workers", "variant", "req/s", f"× workers {args.workers[0]}", "p50 ms", "p99 ms", "server CPU µs/req"]
    return "\n".join(
        [
            *report_header("workers", version, "PostgreSQL, the service and the load client"),
            f"Median of {args.repeat} repeats of {args.seconds:g} s per variant (after {args.warmup:g} s warm-up), "
            f"{args.connections} connections.",
            "",
            markdown_table(headers, rows),
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__.split("\n")[0])
    add_run_options(parser)
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections (default 32)")
    parser.add_argument(
        "--workers",
        type=int_list,
        default=[1, 2],
        help="comma-separated worker counts (default 1,2)",
    )
    parser.add_argument("--serve-arg", action="append", default=[], help="an extra argument for serve (repeatable)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    bench_main(benchmark, parse_args(argv))


if __name__ == "__main__":
    main()
