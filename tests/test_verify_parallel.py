"""``verify_ledger`` split over worker processes finds exactly what the single pass finds.

It splits only a large ledger (``PARALLEL_MIN_POSITIONS``); here the threshold is lowered, so every
``verify_ledger`` call of ``tests.test_tamper`` (imported below, so its tests run again in this module) verifies
three ranges of jobs in three worker processes sharing one exported snapshot, and must name the same first
bad event of each check.
"""

from __future__ import annotations

import pytest

from ledger import verify as verify_module
from tests.provenance_support import Ledger
from tests.test_tamper import *  # noqa: F403 - the tamper tests, collected again under the fixture below


@pytest.fixture(autouse=True)
def _in_three_worker_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify_module, "PARALLEL_MIN_POSITIONS", 0)
    monkeypatch.setattr(verify_module, "_cpus", lambda: 3)


async def test_findings_in_several_ranges_merge_as_the_single_pass_finds_them(ledger: Ledger) -> None:
    """Breaks in every range at once: each check's first finding is the single pass's, in its order."""
    late, early = ledger.event(2, 2), ledger.event(0, 3)  # the last job's, the first job's
    await ledger.tamper(
        ("UPDATE events SET request_id = 'forged' WHERE id = $1", late["id"]),
        ("UPDATE events SET request_id = 'forged' WHERE id = $1", early["id"]),
        ("UPDATE jobs SET priority = 99 WHERE uuid = $1", ledger.jobs[1]),
        ("UPDATE jobs SET priority = 99 WHERE uuid = $1", ledger.jobs[2]),
    )
    async with ledger.pool.acquire() as conn, conn.transaction():
        bounds = await verify_module._ranges(conn, len(ledger.events), 3)
    assert len(bounds) >= 2, bounds  # every job is tampered with: the findings come from different workers
    single = await verify_module.verify_ledger(ledger.pool, workers=1)
    split = await verify_module.verify_ledger(ledger.pool, workers=3)
    assert [str(finding) for finding in split.findings] == [str(finding) for finding in single.findings]
    assert {finding.check for finding in single.findings} == {"job_chain", "global_chain", "read_model"}
    assert (split.positions, split.head_chain_hash, split.unsequenced) == (
        single.positions,
        single.head_chain_hash,
        single.unsequenced,
    )
