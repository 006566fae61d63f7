"""The auditing commands as a user runs them: ``jobledger verify``, ``export``, ``checkpoint``, ``public-key``."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg
import msgspec
import pytest

from ledger.checkpoint import sign_head
from tests.process_support import jobledger
from tests.provenance_support import Ledger, build_ledger


@pytest.fixture
async def ledger(pool: asyncpg.Pool, database_dsn: str, tmp_path: Path) -> Ledger:
    """Three jobs, 13 events, sequenced and verified."""
    return await build_ledger(pool, database_dsn, tmp_path / "data")


async def test_verify_export_checkpoint_and_offline_verify(ledger: Ledger, tmp_path: Path) -> None:
    data = ledger.key.path.parent
    status, out, err = await jobledger("verify", data=data, dsn=ledger.dsn)
    assert status == 0, err
    report = json.loads(out)
    assert report["ok"] is True
    assert report["head"] == 13

    status, out, err = await jobledger("checkpoint", data=data, dsn=ledger.dsn)
    assert status == 0, err
    checkpoint = tmp_path / "checkpoint.json"
    checkpoint.write_text(out)
    assert json.loads(out)["position"] == 13
    status, out, _ = await jobledger("public-key", data=data, dsn=None)
    assert status == 0
    key_json, key_pem = tmp_path / "key.json", tmp_path / "key.pem"
    key_json.write_text(out)
    key_pem.write_text(json.loads(out)["pem"])
    export = tmp_path / "export.ndjson"
    status, _, err = await jobledger("export", "-o", str(export), data=data, dsn=ledger.dsn)
    assert status == 0, err
    assert len(export.read_text().splitlines()) == 13

    # Against the database and a saved checkpoint.
    status, _, err = await jobledger(
        "verify", "--checkpoint", str(checkpoint), "--public-key", str(key_pem), data=data, dsn=ledger.dsn
    )
    assert status == 0, err

    # Offline: no DATABASE_URL, and an empty data folder that must stay empty (no embedded server started).
    elsewhere = tmp_path / "auditor"
    elsewhere.mkdir()
    for key in (key_json, key_pem):
        status, out, err = await jobledger(
            "verify", "--offline", str(export), "--checkpoint", str(checkpoint), "--public-key", str(key),
            data=elsewhere, dsn=None,
        )  # fmt: skip
        assert status == 0, err
        assert json.loads(out)["positions"] == 13
    assert list(elsewhere.iterdir()) == []

    lines = export.read_text().splitlines(keepends=True)
    lines[6] = lines[6].replace('"request_id":"req-', '"request_id":"req-X', 1)
    edited = tmp_path / "edited.ndjson"
    edited.write_text("".join(lines))
    status, _, err = await jobledger(
        "verify", "--offline", str(edited), "--checkpoint", str(checkpoint), "--public-key", str(key_pem),
        data=elsewhere, dsn=None,
    )  # fmt: skip
    assert status == 1
    event = ledger.events[6]
    assert "verification FAILED: export: line 7" in err
    assert f"position {event['position']}, job {event['job_uuid']}, version {event['version']}" in err
    assert f"event id {event['id']}" in err


async def test_verify_names_the_first_bad_event(ledger: Ledger) -> None:
    target = ledger.event(1, 2)
    await ledger.tamper(("UPDATE events SET request_id = 'forged' WHERE id = $1", target["id"]))
    status, out, err = await jobledger("verify", data=ledger.key.path.parent, dsn=ledger.dsn)
    assert status == 1
    assert json.loads(out)["ok"] is False
    assert (
        f"verification FAILED: job_chain: position {target['position']}, job {target['job_uuid']}, version 2, "
        f"event id {target['id']}: hash: stored hash" in err
    )


async def test_export_one_job_and_refusals(ledger: Ledger, tmp_path: Path) -> None:
    data = ledger.key.path.parent
    status, out, _ = await jobledger("export", "--job", ledger.jobs[2], data=data, dsn=ledger.dsn)
    assert status == 0
    kinds = [json.loads(line)["kind"] for line in out.splitlines()]
    assert kinds[0] == "jobledger#chainStart"
    assert kinds.count("orvos#event") == 4
    status, _, err = await jobledger("export", "--job", "zzzzz-8i9sb-000000000000000", data=data, dsn=ledger.dsn)
    assert status == 1
    assert "no sequenced events" in err
    status, _, err = await jobledger("verify", "--offline", "x.ndjson", data=tmp_path, dsn=None)
    assert status == 2
    assert "needs --checkpoint and --public-key" in err


async def test_offline_verify_notes_positions_after_the_checkpoint(ledger: Ledger, tmp_path: Path) -> None:
    data = ledger.key.path.parent
    chain_at_10 = await ledger.pool.fetchval("SELECT chain_hash FROM event_positions WHERE position = 10")
    older = sign_head(ledger.key, 10, chain_at_10)  # as if saved before the last three events
    checkpoint = tmp_path / "checkpoint.json"
    checkpoint.write_bytes(msgspec.json.encode(older))
    key = tmp_path / "key.pem"
    key.write_text(ledger.key.public_key_document()["pem"])
    export = tmp_path / "export.ndjson"
    assert (await jobledger("export", "-o", str(export), data=data, dsn=ledger.dsn))[0] == 0
    status, out, err = await jobledger(
        "verify", "--offline", str(export), "--checkpoint", str(checkpoint), "--public-key", str(key),
        data=tmp_path, dsn=None,
    )  # fmt: skip
    assert status == 0, err
    assert json.loads(out)["beyond_checkpoint"] == 3
    assert "the last 3 positions come after the checkpoint's position 10" in err
