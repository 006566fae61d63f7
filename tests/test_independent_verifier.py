"""A verifier written from ``docs/ledger-format.md`` alone, run against real ``jobledger export`` output.

It imports nothing of the project: only ``hashlib``, ``json`` and ``base64``, and ``cryptography`` for the
Ed25519 check. If the service and the document ever disagree, this is where it shows. The service is driven
over HTTP only (the ``service`` and ``database_dsn`` fixtures), and the export comes from the CLI, run as a
separate process against the test's database.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

# ---------------------------------------------------------------------------------------------------------
# The verifier (docs/ledger-format.md sections 1, 3, 4, 7 and 8)
# ---------------------------------------------------------------------------------------------------------
GENESIS = "0" * 64
ENVELOPE = ("job_uuid", "version", "event_type", "data", "actor_user_uuid", "actor_client_uuid", "request_id",
            "recorded_at", "prev_hash")  # fmt: skip
EVENT_LINE = {*ENVELOPE, "kind", "position", "id", "hash", "chain_hash"}
LINK_LINE = {"kind", "position", "hash", "chain_hash"}
START_LINE = {"kind", "position", "chain_hash"}
CHECKPOINT = {"position", "chain_hash", "signed_at", "key_id", "signature"}
HEX64 = re.compile(r"[0-9a-f]{64}")
HEX16 = re.compile(r"[0-9a-f]{16}")
TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")


class Rejected(Exception):
    """The export or the checkpoint does not verify."""


def strict_loads(text: str) -> Any:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({key for key, _ in items}) != len(items):
            raise Rejected("duplicate key")
        return dict(items)

    def constant(name: str) -> Any:
        raise Rejected(f"{name} is not JSON")

    return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def is_int(value: Any, minimum: int) -> bool:
    return type(value) is int and value >= minimum


def is_hex64(value: Any) -> bool:
    return isinstance(value, str) and HEX64.fullmatch(value) is not None


def chain_step(previous: str, position: int, event_hash: str) -> str:
    return hashlib.sha256(f"{previous}:{position}:{event_hash}".encode()).hexdigest()


def check_checkpoint(cp: Any, raw_public_key: bytes) -> None:
    if not isinstance(cp, dict) or set(cp) != CHECKPOINT:
        raise Rejected("checkpoint fields")
    if not is_int(cp["position"], 0) or not is_hex64(cp["chain_hash"]):
        raise Rejected("checkpoint position or chain_hash")
    if not isinstance(cp["signed_at"], str) or not TIME.fullmatch(cp["signed_at"]):
        raise Rejected("checkpoint signed_at")
    if not isinstance(cp["key_id"], str) or not HEX16.fullmatch(cp["key_id"]):
        raise Rejected("checkpoint key_id")
    if cp["key_id"] != hashlib.sha256(raw_public_key).hexdigest()[:16]:
        raise Rejected("signed by another key")
    message = (
        f"jobledger-checkpoint/v1\n{cp['key_id']}\n{cp['position']}\n{cp['chain_hash']}\n{cp['signed_at']}\n"
    ).encode("ascii")
    try:
        signature = base64.b64decode(cp["signature"], validate=True)
    except ValueError:
        raise Rejected("signature is not base64") from None
    if len(signature) != 64:
        raise Rejected("signature length")
    try:
        Ed25519PublicKey.from_public_bytes(raw_public_key).verify(signature, message)
    except Exception:
        raise Rejected("bad signature") from None


def verify(lines: list[str], cp: Any, raw_public_key: bytes) -> int:
    """Verify an export against a checkpoint; return how many event lines it holds. Raises ``Rejected``."""
    check_checkpoint(cp, raw_public_key)
    position, chain, start = 0, GENESIS, 0
    jobs: dict[str, tuple[int, str, str]] = {}
    anchored = cp["position"] == 0 and cp["chain_hash"] == GENESIS
    events = 0
    for number, line in enumerate(lines, start=1):
        item = strict_loads(line)
        if not isinstance(item, dict):
            raise Rejected(f"line {number}: not an object")
        kind = item.get("kind")
        if kind == "jobledger#chainStart" and number == 1:
            if set(item) != START_LINE or not is_int(item["position"], 0) or not is_hex64(item["chain_hash"]):
                raise Rejected("chainStart")
            position = start = item["position"]
            chain = item["chain_hash"]
        elif kind == "jobledger#chainLink":
            if set(item) != LINK_LINE or not is_hex64(item["hash"]):
                raise Rejected(f"line {number}: link")
            event_hash = item["hash"]
        elif kind == "orvos#event":
            if set(item) != EVENT_LINE:
                raise Rejected(f"line {number}: fields")
            check_event_types(item, number)
            event_hash = hashlib.sha256(canonical_json({key: item[key] for key in ENVELOPE})).hexdigest()
            if event_hash != item["hash"]:
                raise Rejected(f"line {number}: altered event")
            check_job_link(jobs, item, number)
            events += 1
        else:
            raise Rejected(f"line {number}: kind {kind!r}")
        if kind != "jobledger#chainStart":
            if not is_int(item["position"], 1) or item["position"] != position + 1:
                raise Rejected(f"line {number}: position")
            if not is_hex64(item["chain_hash"]):
                raise Rejected(f"line {number}: chain_hash")
            position, chain = item["position"], chain_step(chain, item["position"], event_hash)
            if chain != item["chain_hash"]:
                raise Rejected(f"line {number}: chain")
        if position == cp["position"]:
            if chain != cp["chain_hash"]:
                raise Rejected("the chain does not end at the checkpoint")
            anchored = True
    if not anchored or cp["position"] < start:
        raise Rejected("the export does not reach the checkpoint")
    return events


def check_event_types(item: dict[str, Any], number: int) -> None:
    strings = ("job_uuid", "event_type", "actor_user_uuid", "request_id")
    if not all(isinstance(item[key], str) for key in strings):
        raise Rejected(f"line {number}: types")
    if not (item["actor_client_uuid"] is None or isinstance(item["actor_client_uuid"], str)):
        raise Rejected(f"line {number}: actor_client_uuid")
    if not is_int(item["id"], 1) or not is_int(item["version"], 1) or not isinstance(item["data"], dict):
        raise Rejected(f"line {number}: types")
    if not isinstance(item["recorded_at"], str) or not TIME.fullmatch(item["recorded_at"]):
        raise Rejected(f"line {number}: recorded_at")
    if not is_hex64(item["prev_hash"]) or not is_hex64(item["hash"]):
        raise Rejected(f"line {number}: hashes")


def check_job_link(jobs: dict[str, tuple[int, str, str]], item: dict[str, Any], number: int) -> None:
    last_version, last_hash, last_time = jobs.get(item["job_uuid"], (0, GENESIS, ""))
    if item["version"] != last_version + 1 or item["prev_hash"] != last_hash:
        raise Rejected(f"line {number}: job chain")
    if item["recorded_at"] < last_time:
        raise Rejected(f"line {number}: time went backwards")
    jobs[item["job_uuid"]] = (item["version"], item["hash"], item["recorded_at"])


# ---------------------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------------------
COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def test_the_documented_example_checks_out() -> None:
    """The numbers of docs/ledger-format.md section 8.3, recomputed."""
    c1 = chain_step(GENESIS, 1, "04468af9a41f5b71ec10675e5a7bdeace91e96b0dc79a5d5a036ceb2367bc721")
    c2 = chain_step(c1, 2, "5e06f4c5c29383fe87660d0db525ea4d1b345e5073fee93923f5dde92916314c")
    assert c1 == "63f8237dce2b66d3f67f3c3490c6484480c9d2bac3883141278bae36d67169ee"
    assert c2 == "e6994b131ec02231c7b9ca6bc453135d49ee83a9d742c901dbd423dd970fae27"
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    raw = base64.b64decode("A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=")
    assert key.public_key().public_bytes_raw() == raw
    checkpoint = {
        "position": 2,
        "chain_hash": c2,
        "signed_at": "2026-11-25T10:00:06.000000Z",
        "key_id": "56475aa75463474c",
        "signature": "Ud4lD28Qdg011pr+jzYbP04KGe8bhcJprTqeoElrhlXzGGXj3d0dXiqh518IzEen3gGRP7rUfNUSoKGFJD1wCA==",
    }
    check_checkpoint(checkpoint, raw)
    message = f"jobledger-checkpoint/v1\n56475aa75463474c\n2\n{c2}\n2026-11-25T10:00:06.000000Z\n".encode()
    assert len(message) == 136
    assert base64.b64encode(key.sign(message)).decode() == checkpoint["signature"]


async def _ok(pending: Any) -> Any:
    response = await pending
    assert response.status in (200, 201), (response.status, response.body)
    return response.body


async def _jobledger(*args: str, dsn: str, data: Path) -> str:
    """Run the CLI as another process against the test's database; return its standard output."""
    env = {**os.environ, "DATABASE_URL": dsn, "JOBLEDGER_DATA": str(data)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "api.cli", *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_an_exported_history_verifies_against_a_checkpoint(service: Any, database_dsn: str) -> None:
    user = await service.client("user")
    dispatcher = await service.client("dispatcher")
    auditor = await service.client("auditor")
    uuids = []
    for n, ending in enumerate(["finish", "cancel", "queued", "finish"]):
        params = {"n": n, "label": "café ☕", "ratio": 0.25, "big": 10**20, "nested": {"b": [1, 2.5, None], "a": True}}
        job = await _ok(user.create_job(script_parameters=params, priority=n))
        uuids.append(job["uuid"])
        if ending == "queued":
            continue
        await _ok(dispatcher.post(f"jobs/{job['uuid']}/lock"))
        await _ok(dispatcher.post(f"jobs/{job['uuid']}/start", json={"script_version": COMMIT}))
        if ending == "finish":
            await _ok(dispatcher.post(f"jobs/{job['uuid']}/finish", json={"success": n == 0, "log": "line\nline"}))
        else:
            await _ok(user.post(f"jobs/{job['uuid']}/cancel"))
    total = sum([len((await _ok(auditor.get(f"jobs/{uuid}/events")))["items"]) for uuid in uuids])
    # Long-poll until the service's sequencer has given the last event its position.
    page = await _ok(auditor.get("events", params={"after": str(total - 1), "wait": "10"}))
    assert page["head"] == total

    checkpoint = await _ok(auditor.get("ledger/checkpoint"))
    raw_key = base64.b64decode((await _ok(auditor.get("ledger/public_key")))["public_key"])
    data = service.settings.data_dir
    lines = (await _jobledger("export", dsn=database_dsn, data=data)).splitlines(keepends=True)
    assert len(lines) == total
    assert verify(lines, checkpoint, raw_key) == total
    # An export's event is exactly the history's item, plus its chain hash.
    history = (await _ok(auditor.get(f"jobs/{uuids[0]}/events")))["items"]
    exported = [json.loads(line) for line in lines if json.loads(line)["job_uuid"] == uuids[0]]
    assert [{k: v for k, v in item.items() if k != "chain_hash"} for item in exported] == history

    # The CLI's own checkpoint is signed by the same key (the data folder's) and verifies too.
    cli_checkpoint = strict_loads(await _jobledger("checkpoint", dsn=database_dsn, data=data))
    assert verify(lines, cli_checkpoint, raw_key) == total

    # One job's export: its events in full, the rest as links, from its first position to the head.
    job_lines = (await _jobledger("export", "--job", uuids[2], dsn=database_dsn, data=data)).splitlines(keepends=True)
    assert json.loads(job_lines[0])["kind"] == "jobledger#chainStart"
    assert verify(job_lines, checkpoint, raw_key) == 1  # job 2 was only submitted

    # The verifier is not vacuous: an edited line, a forged signature and a foreign key are all refused.
    edited = json.loads(lines[3])
    edited["request_id"] += "x"
    with pytest.raises(Rejected, match="line 4: altered event"):
        verify([*lines[:3], json.dumps(edited) + "\n", *lines[4:]], checkpoint, raw_key)
    forged = dict(checkpoint, signature=base64.b64encode(b"\x01" * 64).decode())
    with pytest.raises(Rejected, match="bad signature"):
        verify(lines, forged, raw_key)
    with pytest.raises(Rejected, match="another key"):
        verify(lines, checkpoint, Ed25519PrivateKey.generate().public_key().public_bytes_raw())
    with pytest.raises(Rejected, match="does not reach"):
        verify(lines[: checkpoint["position"] - 1], checkpoint, raw_key)
