"""The HTTP load generator, run as its own process so that it does not share an interpreter with anything measured.

Usage (by ``bench.http_suite``, one process per measured run)::

    python -m bench.loadgen --tool wrk|aiohttp --variant create --ledger-url URL --bare-url URL --token T
                            --uuids FILE --connections 32 --seconds 4 --warmup 1

Prints one JSON line: ``{"requests", "seconds", "p50_ms", "p99_ms", "errors", "tool"}``. With ``wrk`` (when
installed) the requests are written by a generated Lua script; otherwise ``bench.http_api.Load`` sends them
with an aiohttp client, one asyncio worker per connection. The variants are those of ``bench.http_api``
plus ``ping`` (the bare app's static ``/healthz``: the cost of HTTP alone).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Final

from bench.http_api import PRESEEDED_ROWS, Load

# A Lua expression: a job whose parameters are unique per thread and request (prefix, counter).
JOB_BODY: Final = """'{"job":{"script_name":"hash","script_version":"main","script_parameters":{"input":"' .. prefix \
.. '-' .. counter .. '","chunk_size":64},"resource_limits":{"min_nodes":1,"max_tasks_per_node":1}}}'"""
# For each variant: which server, the Lua expression of the request, whether it is authenticated.
WRK_REQUESTS: Final = {
    "create": ("ledger", f"wrk.format('POST', '/orvos/v1/jobs?allow_duplicate=true', json, {JOB_BODY})", True),
    "insert": ("bare", f"wrk.format('POST', '/insert', json, {JOB_BODY})", False),
    "get": ("ledger", "wrk.format('GET', '/orvos/v1/jobs/' .. uuids[math.random(#uuids)], auth)", True),
    "select": ("bare", f"wrk.format('GET', '/select/' .. math.random({PRESEEDED_ROWS}))", False),
    "list": ("ledger", "wrk.format('GET', '/orvos/v1/jobs?limit=20', auth)", True),
    "ping": ("bare", "wrk.format('GET', '/healthz')", False),
}
WRK_SCRIPT: Final = """
local token, uuid_file, run = "{token}", "{uuids}", "{run}"
auth = {{["Authorization"] = "Bearer " .. token}}
json = {{["Content-Type"] = "application/json"}}
if {authenticated} then json["Authorization"] = auth["Authorization"] end
uuids = {{}}
counter = 0
prefix = run
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
function init(args)
  prefix = run .. "-" .. tostring(tid)
  math.randomseed(os.time() + (tid or 0))
  for line in io.lines(uuid_file) do uuids[#uuids + 1] = line end
end
request = function()
  counter = counter + 1
  return {request}
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('RESULT {{"requests": %d, "seconds": %f, "p50_ms": %f, "p99_ms": %f, "errors": %d, ' ..
    '"detail": "connect %d read %d write %d status %d timeout %d"}}\\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    e.connect + e.read + e.write + e.status + e.timeout, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def wrk_available() -> bool:
    """Whether ``wrk`` is on the PATH."""
    return shutil.which("wrk") is not None


def _wrk(args: argparse.Namespace, seconds: float, run: str) -> dict[str, Any]:
    server, request, authenticated = WRK_REQUESTS[args.variant]
    url = args.ledger_url if server == "ledger" else args.bare_url
    script = WRK_SCRIPT.format(
        token=args.token, uuids=args.uuids, run=run, authenticated=str(authenticated).lower(), request=request
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(script)
    try:
        threads = min(2, args.connections)
        command = ["wrk", "-t", str(threads), "-c", str(args.connections), "-d", f"{seconds:g}s", "--timeout", "10s"]
        out = subprocess.run([*command, "-s", handle.name, url], capture_output=True, text=True, check=True)
    finally:
        Path(handle.name).unlink()
    match = re.search(r"^RESULT (\{.*\})$", out.stdout, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"wrk printed no result: {out.stdout!r} {out.stderr!r}")
    result: dict[str, Any] = json.loads(match.group(1))
    return result


def run_wrk(args: argparse.Namespace) -> dict[str, Any]:
    """A warm-up run (unmeasured), then the measured one."""
    if args.warmup > 0:
        _wrk(args, max(args.warmup, 1.0), "w")
    return _wrk(args, args.seconds, f"m{args.seconds:g}")


async def run_aiohttp(args: argparse.Namespace, uuids: list[str]) -> dict[str, Any]:
    """``bench.http_api.Load`` against the given servers; ``get`` reads the jobs ``uuids``."""
    servers = SimpleNamespace(
        ledger_url=args.ledger_url, bare_url=args.bare_url, user_token=args.token, ledger_pid=0, bare_pid=0
    )
    load = Load(servers)  # type: ignore[arg-type]  # Load reads only these attributes
    load.job_uuids = uuids
    result = await load.run(args.variant, args.connections, args.seconds, args.warmup)
    return {
        "requests": result.ops,
        "seconds": result.elapsed,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "errors": 0,  # Load raises on any unexpected status
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n")[0])
    parser.add_argument("--tool", choices=["wrk", "aiohttp"], default="wrk" if wrk_available() else "aiohttp")
    parser.add_argument("--variant", choices=sorted(WRK_REQUESTS), required=True)
    parser.add_argument("--ledger-url", required=True)
    parser.add_argument("--bare-url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--uuids", required=True, help="file of job uuids for get, one a line")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run one load and print its result as JSON."""
    args = parse_args(argv)
    if args.tool == "wrk":
        result = run_wrk(args)
    else:
        result = asyncio.run(run_aiohttp(args, Path(args.uuids).read_text().split()))
    result["tool"] = args.tool
    for key in ("p50_ms", "p99_ms"):
        if isinstance(result[key], float) and math.isnan(result[key]):
            result[key] = None
    print(json.dumps(result), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
