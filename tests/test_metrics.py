"""``GET /metrics``: Prometheus text format, parsed with prometheus_client's own parser; no token needed.

Requests by method/route/status, latency histograms by route, events appended, stream consumers, the
sequencer flag and the stream's lag, each checked against what the test did or what the database says.
"""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from tests.harness import ServiceHarness
from tests.stream_support import eventually, wait_until_sequenced

JOBS_ROUTE = "/orvos/v1/jobs"
JOB_ROUTE = "/orvos/v1/jobs/{uuid}"


async def scrape(service: ServiceHarness) -> str:
    """The exposition, fetched without a token."""
    response = await service.session.get(service.base_url + "/metrics")
    async with response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        return await response.text()


def value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels`` (0 if there are none)."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def requests(text: str, method: str, route: str, status: int) -> float:
    """``jobledger_http_requests_total`` for one method, route and status."""
    return value(text, "jobledger_http_requests_total", method=method, route=route, status=str(status))


async def test_requests_latency_appends_and_lag(service: ServiceHarness) -> None:
    user = await service.client("user")
    dispatcher = await service.client("dispatcher")
    before = await scrape(service)
    uuids = [(await user.create_job(script_parameters={"n": n})).body["uuid"] for n in range(3)]
    assert (await user.get(f"jobs/{uuids[0]}")).status == 200
    assert (await user.get("jobs/zzzzz-8i9sb-000000000000000")).status == 404
    assert (await service.anonymous().get("jobs")).status == 401
    assert (await dispatcher.post(f"jobs/{uuids[1]}/lock")).status == 200
    assert (await user.get("/no/such/path/zzzzz-8i9sb-000000000000001")).status == 404
    after = await scrape(service)

    def delta(method: str, route: str, status: int) -> float:
        return requests(after, method, route, status) - requests(before, method, route, status)

    assert delta("POST", JOBS_ROUTE, 201) == 3
    assert delta("GET", JOB_ROUTE, 200) == 1
    assert delta("GET", JOB_ROUTE, 404) == 1
    assert delta("GET", JOBS_ROUTE, 401) == 1
    assert delta("POST", "/orvos/v1/jobs/{uuid}/lock", 200) == 1
    # Paths never become labels: an unknown path is "unmatched", whatever it contains.
    assert delta("GET", "unmatched", 404) == 1
    assert "zzzzz-8i9sb-000000000000001" not in after
    histogram = "jobledger_http_request_duration_seconds"
    for name in (f"{histogram}_count", f"{histogram}_bucket"):
        labels = {"method": "POST", "route": JOBS_ROUTE} | ({"le": "+Inf"} if name.endswith("bucket") else {})
        assert value(after, name, **labels) - value(before, name, **labels) == 3
    assert value(after, f"{histogram}_sum", method="POST", route=JOBS_ROUTE) > 0
    appended = value(after, "jobledger_events_appended_total") - value(before, "jobledger_events_appended_total")
    assert appended == 4  # three submitted, one locked

    head = await wait_until_sequenced(service.pool)
    assert head == await service.pool.fetchval("SELECT count(*) FROM events")

    async def lag_reported() -> bool:
        text = await scrape(service)
        return (
            value(text, "jobledger_stream_head_position") == head
            and value(text, "jobledger_sequencer_leader") == 1  # the only process on this database leads
        )

    await eventually(lag_reported, "/metrics shows the head and this process as the sequencer")
    text = await scrape(service)
    assert value(text, "jobledger_database_up") == 1
    assert value(text, "jobledger_stream_unsequenced_events") == 0
    assert value(text, "jobledger_stream_oldest_unsequenced_age_seconds") == 0
    assert value(text, "process_cpu_seconds_total") > 0  # the process collector, in single-process mode


async def test_open_stream_consumers_are_counted(service: ServiceHarness) -> None:
    auditor = await service.client("auditor")
    user = await service.client("user")
    headers = {"Authorization": f"Bearer {auditor.token}"}
    sse = await service.session.get(service.base_url + "/orvos/v1/events/stream", headers=headers)
    long_poll = asyncio.create_task(auditor.get("events", params={"wait": "30"}))
    try:
        assert sse.status == 200
        await sse.content.readline()  # the stream has started: its handler is running

        async def consumers(sse_count: int, long_poll_count: int) -> bool:
            text = await scrape(service)
            return (
                value(text, "jobledger_stream_consumers", kind="sse") == sse_count
                and value(text, "jobledger_stream_consumers", kind="long_poll") == long_poll_count
            )

        await eventually(lambda: consumers(1, 1), "one SSE and one long-poll consumer")
        sse.close()
        # A new event answers the long-poll and makes the SSE handler notice its client has gone.
        await user.create_job()
        assert (await long_poll).status == 200
        await eventually(lambda: consumers(0, 0), "no consumers left")
    finally:
        sse.close()
        long_poll.cancel()
