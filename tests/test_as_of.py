"""GET jobs/{uuid}?as_of_version=N and ?as_of=T against what GET jobs/{uuid} said at the time.

A random workload of lifecycle commands runs over HTTP; after every write that succeeded, the job is read back
and recorded under its version. Afterwards every version, and every event's ``recorded_at``, must give back
exactly what was recorded then: the same fold of the same events, down to the etag.
"""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

import pytest

from projections.timefmt import format_ts, parse_ts
from tests.harness import ApiClient, Response, ServiceHarness
from tests.provenance_support import COMMIT, ok, seeded

SCRIPTS = ("a.py", "b.py")


class Workload:
    """Random lifecycle commands; every job state the service reports after a write, by (job, version)."""

    def __init__(self, rng: random.Random, users: list[ApiClient], dispatchers: list[ApiClient]) -> None:
        self.rng = rng
        self.users = users
        self.dispatchers = dispatchers
        self.owner: dict[str, ApiClient] = {}
        self.seen: dict[tuple[str, int], dict[str, Any]] = {}

    async def record(self, client: ApiClient, uuid: str) -> None:
        got = await ok(client.get(f"jobs/{uuid}"))
        key = (uuid, got.body["version"])
        assert self.seen.get(key, got.body) == got.body, "one version, two states"
        self.seen[key] = got.body

    async def step(self) -> None:
        rng = self.rng
        if not self.owner or rng.random() < 0.15:
            await self.create(rng.choice(self.users))
            return
        uuid = rng.choice(sorted(self.owner))
        owner = self.owner[uuid]
        dispatcher = rng.choice(self.dispatchers)
        action = rng.choice(["update", "lock", "unlock", "start", "cancel", "finish", "reuse"])
        response: Response
        if action == "update":
            body = {"priority": rng.randint(0, 9)}
            if rng.random() < 0.5:
                body["script_parameters"] = {"n": rng.randint(0, 3)}
            response = await owner.request("PATCH", f"jobs/{uuid}", json={"job": body})
        elif action == "start":
            response = await dispatcher.post(f"jobs/{uuid}/start", json={"script_version": COMMIT})
        elif action == "finish":
            response = await dispatcher.post(f"jobs/{uuid}/finish", json={"success": rng.random() < 0.7, "output": "o"})
        elif action == "cancel":
            response = await rng.choice([owner, dispatcher]).post(f"jobs/{uuid}/cancel")
        elif action == "reuse":
            job = (await ok(owner.get(f"jobs/{uuid}"))).body
            response = await self.submit(owner, job["script_name"], job["script_parameters"], reuse=True)
            uuid = response.body.get("uuid", uuid) if response.status in (200, 201) else uuid
        else:  # lock, unlock
            response = await dispatcher.post(f"jobs/{uuid}/{action}")
        if response.status in (200, 201):
            await self.record(owner, uuid)
        else:
            assert response.status == 422, (action, response.status, response.body)

    async def create(self, user: ApiClient) -> None:
        created = await self.submit(user, self.rng.choice(SCRIPTS), {"n": self.rng.randint(0, 3)}, reuse=False)
        assert created.status == 201, created.body
        self.owner[created.body["uuid"]] = user
        await self.record(user, created.body["uuid"])

    async def submit(self, user: ApiClient, script: str, parameters: dict[str, Any], *, reuse: bool) -> Response:
        job = {"script_name": script, "script_version": "main", "script_parameters": parameters}
        response = await user.post("jobs", json={"job": job}, params={"allow_duplicate": str(not reuse).lower()})
        if response.status == 201:
            self.owner[response.body["uuid"]] = user
        return response


@pytest.mark.parametrize("seed", [1, 2])
async def test_as_of_equals_what_the_service_said_then(service: ServiceHarness, seed: int) -> None:
    users = [await service.client("user") for _ in range(2)]
    dispatchers = [await service.client("dispatcher") for _ in range(2)]
    workload = Workload(seeded(seed), users, dispatchers)
    for _ in range(70):
        await workload.step()
    auditor = await service.client("auditor")

    versions: dict[str, int] = {}
    for (uuid, version), expected in sorted(workload.seen.items()):
        versions[uuid] = max(versions.get(uuid, 0), version)
        got = await ok(auditor.get(f"jobs/{uuid}", params={"as_of_version": str(version)}))
        assert got.body == expected, (uuid, version)
        assert got.headers["ETag"] == f'"{expected["etag"]}"'
    for uuid, latest in versions.items():
        assert sorted(v for (u, v) in workload.seen if u == uuid) == list(range(1, latest + 1)), "every version seen"

        history = (await ok(auditor.get(f"jobs/{uuid}/events"))).body["items"]
        assert len(history) == latest
        for event in history:
            moment = event["recorded_at"]
            # The state as of T is after the last event at or before T (several may share a microsecond).
            last = max(e["version"] for e in history if e["recorded_at"] <= moment)
            got = await ok(auditor.get(f"jobs/{uuid}", params={"as_of": moment}))
            assert got.body == workload.seen[(uuid, last)], (uuid, moment)
        first = parse_ts(history[0]["recorded_at"])
        before = await auditor.get(f"jobs/{uuid}", params={"as_of": format_ts(first - timedelta(microseconds=1))})
        assert before.status == 404, "the job did not exist yet"
        in_offset = (first + timedelta(hours=2)).astimezone().isoformat()  # any RFC 3339 offset will do
        assert (await auditor.get(f"jobs/{uuid}", params={"as_of": in_offset})).status == 200


async def test_as_of_refuses_bad_values(service: ServiceHarness) -> None:
    user = await service.client("user")
    uuid = (await user.create_job()).body["uuid"]
    await ok(user.request("PATCH", f"jobs/{uuid}", json={"job": {"priority": 4}}))
    for value in ("0", "-1", "abc", "1.5", "", "99999999999999999999"):
        response = await user.get(f"jobs/{uuid}", params={"as_of_version": value})
        assert response.status == 422, (value, response.body)
    beyond = await user.get(f"jobs/{uuid}", params={"as_of_version": "3"})
    assert beyond.status == 404
    assert "latest is 2" in beyond.errors[0]
    for value in ("yesterday", "2026-01-01T00:00:00", "", "2026-13-01T00:00:00Z"):
        response = await user.get(f"jobs/{uuid}", params={"as_of": value})
        assert response.status == 422, (value, response.body)
    both = await user.get(f"jobs/{uuid}", params={"as_of_version": "1", "as_of": "2030-01-01T00:00:00Z"})
    assert both.status == 422
    assert (await user.get(f"jobs/{uuid}", params={"as_of": "1970-01-01T00:00:00Z"})).status == 404
    future = await ok(user.get(f"jobs/{uuid}", params={"as_of": "2999-01-01T00:00:00Z"}))
    assert future.body == (await ok(user.get(f"jobs/{uuid}"))).body  # the future: the latest state
    assert (await user.get(f"jobs/{uuid}", params={"as_of_version": "1"})).body["priority"] == 0
