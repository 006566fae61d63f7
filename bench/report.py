"""What one ``python -m bench`` run measured, and its rendering as ``bench/RESULTS.md``.

Every figure is a series of samples, one per round (the rounds interleave all figures, so a figure and the
limit it is compared with were measured minutes apart at most, under the same outside load). The report
gives each figure's median, min and max over the rounds, and each ratio to its limit as the median of the
per-round ratios, so that noise shared by both sides of a pair cancels.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from bench.common import RunResult, markdown_table


@dataclass(slots=True)
class Series:
    """The samples of one figure: its value per round, with latency percentiles when it is a load run."""

    unit: str
    values: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)

    def stat(self, which: Callable[[Sequence[float]], float], of: str = "values") -> float:
        """``which`` (``median``, ``min`` or ``max``) of ``of`` (values, p50_ms or p99_ms); NaN when empty."""
        data = [v for v in getattr(self, of) if not math.isnan(v)]
        return which(data) if data else math.nan

    @property
    def median(self) -> float:
        """The median value over the rounds."""
        return self.stat(statistics.median)


class Results:
    """Every figure of the run, by name, plus notes and the load average seen while it ran."""

    def __init__(self) -> None:
        self.series: dict[str, Series] = {}
        self.notes: list[str] = []
        self.skipped: list[str] = []
        self.sections: dict[str, str] = {}
        self.load_samples: list[float] = []

    def add(self, name: str, value: float, unit: str, *, p50_ms: float = math.nan, p99_ms: float = math.nan) -> None:
        """Record one sample of figure ``name``."""
        series = self.series.setdefault(name, Series(unit))
        series.values.append(value)
        series.p50_ms.append(p50_ms)
        series.p99_ms.append(p99_ms)

    def add_run(self, name: str, result: RunResult, unit: str = "ops/s") -> None:
        """Record a load run: its throughput and latency percentiles."""
        self.add(name, result.ops_per_s, unit, p50_ms=result.p50_ms, p99_ms=result.p99_ms)

    def sample_load(self) -> None:
        """Note the 1-minute load average now (the machine is shared; it says how noisy the run was)."""
        self.load_samples.append(os.getloadavg()[0])

    def median(self, name: str) -> float:
        """The median of figure ``name`` (NaN if it was not measured)."""
        series = self.series.get(name)
        return series.median if series else math.nan

    def ratio(self, name: str, limit: str) -> float:
        """The median over rounds of ``name`` ÷ ``limit`` measured in the same round (NaN if either is absent)."""
        a, b = self.series.get(name), self.series.get(limit)
        if a is None or b is None:
            return math.nan
        pairs = [x / y for x, y in zip(a.values, b.values, strict=False) if y and not math.isnan(x / y)]
        return statistics.median(pairs) if pairs else math.nan

    def table(self, names: Sequence[str]) -> str:
        """Median, min and max (and latency percentiles when there are any) of ``names``, in that order."""
        rows = []
        for name in names:
            series = self.series.get(name)
            if series is None:
                continue
            rows.append(
                [
                    name,
                    series.median,
                    series.stat(min),
                    series.stat(max),
                    series.unit,
                    series.stat(statistics.median, "p50_ms"),
                    series.stat(statistics.median, "p99_ms"),
                    series.stat(max, "p99_ms"),
                    len(series.values),
                ]
            )
        headers = ["figure", "median", "min", "max", "unit", "p50 ms", "p99 ms", "worst p99 ms", "samples"]
        return markdown_table(headers, rows)


@dataclass(frozen=True, slots=True)
class Target:
    """One target of issue 6: a figure (or a ratio of two) compared with a threshold."""

    label: str
    figure: str
    threshold: float
    limit: str | None = None  # a ratio figure ÷ limit when given
    below: bool = False  # the target is "less than threshold"
    unit: str = ""
    of: str = "values"  # or p99_ms

    def value(self, results: Results) -> float:
        """The measured value (a median, or the median per-round ratio)."""
        if self.limit is not None:
            return results.ratio(self.figure, self.limit)
        series = results.series.get(self.figure)
        if series is None:
            return math.nan
        return series.stat(statistics.median, self.of)

    def verdict(self, results: Results) -> str:
        """``met``, ``MISSED`` or ``not measured``."""
        value = self.value(results)
        if math.isnan(value):
            return "not measured"
        ok = value < self.threshold if self.below else value >= self.threshold
        return "met" if ok else "MISSED"

    def row(self, results: Results) -> list[object]:
        """The target's row of the summary table."""
        value = self.value(results)
        if math.isnan(value):
            shown = "–"
        elif self.limit:
            shown = f"{value:.2f}×"
        else:
            shown = f"{value:,.{0 if value >= 1000 else 1}f} {self.unit}".strip()
        sign = "<" if self.below else "≥"
        wanted = f"{sign} {self.threshold:,g}{'×' if self.limit else ' ' + self.unit}".strip()
        return [self.label, shown, wanted, self.verdict(results)]


CREATE: Final = "HTTP create@32"
TARGETS: Final = (
    Target("HTTP create@32 ÷ bare INSERT handler@32", CREATE, 0.60, limit="bare insert handler@32"),
    Target("HTTP get@32 ÷ bare SELECT handler@32", "HTTP get@32", 0.80, limit="bare select handler@32"),
    Target("HTTP create@32 p99", CREATE, 25.0, below=True, unit="ms", of="p99_ms"),
    Target("HTTP get@32 p99", "HTTP get@32", 25.0, below=True, unit="ms", of="p99_ms"),
    Target("HTTP list@32 p99", "HTTP list@32", 25.0, below=True, unit="ms", of="p99_ms"),
    Target("store append@8 ÷ eventsourcing append@8", "store append@8", 3.0, limit="eventsourcing append@8"),
    Target("store append@8 ÷ Message DB write_message@8", "store append@8", 1.0, limit="Message DB write_message@8"),
    Target(
        "stream catch-up over HTTP ÷ eventsourcing notification read",
        "stream catch-up HTTP long-poll",
        1.0,
        limit="eventsourcing notification read (decoded)",
    ),
    Target("fold (per CPU second; wall time below)", "fold in memory (per CPU second)", 500_000, unit="events/s"),
    Target("rebuild of the largest ledger", "rebuild (largest ledger)", 60.0, below=True, unit="s"),
    Target("as-of on the long job", "as-of long job (last version)", 50.0, below=True, unit="ms"),
    Target("service RSS under HTTP load (max)", "service RSS under load", 200.0, below=True, unit="MiB"),
)


def targets_table(results: Results) -> str:
    """Every target with its measured value and verdict."""
    return markdown_table(["target", "measured", "wanted", ""], [t.row(results) for t in TARGETS])


def ratio_table(results: Results, pairs: Sequence[tuple[str, str]]) -> str:
    """Each (figure, limit) pair: both medians and the median per-round ratio."""
    rows = [
        [name, results.median(name), limit, results.median(limit), f"{results.ratio(name, limit):.2f}"]
        for name, limit in pairs
        if name in results.series and limit in results.series
    ]
    return markdown_table(["figure", "median", "limit (same run)", "median", "ratio (median of rounds)"], rows)
