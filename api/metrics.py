"""Prometheus metrics of one service process, and (with ``--workers N``) of all its sibling workers at once.

What is counted where:

* requests by method, route and status, and request latency by method and route: ``api.observe``, the
  outermost middleware. The route is the path template (``/orvos/v1/jobs/{uuid}``), never the path, so the
  number of series stays bounded whatever clients send;
* requests answered by the error middleware's catch-all (``unexpected error``): ``api.errors``. It should stay
  0 whatever clients send; the hostile-input and fuzz suites assert that it does;
* events appended: ``MeteredEventStore``, the service's event store with a counter beside it;
* open stream consumers (long-poll and SSE): ``stream_consumer``, a decorator on the two handlers;
* whether this process is the sequencer: refreshed every second by ``follow_sequencer``;
* the stream's lag (head position, unsequenced backlog and its age, the oldest write transaction): read from
  the database at scrape time (``/healthz`` computes the same), so every process reports the same numbers.

With ``--workers N`` the processes share one port, so a scrape reaches whichever worker accepts it; each
process's own numbers would make counters jump between scrapes. The supervisor therefore runs the workers in
``prometheus_client``'s multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, one memory-mapped file per process)
and any worker's ``/metrics`` reports the sum over all of them, the sequencer flag per live ``pid``.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, Final

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from ledger.store import EventStore
from ledger.stream import StreamStatus

MULTIPROCESS_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
# From a cached read (~1 ms) to the longest long-poll (60 s); SSE streams land in +Inf.
LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LEADER_REFRESH_SECONDS: Final = 1.0


def multiprocess_mode() -> bool:
    """Whether this process writes its metrics to the shared multiprocess folder (set by the supervisor)."""
    return bool(os.environ.get(MULTIPROCESS_ENV))


class Metrics:
    """The process's metric objects, on a registry of their own (one per application, so tests can share a
    process), and the exposition that a scrape returns."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "jobledger_http_requests",
            "HTTP requests answered, by method, route (path template) and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "jobledger_http_request_duration_seconds",
            "Time from receiving a request to its handler's return, by method and route. For the event stream "
            "it includes the long-poll wait; an SSE stream's whole life lands in +Inf.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.unexpected_errors = Counter(
            "jobledger_unexpected_errors",
            "Requests answered by the catch-all (422 'unexpected error'): a bug, never a client's fault. Each is "
            "logged at ERROR with its error_token and traceback.",
            registry=self.registry,
        )
        self.appended = Counter(
            "jobledger_events_appended", "Events appended (committed) through this service.", registry=self.registry
        )
        self.consumers = Gauge(
            "jobledger_stream_consumers",
            "Event stream requests being served now, by kind (long_poll, sse).",
            ["kind"],
            multiprocess_mode="livesum",
            registry=self.registry,
        )
        self.leader = Gauge(
            "jobledger_sequencer_leader",
            "1 if this process is the sequencer (with --workers N: one series per worker pid).",
            multiprocess_mode="liveall",
            registry=self.registry,
        )
        self._sources: list[Any]
        if multiprocess_mode():
            # Every worker's files, this one's included; the in-process registry would count this one twice.
            self._sources = [MultiProcessCollector(None)]
        else:
            ProcessCollector(registry=self.registry)
            self._sources = [self.registry]
        # Label children are looked up once per distinct (method, route, status), not on every request.
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request and its latency."""
        key = (method, route, status)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.requests.labels(method, route, str(status)),
                self.latency.labels(method, route),
            )
        children[0].inc()
        children[1].observe(seconds)

    def exposition(self, status: StreamStatus | None) -> bytes:
        """The text format of every metric, plus the stream's lag (None: the database did not answer)."""
        return generate_latest(_Scrape(self._sources, _stream_families(status)))  # type: ignore[arg-type]


class _Scrape:
    """What one scrape collects: the process's (or all workers') metrics, and the lag read just now."""

    def __init__(self, sources: Iterable[Any], extra: list[Metric]) -> None:
        self._sources = sources
        self._extra = extra

    def collect(self) -> Iterator[Metric]:
        for source in self._sources:
            yield from source.collect()
        yield from self._extra


def _stream_families(status: StreamStatus | None) -> list[Metric]:
    families: list[Metric] = [
        GaugeMetricFamily(
            "jobledger_database_up", "1 if this scrape could read the database.", value=0.0 if status is None else 1.0
        )
    ]
    if status is None:
        return families
    values: list[tuple[str, str, float | None]] = [
        ("jobledger_stream_head_position", "The latest position of the event stream.", status.head),
        (
            "jobledger_stream_unsequenced_events",
            "Committed events still waiting for a position (counted up to 100,000).",
            status.unsequenced,
        ),
        (
            "jobledger_stream_oldest_unsequenced_age_seconds",
            "How long the oldest unsequenced event has waited (0 when there is none).",
            status.oldest_unsequenced_age_seconds or 0.0,
        ),
        (
            "jobledger_stream_oldest_write_transaction_age_seconds",
            "Age of the oldest transaction holding a transaction id, cluster-wide: what holds the horizon back.",
            status.oldest_write_transaction_age_seconds or 0.0,
        ),
    ]
    families.extend(GaugeMetricFamily(name, help_text, value=value) for name, help_text, value in values)
    return families


METRICS: Final = web.AppKey("metrics", Metrics)


class MeteredEventStore(EventStore):
    """The event store, counting the events each committed append wrote."""

    def __init__(self, pool: Any, appended: Counter) -> None:
        super().__init__(pool)
        self._appended = appended

    async def append(self, *args: Any, **kwargs: Any) -> Any:
        """``EventStore.append``, counted once it committed."""
        sealed = await super().append(*args, **kwargs)
        self._appended.inc(len(sealed))
        return sealed


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def stream_consumer(kind: str) -> Callable[[Handler], Handler]:
    """Decorate an event stream handler so ``jobledger_stream_consumers{kind}`` counts the requests in it."""

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def counted(request: web.Request) -> web.StreamResponse:
            metrics = request.app.get(METRICS)
            if metrics is None:
                return await handler(request)
            gauge = metrics.consumers.labels(kind)
            gauge.inc()
            try:
                return await handler(request)
            finally:
                gauge.dec()

        return counted

    return decorate


async def follow_sequencer(metrics: Metrics, is_leader: Callable[[], bool]) -> None:
    """Keep ``jobledger_sequencer_leader`` current (a task for the process's life): in multiprocess mode a
    scrape reads the other workers' flags from their files, so each must write its own."""
    while True:
        metrics.leader.set(1 if is_leader() else 0)
        await asyncio.sleep(LEADER_REFRESH_SECONDS)
