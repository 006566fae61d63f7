"""The fast canonical JSON (msgspec) is the reference's bytes exactly, and verify's single pass relies on it.

``float_free_canonical_json`` may only skip ``json.dumps`` for values without plain floats; floats read with
``decode_marking_floats`` must take the reference path. Both are checked against ``canonical_json`` on
arbitrary JSON, including the floats msgspec writes differently (``1e-7`` for ``1e-07``).
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.hashing import (
    UnhashableValue,
    canonical_json,
    decode_marking_floats,
    float_free_canonical_json,
    normalise,
    same_json,
)
from ledger.sequencer import sequence_pending
from ledger.verify import verify_ledger
from tests.test_store import create_job

_text = st.text(alphabet=st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), max_size=12)
_floats = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from([1e-07, 1e-05, -2.5e-300, 0.0001])
_scalars = st.none() | st.booleans() | st.integers() | _text
json_values = st.recursive(
    _scalars | _floats,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text, children, max_size=4),
    max_leaves=24,
)
float_free_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text, children, max_size=4),
    max_leaves=24,
)


def _normal(value: Any) -> Any:
    try:
        return normalise(value)
    except UnhashableValue:
        return None


@settings(max_examples=200, deadline=None)
@given(value=json_values)
def test_marked_floats_give_the_reference_bytes(value: Any) -> None:
    normal = _normal(value)
    marked = decode_marking_floats(canonical_json(normal))
    assert float_free_canonical_json(marked) == canonical_json(normal)


@settings(max_examples=200, deadline=None)
@given(value=float_free_values)
def test_float_free_values_give_the_reference_bytes(value: Any) -> None:
    assert float_free_canonical_json(value) == canonical_json(value)


@settings(max_examples=200, deadline=None)
@given(a=json_values, b=json_values)
def test_same_json_is_exact_equality(a: Any, b: Any) -> None:
    a, b = _normal(a), _normal(b)
    assert same_json(a, b) == (canonical_json(a) == canonical_json(b))
    assert same_json(a, json.loads(json.dumps(a)))
    assert same_json(decode_marking_floats(canonical_json(a)), a)


def test_same_json_tells_1_from_1_0_and_true() -> None:
    assert not same_json({"a": 1}, {"a": 1.0})
    assert not same_json([1], [True])
    assert same_json({"a": 1, "b": 2}, {"b": 2, "a": 1})


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=json_values)
async def test_verify_passes_events_holding_any_value(pool: asyncpg.Pool, store: Any, value: Any) -> None:
    """Events with small floats, big integers, odd strings verify (no false alarm from the fast path)."""
    await create_job(store, {"value": _normal(value)})
    async with pool.acquire() as conn:
        await sequence_pending(conn)
    report = await verify_ledger(pool)
    assert report.ok, report.findings


async def test_verify_names_a_changed_small_float(pool: asyncpg.Pool, store: Any) -> None:
    job, _ = await create_job(store, {"ratio": 1e-07})
    async with pool.acquire() as conn:
        await sequence_pending(conn)
        assert (await verify_ledger(pool)).ok
        await conn.execute("SET session_replication_role = replica")
        await conn.execute(
            "UPDATE events SET data = jsonb_set(data, '{script_parameters,ratio}', '1e-08') WHERE job_uuid = $1",
            job.uuid,
        )
        await conn.execute("RESET session_replication_role")
    report = await verify_ledger(pool)
    assert report.first is not None
    assert report.first.check == "job_chain"
    assert report.first.job_uuid == job.uuid
    assert "hashes to" in report.first.detail
