"""Tampering with a real database, as its superuser with triggers off, is detected and the event is named.

Each test builds a small ledger through ``JobService`` in its own database, sequences it, checks that it
verifies, then changes rows the way someone with direct database access could (``session_replication_role
= replica`` switches off the append-only triggers and the foreign keys) and checks what ``verify_ledger``,
``verify_export`` and checkpoints say.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from ledger.checkpoint import make_checkpoint
from ledger.config import Settings
from ledger.hashing import GENESIS_HASH, chain_hash, event_hash
from ledger.rebuild import rebuild_read_model
from ledger.signing import load_or_create_signing_key
from ledger.verify import Finding, VerifyReport, verify_export, verify_ledger
from projections.timefmt import format_ts
from tests.provenance_support import Ledger, build_ledger

CONTENT = (
    "job_uuid, version, event_type, data, actor_user_uuid, actor_client_uuid, request_id, recorded_at, prev_hash, hash"
)


@pytest.fixture
async def ledger(pool: asyncpg.Pool, database_dsn: str, tmp_path: Path) -> Ledger:
    """Three jobs, 13 events, sequenced and verified."""
    return await build_ledger(pool, database_dsn, tmp_path / "data")


def names(finding: Finding | None, event: asyncpg.Record) -> None:
    """The finding names ``event``: its job, version, position and id."""
    assert finding is not None
    assert (finding.job_uuid, finding.version, finding.position, finding.event_id) == (
        event["job_uuid"],
        event["version"],
        event["position"],
        event["id"],
    ), str(finding)


def by_check(report: VerifyReport) -> dict[str, Finding]:
    return {finding.check: finding for finding in report.findings}


async def test_altered_data_is_named(ledger: Ledger) -> None:
    target = ledger.event(1, 1)  # job 1's submission
    await ledger.tamper(
        ("UPDATE events SET data = jsonb_set(data, '{script_name}', '\"evil.py\"') WHERE id = $1", target["id"])
    )
    report = await verify_ledger(ledger.pool)
    assert not report.ok
    assert report.first is not None
    assert report.first.check == "job_chain"
    names(report.first, target)
    assert "hashes to" in report.first.detail
    found = by_check(report)
    names(found["global_chain"], target)
    assert found["read_model"].job_uuid == target["job_uuid"]


async def test_altered_actor_is_named(ledger: Ledger) -> None:
    target = ledger.event(2, 3)  # a dispatcher's lock; pretend someone else did it
    await ledger.tamper(
        ("UPDATE events SET actor_user_uuid = 'zzzzz-tpzed-000000000000000' WHERE id = $1", target["id"])
    )
    report = await verify_ledger(ledger.pool)
    names(report.first, target)
    names(by_check(report)["global_chain"], target)


async def test_deleted_event_and_its_position_are_named(ledger: Ledger) -> None:
    target = ledger.event(0, 2)  # job 0's update, in the middle of its history
    await ledger.tamper(
        ("DELETE FROM event_positions WHERE event_id = $1", target["id"]),
        ("DELETE FROM events WHERE id = $1", target["id"]),
    )
    report = await verify_ledger(ledger.pool)
    found = by_check(report)
    after = ledger.event(0, 3)  # the job chain breaks at the event after the hole
    names(found["job_chain"], after)
    assert "expected version 2" in found["job_chain"].detail
    assert found["global_chain"].position == target["position"] + 1
    assert f"position {target['position']} is missing" in found["global_chain"].detail


async def test_deleted_event_row_behind_its_position_is_named(ledger: Ledger) -> None:
    target = ledger.event(1, 2)
    await ledger.tamper(("DELETE FROM events WHERE id = $1", target["id"]))
    found = by_check(await verify_ledger(ledger.pool))
    assert found["global_chain"].position == target["position"]
    assert found["global_chain"].event_id == target["id"]
    assert "does not exist" in found["global_chain"].detail
    assert found["job_chain"].job_uuid == target["job_uuid"]


async def test_deleted_newest_event_is_caught_only_by_a_checkpoint(ledger: Ledger) -> None:
    checkpoint = msgspec_dict(await make_checkpoint(ledger.pool, ledger.key))
    newest = ledger.events[-1]
    await ledger.tamper(
        ("DELETE FROM event_positions WHERE event_id = $1", newest["id"]),
        ("DELETE FROM events WHERE id = $1", newest["id"]),
    )
    await rebuild_read_model(ledger.pool)  # the tamperer tidies the read model too
    assert (await verify_ledger(ledger.pool)).ok, "internally consistent: chains alone cannot see a cut tail"
    report = await verify_ledger(ledger.pool, checkpoint, ledger.key.public_key)
    assert report.first is not None
    assert report.first.check == "checkpoint"
    assert "events were removed" in report.first.detail


@pytest.mark.parametrize(("first", "second"), [((0, 3), (1, 3)), ((2, 3), (2, 4))], ids=["two-jobs", "one-job"])
async def test_swapped_events_are_named(ledger: Ledger, first: tuple[int, int], second: tuple[int, int]) -> None:
    a, b = ledger.event(*first), ledger.event(*second)
    columns = CONTENT.split(", ")
    content = {row["id"]: row for row in await ledger.pool.fetch(f"SELECT id, {CONTENT} FROM events")}
    assignments = ", ".join(f"{name} = ${n}" for n, name in enumerate(columns, start=2))
    swap = f"UPDATE events SET {assignments} WHERE id = $1"

    def values(row: asyncpg.Record, version_offset: int = 0) -> list[Any]:
        return [row[name] + version_offset if name == "version" else row[name] for name in columns]

    await ledger.tamper(
        # Row a takes b's content parked at an unused version (out of the unique key's way), row b takes a's,
        # and then row a's version is put right.
        (swap, a["id"], *values(content[b["id"]], 1_000_000)),
        (swap, b["id"], *values(content[a["id"]])),
        ("UPDATE events SET version = version - 1000000 WHERE id = $1", a["id"]),
    )
    # Each job chain is intact (rows are found by job and version); the global chain is not.
    report = await verify_ledger(ledger.pool)
    found = by_check(report)
    assert "job_chain" not in found
    earlier = a if a["position"] < b["position"] else b
    finding = found["global_chain"]
    assert (finding.position, finding.event_id) == (earlier["position"], earlier["id"])
    assert finding.job_uuid is not None


async def test_rewritten_history_is_caught_by_an_earlier_checkpoint(ledger: Ledger) -> None:
    """A tamperer who recomputes every hash after the change fools the chains, but not a saved checkpoint."""
    checkpoint = msgspec_dict(await make_checkpoint(ledger.pool, ledger.key))
    target = ledger.event(0, 5)  # job 0's finish: claim another output
    await ledger.tamper(
        ("UPDATE events SET data = jsonb_set(data, '{output}', '\"forged\"') WHERE id = $1", target["id"])
    )
    await _rehash_everything(ledger)
    await rebuild_read_model(ledger.pool)
    assert (await verify_ledger(ledger.pool)).ok, "a consistent rewrite passes every internal check"
    report = await verify_ledger(ledger.pool, checkpoint, ledger.key.public_key)
    assert report.first is not None
    assert report.first.check == "checkpoint"
    assert "history was rewritten" in report.first.detail
    offline = verify_export(await ledger.export(), checkpoint, ledger.key.public_key)
    assert offline.first is not None
    assert offline.first.check == "checkpoint"
    assert offline.first.position == checkpoint["position"]


async def _rehash_everything(ledger: Ledger) -> None:
    """Recompute every event hash, prev_hash and chain hash from the (altered) content, as a forger would."""
    rows = await ledger.pool.fetch(
        "SELECT e.*, p.position FROM events e JOIN event_positions p ON p.event_id = e.id "
        "ORDER BY e.job_uuid, e.version"
    )
    statements: list[tuple[Any, ...]] = []
    hashes: dict[int, str] = {}
    previous: dict[str, str] = {}
    for row in rows:
        prev = previous.get(row["job_uuid"], GENESIS_HASH)
        digest = event_hash(
            job_uuid=row["job_uuid"],
            version=row["version"],
            event_type=row["event_type"],
            data=row["data"],
            actor_user_uuid=row["actor_user_uuid"],
            actor_client_uuid=row["actor_client_uuid"],
            request_id=row["request_id"],
            recorded_at=format_ts(row["recorded_at"]),
            prev_hash=prev,
        )
        previous[row["job_uuid"]] = hashes[row["position"]] = digest
        statements.append(("UPDATE events SET prev_hash = $2, hash = $3 WHERE id = $1", row["id"], prev, digest))
    chain = GENESIS_HASH
    for position in sorted(hashes):
        chain = chain_hash(chain, position, hashes[position])
        statements.append(("UPDATE event_positions SET chain_hash = $2 WHERE position = $1", position, chain))
    await ledger.tamper(*statements)


async def test_forged_checkpoint_signature_is_refused(ledger: Ledger) -> None:
    checkpoint = msgspec_dict(await make_checkpoint(ledger.pool, ledger.key))
    signature = bytearray(base64.b64decode(checkpoint["signature"]))
    signature[0] ^= 1
    forged = {**checkpoint, "signature": base64.b64encode(bytes(signature)).decode()}
    report = await verify_ledger(ledger.pool, forged, ledger.key.public_key)
    assert report.first is not None
    assert report.first.check == "checkpoint"
    assert "does not verify" in report.first.detail
    offline = verify_export(await ledger.export(), forged, ledger.key.public_key)
    assert offline.first is not None
    assert offline.first.check == "checkpoint"
    # A checkpoint signed by some other key is refused too, even though its signature is genuine.
    other = load_or_create_signing_key(Settings(data_dir=Path(ledger.key.path).parent / "other"))
    foreign = msgspec_dict(await make_checkpoint(ledger.pool, other))
    assert not verify_export(await ledger.export(), foreign, ledger.key.public_key).ok
    assert verify_export(await ledger.export(), checkpoint, ledger.key.public_key).ok


def _edit(lines: list[str], index: int, change: Any) -> list[str]:
    item = json.loads(lines[index])
    change(item)
    return [*lines[:index], json.dumps(item) + "\n", *lines[index + 1 :]]


@pytest.mark.parametrize(
    ("edit", "complaint"),
    [
        (lambda lines: _edit(lines, 4, lambda e: e["data"].update(priority=9)), "hashes to"),
        (lambda lines: _edit(lines, 4, lambda e: e.update(actor_user_uuid="zzzzz-tpzed-000000000000000")), "hashes to"),
        (lambda lines: _edit(lines, 4, lambda e: e.update(chain_hash="0" * 64)), "chain recomputes"),
        (lambda lines: _edit(lines, 4, lambda e: e.update(approved=True)), "unexpected ['approved']"),
        (lambda lines: _edit(lines, 4, lambda e: e.update(version=True)), "positive integer"),
        (lambda lines: [*lines[:4], *lines[5:]], "does not follow"),
        (lambda lines: [*lines[:4], lines[5], lines[4], *lines[6:]], "does not follow"),
        (lambda lines: [*lines[:4], lines[4].replace('{"', '{"hash":"x","', 1), *lines[5:]], "duplicate key"),
    ],
    ids=["data", "actor", "chain-hash", "extra-field", "bool-version", "dropped", "swapped", "duplicate-key"],
)
async def test_an_edited_export_line_is_named(ledger: Ledger, edit: Any, complaint: str) -> None:
    checkpoint = msgspec_dict(await make_checkpoint(ledger.pool, ledger.key))
    lines = await ledger.export()
    assert verify_export(lines, checkpoint, ledger.key.public_key).ok
    report = verify_export(edit(lines), checkpoint, ledger.key.public_key)
    assert report.first is not None, "the edit went unnoticed"
    assert report.first.check == "export"
    assert report.first.line == 5
    assert complaint in report.first.detail
    if complaint == "hashes to":
        names(report.first, ledger.events[4])


async def test_an_export_cut_short_of_the_checkpoint_fails(ledger: Ledger) -> None:
    checkpoint = msgspec_dict(await make_checkpoint(ledger.pool, ledger.key))
    lines = await ledger.export()
    report = verify_export(lines[:-1], checkpoint, ledger.key.public_key)
    assert report.first is not None
    assert "before the checkpoint's position" in report.first.detail


def msgspec_dict(struct: Any) -> dict[str, Any]:
    """A checkpoint as the JSON object a client would have saved."""
    import msgspec

    return json.loads(msgspec.json.encode(struct))
