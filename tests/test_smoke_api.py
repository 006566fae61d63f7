"""A first end-to-end pass over HTTP: create, get, lifecycle."""

from __future__ import annotations

from tests.harness import ServiceHarness


async def test_create_get_and_lifecycle(service: ServiceHarness) -> None:
    user = await service.client("user")
    dispatcher = await service.client("dispatcher")
    created = await user.create_job()
    assert created.status == 201, created.body
    uuid = created.body["uuid"]
    assert created.headers["Location"] == f"/orvos/v1/jobs/{uuid}"
    got = await user.get(f"jobs/{uuid}")
    assert got.status == 200
    assert got.body == created.body
    assert got.headers["ETag"] == f'"{created.body["etag"]}"'
    locked = await dispatcher.post(f"jobs/{uuid}/lock")
    assert locked.status == 200, locked.body
    assert locked.body["is_locked_by"] == dispatcher.user_uuid
    started = await dispatcher.post(f"jobs/{uuid}/start", json={"script_version": "a" * 40})
    assert started.status == 200, started.body
    assert started.body["state"] == "Running"
    finished = await dispatcher.post(f"jobs/{uuid}/finish", json={"success": True, "output": "out", "log": "log"})
    assert finished.body["state"] == "Complete"
    assert finished.body["success"] is True
