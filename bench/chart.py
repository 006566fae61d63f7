"""The chart of a run: throughput against concurrency for jobledger, the physical limit and the peers."""

from __future__ import annotations

from pathlib import Path
from typing import Final

from bench.report import Results

STORE_LINES: Final = (
    ("store append", "jobledger store append", "C0", "-"),
    ("raw INSERT", "limit: raw asyncpg INSERT", "k", "--"),
    ("raw SELECT by key", "limit: raw asyncpg SELECT by key", "0.5", ":"),
    ("eventsourcing append", "eventsourcing 9.5 append", "C1", "-"),
    ("Message DB write_message", "Message DB write_message (one category)", "C2", "-"),
)
HTTP_LINES: Final = (
    ("HTTP create", "jobledger create", "C0", "-"),
    ("HTTP get", "jobledger get", "C3", "-"),
    ("HTTP list", "jobledger list", "C4", "-"),
    ("bare insert handler", "limit: bare aiohttp INSERT", "k", "--"),
    ("bare select handler", "limit: bare aiohttp SELECT", "0.5", "--"),
    ("bare ping handler", "limit: bare aiohttp ping", "0.7", ":"),
)


def _points(results: Results, prefix: str) -> tuple[list[int], list[float], list[float], list[float]]:
    found = []
    for name, series in results.series.items():
        head, _, concurrency = name.rpartition("@")
        if head == prefix and concurrency.isdigit():
            found.append((int(concurrency), series))
    found.sort(key=lambda item: item[0])
    xs = [c for c, _ in found]
    medians = [s.median for _, s in found]
    low = [s.median - s.stat(min) for _, s in found]
    high = [s.stat(max) - s.median for _, s in found]
    return xs, medians, low, high


def draw(results: Results, path: Path, title: str) -> None:
    """Write a two-panel PNG (store level; HTTP) to ``path``: medians, with min–max bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (store, http) = plt.subplots(1, 2, figsize=(13, 5.2))
    for axes, lines, xlabel, ylabel in (
        (store, STORE_LINES, "concurrent writers (connections or threads)", "operations/s"),
        (http, HTTP_LINES, "HTTP connections", "requests/s"),
    ):
        for prefix, label, colour, style in lines:
            xs, ys, low, high = _points(results, prefix)
            if xs:
                axes.errorbar(xs, ys, yerr=[low, high], label=label, color=colour, linestyle=style, marker="o",
                              capsize=3)  # fmt: skip
        axes.set_xscale("log", base=2)
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.set_ylim(bottom=0)
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8)
    store.set_title("store level, same PostgreSQL")
    http.set_title("HTTP, load generator in its own process")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
