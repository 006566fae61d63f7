"""A job's history (GET jobs/{uuid}/events), checkpoints and the signing key, over HTTP on a real database."""

from __future__ import annotations

import base64
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ledger.checkpoint import InvalidCheckpoint, checkpoint_message, verify_checkpoint
from ledger.config import Settings
from ledger.hashing import GENESIS_HASH
from ledger.signing import KEY_FILE_NAME, SigningKeyError, load_or_create_signing_key, parse_public_key
from tests.harness import ServiceHarness
from tests.provenance_support import COMMIT, lifecycle, ok, sequence_all

EVENT_FIELDS = {
    "kind", "position", "id", "job_uuid", "version", "event_type", "data", "actor_user_uuid", "actor_client_uuid",
    "request_id", "recorded_at", "prev_hash", "hash",
}  # fmt: skip


async def test_history_is_in_version_order_with_every_field(service: ServiceHarness) -> None:
    user = await service.client("user")
    dispatcher = await service.client("dispatcher")
    async with service.pool.acquire() as blocker, blocker.transaction():
        # An open transaction holding an id keeps every later event above the sequencer's horizon, so these
        # stay unsequenced until it ends: the history shows them with position null.
        await blocker.fetchval("SELECT pg_current_xact_id()")
        created = await user.create_job(priority=3)
        uuid = created.body["uuid"]
        patch = {"job": {"priority": 5}}
        await ok(user.request("PATCH", f"jobs/{uuid}", json=patch, headers={"X-Request-Id": "req-a"}))
        await ok(dispatcher.post(f"jobs/{uuid}/lock", headers={"X-Request-Id": "req-b"}))
        await ok(dispatcher.post(f"jobs/{uuid}/start", json={"script_version": COMMIT}))
        await ok(dispatcher.post(f"jobs/{uuid}/finish", json={"success": False}))
        before = await ok(user.get(f"jobs/{uuid}/events"))
        assert before.body["kind"] == "orvos#eventList"
        assert [item["position"] for item in before.body["items"]] == [None] * 5

    head = await sequence_all(service.pool)
    history = (await ok(user.get(f"jobs/{uuid}/events"))).body
    items = history["items"]
    assert history["head"] == head
    assert [item["event_type"] for item in items] == ["submitted", "updated", "locked", "started", "finished"]
    assert [item["version"] for item in items] == [1, 2, 3, 4, 5]
    for item in items:
        assert set(item) == EVENT_FIELDS
        assert item["kind"] == "orvos#event"
        assert item["job_uuid"] == uuid
        assert isinstance(item["position"], int)
        assert item["actor_client_uuid"], "every event names the API client of the token"
    positions = [item["position"] for item in items]
    assert positions == sorted(positions)
    assert [item["prev_hash"] for item in items] == [GENESIS_HASH] + [item["hash"] for item in items[:-1]]
    assert [item["actor_user_uuid"] for item in items] == [user.user_uuid] * 2 + [dispatcher.user_uuid] * 3
    assert [item["request_id"] for item in items[1:3]] == ["req-a", "req-b"]
    assert items[0]["data"]["priority"] == 3
    assert items[1]["data"] == {"priority": 5}
    times = [item["recorded_at"] for item in items]
    assert times == sorted(times)
    final = (await ok(user.get(f"jobs/{uuid}"))).body
    assert final["created_at"] == times[0]
    assert final["modified_at"] == times[-1]


async def test_history_is_404_unless_the_caller_may_read_the_job(service: ServiceHarness) -> None:
    owner = await service.client("user")
    other = await service.client("user")
    auditor = await service.client("auditor")
    uuid = (await owner.create_job()).body["uuid"]
    assert (await other.get(f"jobs/{uuid}/events")).status == 404
    assert (await other.get(f"jobs/{uuid}", params={"as_of_version": "1"})).status == 404
    assert (await auditor.get(f"jobs/{uuid}/events")).status == 200
    missing = uuid[:-1] + ("1" if uuid.endswith("0") else "0")  # well-formed, but no such job
    assert (await owner.get(f"jobs/{missing}/events")).status == 404
    assert (await owner.get("jobs/not-a-uuid/events")).status == 404
    assert (await service.anonymous().get(f"jobs/{uuid}/events")).status == 401


async def test_checkpoint_verifies_with_the_public_key(service: ServiceHarness) -> None:
    user = await service.client("user")
    dispatcher = await service.client("dispatcher")
    auditor = await service.client("auditor")
    empty = (await ok(auditor.get("ledger/checkpoint"))).body
    assert (empty["position"], empty["chain_hash"]) == (0, GENESIS_HASH)
    for _ in range(3):
        await lifecycle(user, dispatcher)
    head = await sequence_all(service.pool)

    for client in (auditor, user, dispatcher, service.admin):  # every role may read checkpoints
        assert (await client.get("ledger/checkpoint")).status == 200
    checkpoint = (await ok(auditor.get("ledger/checkpoint"))).body
    document = (await ok(auditor.get("ledger/public_key"))).body
    assert set(checkpoint) == {"position", "chain_hash", "signed_at", "key_id", "signature"}
    assert checkpoint["position"] == head
    stored = await service.pool.fetchval("SELECT chain_hash FROM event_positions WHERE position = $1", head)
    assert checkpoint["chain_hash"] == stored
    assert checkpoint["key_id"] == document["key_id"]

    # The documented message, verified with nothing but cryptography, from both encodings of the key.
    message = (
        f"jobledger-checkpoint/v1\n{checkpoint['key_id']}\n{checkpoint['position']}\n"
        f"{checkpoint['chain_hash']}\n{checkpoint['signed_at']}\n"
    ).encode()
    signature = base64.b64decode(checkpoint["signature"])
    Ed25519PublicKey.from_public_bytes(base64.b64decode(document["public_key"])).verify(signature, message)
    pem_key = serialization.load_pem_public_key(document["pem"].encode())
    assert isinstance(pem_key, Ed25519PublicKey)
    pem_key.verify(signature, message)
    assert verify_checkpoint(checkpoint, parse_public_key(document["pem"])).position == head

    assert (await service.anonymous().get("ledger/checkpoint")).status == 401


@pytest.mark.parametrize(
    ("field", "value", "complaint"),
    [
        ("position", True, "position"),
        ("position", 10**6, "does not verify"),
        ("chain_hash", "f" * 64, "does not verify"),
        ("chain_hash", "a" * 64 + "\n", "chain_hash"),
        ("signed_at", "2030-01-01T00:00:00.000000Z", "does not verify"),
        ("key_id", "0" * 16, "signed by key"),
        ("signature", base64.b64encode(b"\0" * 64).decode(), "does not verify"),
        ("signature", "not base64!", "base64"),
        ("extra", 1, "unexpected"),
    ],
)
def test_a_forged_checkpoint_is_refused(tmp_path: Path, field: str, value: object, complaint: str) -> None:
    key = load_or_create_signing_key(Settings(data_dir=tmp_path))
    message = checkpoint_message(
        key_id=key.key_id, position=7, chain_hash="c" * 64, signed_at="2026-11-25T10:00:00.000000Z"
    )
    genuine = {
        "position": 7,
        "chain_hash": "c" * 64,
        "signed_at": "2026-11-25T10:00:00.000000Z",
        "key_id": key.key_id,
        "signature": base64.b64encode(key.sign(message)).decode(),
    }
    assert verify_checkpoint(genuine, key.public_key).position == 7
    forged = {**genuine, field: value}
    with pytest.raises(InvalidCheckpoint, match=complaint):
        verify_checkpoint(forged, key.public_key)


def test_the_key_is_made_once_private_and_shared_by_racing_starts(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    with ThreadPoolExecutor(max_workers=8) as pool:
        keys = list(pool.map(lambda _: load_or_create_signing_key(settings), range(16)))
    assert len({key.key_id for key in keys}) == 1
    path = tmp_path / "data" / KEY_FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == [KEY_FILE_NAME]  # no temporary files left behind
    assert load_or_create_signing_key(settings).key_id == keys[0].key_id  # a restart keeps the key


def test_a_configured_key_is_used_and_must_exist(tmp_path: Path) -> None:
    path = tmp_path / "given.pem"
    path.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    os.chmod(path, 0o600)
    settings = Settings.from_env({"JOBLEDGER_SIGNING_KEY": str(path), "JOBLEDGER_DATA": str(tmp_path / "data")})
    assert settings.signing_key_path == path
    assert load_or_create_signing_key(settings).path == path
    assert not (tmp_path / "data").exists()  # nothing made in the data folder
    with pytest.raises(SigningKeyError, match="cannot read"):
        load_or_create_signing_key(Settings(signing_key_path=tmp_path / "missing.pem"))
    path.write_text("not a key")
    with pytest.raises(SigningKeyError, match="not an unencrypted PEM"):
        load_or_create_signing_key(settings)
