"""Properties of the pure Job fold: legal histories keep the invariants, illegal events name their rule.

A Hypothesis state machine drives one job through random *legal* commands (submit, update, lock, unlock,
start, cancel, finish, reused) by random actors at non-decreasing times, and also throws arbitrary events
at it, which must be accepted or refused exactly as the rules of CONTRACT §3 say. Every rule that
``projections/job.py`` can raise is also hit by a hand-written scenario.
"""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import projections.job
from ledger.hashing import canonical_json
from projections.job import (
    JOB_ATTRIBUTES,
    TERMINAL_STATES,
    Cancelled,
    Event,
    Finished,
    IllegalTransition,
    Job,
    Locked,
    Recorded,
    Reused,
    Started,
    Submitted,
    Unlocked,
    Updated,
    apply,
    compute_etag,
    derive_state,
    fold,
    is_commit,
)
from projections.timefmt import format_ts

JOB: Final = "zzzzz-8i9sb-000000000000001"
OTHER_JOB: Final = "zzzzz-8i9sb-000000000000002"
OWNERS: Final = ("zzzzz-tpzed-0000000000owner1", "zzzzz-tpzed-0000000000owner2")
DISPATCHERS: Final = ("zzzzz-tpzed-000000000disp001", "zzzzz-tpzed-000000000disp002")
ADMIN: Final = "zzzzz-tpzed-00000000000admin"
ACTORS: Final = (*OWNERS, *DISPATCHERS, ADMIN)
CLIENTS: Final = (None, "zzzzz-ozdt8-000000000000001")
COMMIT: Final = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT: Final = "fedcba9876543210fedcba9876543210fedcba98"
EPOCH: Final = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
_NOT_ETAG: Final = tuple(name for name in JOB_ATTRIBUTES if name != "etag")

# Every rule name the fold can raise, read from its source, so a new rule without a test fails here.
RULES_IN_SOURCE: Final = frozenset(re.findall(r'_refuse\(\s*"([a-z-]+)"', inspect.getsource(projections.job)))


# ---------------------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------------------
actors = st.sampled_from(ACTORS)
clients = st.sampled_from(CLIENTS)
versions = st.sampled_from(("main", "v1.2", COMMIT, OTHER_COMMIT))
small_json = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=3))
parameters = st.dictionaries(st.sampled_from(("input", "n", "flag")), small_json, max_size=3)
limits = st.dictionaries(st.sampled_from(("min_nodes", "max_nodes")), st.integers(0, 4), max_size=2)
priorities = st.integers(-2, 5)
submit_ids = st.one_of(st.none(), st.sampled_from(("s1", "s2")))


@st.composite
def updates(draw: st.DrawFn, priority_only: bool) -> Updated:
    """An ``Updated`` event; with ``priority_only`` it changes nothing but the priority."""
    if priority_only:
        return Updated(priority=draw(priorities))
    fields = {
        "priority": priorities,
        "resource_limits": limits,
        "script_name": st.sampled_from(("hash", "sort")),
        "script_version": versions,
        "script_parameters": parameters,
    }
    chosen = draw(st.sets(st.sampled_from(sorted(fields)), min_size=1))
    return Updated(**{name: draw(fields[name]) for name in chosen})


def any_event() -> st.SearchStrategy[Event]:
    """Any event at all, legal or not."""
    return st.one_of(
        st.builds(
            Submitted,
            owner_uuid=st.sampled_from(OWNERS),
            script_name=st.just("hash"),
            script_version=versions,
            script_parameters=parameters,
        ),
        updates(priority_only=False),
        st.just(Locked()),
        st.just(Unlocked()),
        st.builds(Started, script_version=st.one_of(st.none(), versions)),
        st.just(Cancelled()),
        st.builds(Finished, success=st.booleans(), output=st.one_of(st.none(), st.text(max_size=3))),
        st.builds(Reused, submit_id=submit_ids),
    )


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------
def at(microseconds: int) -> str:
    """The timestamp ``microseconds`` after the test epoch."""
    return format_ts(EPOCH + timedelta(microseconds=microseconds))


def record(
    event: Event, *, version: int, actor: str, when: int, job_uuid: str = JOB, client: str | None = None
) -> Recorded:
    """A recorded event of the test job."""
    return Recorded(
        job_uuid=job_uuid,
        version=version,
        event=event,
        actor_user_uuid=actor,
        actor_client_uuid=client,
        request_id=f"req-{version}",
        recorded_at=at(when),
    )


def snapshot(job: Job | None) -> bytes:
    """Every attribute of ``job`` as bytes, to prove it did not change."""
    return msgspec.json.encode(job, order="sorted")


def content(job: Job) -> bytes:
    """The attributes the etag must track (all but the etag itself), compared exactly (``True`` is not 1)."""
    return canonical_json(msgspec.to_builtins({name: getattr(job, name) for name in _NOT_ETAG}))


def expected_rule(job: Job | None, rec: Recorded) -> str | None:
    """The rule of CONTRACT §3 that ``rec`` breaks when applied to ``job`` (None: it is legal).

    An independent restatement of the rules, in the order the fold checks them.
    """
    event = rec.event
    if job is None:
        if not isinstance(event, Submitted):
            return "job-must-exist"
        return None if rec.version == 1 else "versions-consecutive"
    if rec.job_uuid != job.uuid:
        return "same-job"
    if rec.version != job.version + 1:
        return "versions-consecutive"
    if rec.recorded_at < job.modified_at:
        return "time-monotonic"
    return _event_rule(job, rec.actor_user_uuid, event)


def _event_rule(job: Job, actor: str, event: Event) -> str | None:
    state, holder, terminal = job.state, job.is_locked_by, job.state in TERMINAL_STATES
    queued_unlocked = state == "Queued" and holder is None
    match event:
        case Submitted():
            return "submit-once"
        case Updated():
            if terminal:
                return "update-before-finish"
            others = [name for name in event.__struct_fields__ if name != "priority" and hasattr_set(event, name)]
            return "update-while-queued-unlocked" if others and not queued_unlocked else None
        case Locked():
            return "lock-needs-queued" if state != "Queued" else "lock-once" if holder is not None else None
        case Unlocked():
            return "unlock-needs-lock" if holder is None else "unlock-before-start" if state != "Queued" else None
        case Started():
            version = event.script_version if event.script_version is not None else job.script_version
            checks = [
                (state != "Queued", "start-needs-queued"),
                (holder is None, "start-needs-lock"),
                (holder != actor, "start-by-lock-holder"),
                (not is_commit(version), "start-needs-commit"),
            ]
            return next((name for failed, name in checks if failed), None)
        case Cancelled():
            return "cancel-once" if state == "Cancelled" else "cancel-before-finish" if terminal else None
        case Finished():
            checks = [
                (job.started_at is None, "finish-needs-start"),
                (job.finished_at is not None, "finish-once"),
                (holder != actor, "finish-by-lock-holder"),
            ]
            return next((name for failed, name in checks if failed), None)
        case Reused():
            return None if state in ("Queued", "Running", "Complete") else "reuse-needs-unfailed"
    raise AssertionError(f"unknown event {event!r}")


def hasattr_set(event: Updated, name: str) -> bool:
    """Whether ``name`` is present in an ``Updated`` event."""
    return getattr(event, name) is not msgspec.UNSET


# ---------------------------------------------------------------------------------------------------------
# The state machine
# ---------------------------------------------------------------------------------------------------------
class JobLifecycle(RuleBasedStateMachine):
    """One job, driven through random legal commands and arbitrary attempts."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[Recorded] = []
        self.job: Job | None = None
        self.clock = 0
        self.was_cancelled = False

    # ---- plumbing ----------------------------------------------------------------------------------------
    @property
    def current(self) -> Job:
        assert self.job is not None
        return self.job

    def next_record(self, event: Event, actor: str, client: str | None, step: int) -> Recorded:
        self.clock += step
        return record(event, version=len(self.records) + 1, actor=actor, when=self.clock, client=client)

    def accept(self, rec: Recorded) -> Job:
        """Apply a legal event, checking that ``apply`` leaves its input alone and the etag tracks changes."""
        before, frozen = self.job, snapshot(self.job)
        after = apply(before, rec)
        assert snapshot(before) == frozen, "apply mutated its input"
        if before is not None:
            assert (content(before) != content(after)) == (before.etag != after.etag)
        self.records.append(rec)
        self.job = after
        return after

    def legal(self, event: Event, actor: str, client: str | None, step: int) -> Job:
        rec = self.next_record(event, actor, client, step)
        assert expected_rule(self.job, rec) is None, "the test generated an illegal command"
        return self.accept(rec)

    # ---- legal commands ----------------------------------------------------------------------------------
    @initialize(
        owner=st.sampled_from(OWNERS),
        client=clients,
        name=st.sampled_from(("hash", "sort")),
        version=versions,
        params=parameters,
        priority=priorities,
        limits=limits,
        submit_id=submit_ids,
    )
    def submit(
        self,
        owner: str,
        client: str | None,
        name: str,
        version: str,
        params: dict[str, Any],
        priority: int,
        limits: dict[str, int],
        submit_id: str | None,
    ) -> None:
        event = Submitted(
            owner_uuid=owner,
            script_name=name,
            script_version=version,
            script_parameters=params,
            priority=priority,
            resource_limits=limits,
            submit_id=submit_id,
        )
        job = self.legal(event, owner, client, 0)
        assert (job.state, job.version, job.supplied_script_version) == ("Queued", 1, version)

    @precondition(lambda self: self.current.state not in TERMINAL_STATES)
    @rule(data=st.data(), actor=actors, client=clients, step=st.integers(0, 10**6))
    def update(self, data: st.DataObject, actor: str, client: str | None, step: int) -> None:
        queued_unlocked = self.current.state == "Queued" and self.current.is_locked_by is None
        event = data.draw(updates(priority_only=not queued_unlocked))
        job = self.legal(event, actor, client, step)
        assert job.modified_at == self.records[-1].recorded_at

    @precondition(lambda self: self.current.state == "Queued" and self.current.is_locked_by is None)
    @rule(dispatcher=st.sampled_from(DISPATCHERS), client=clients, step=st.integers(0, 10**6))
    def lock(self, dispatcher: str, client: str | None, step: int) -> None:
        assert self.legal(Locked(), dispatcher, client, step).is_locked_by == dispatcher

    @precondition(lambda self: self.current.state == "Queued" and self.current.is_locked_by is not None)
    @rule(client=clients, step=st.integers(0, 10**6))
    def unlock(self, client: str | None, step: int) -> None:
        assert self.legal(Unlocked(), self.current.is_locked_by or "", client, step).is_locked_by is None

    @precondition(lambda self: self.current.state == "Queued" and self.current.is_locked_by is not None)
    @rule(data=st.data(), client=clients, step=st.integers(0, 10**6))
    def start(self, data: st.DataObject, client: str | None, step: int) -> None:
        pinned = is_commit(self.current.script_version)
        supplied = data.draw(st.sampled_from((None, COMMIT)) if pinned else st.sampled_from((COMMIT, OTHER_COMMIT)))
        job = self.legal(Started(script_version=supplied), self.current.is_locked_by or "", client, step)
        assert job.state == "Running"
        assert job.running
        assert is_commit(job.script_version)

    @precondition(lambda self: self.current.state in ("Queued", "Running"))
    @rule(actor=actors, client=clients, step=st.integers(0, 10**6), now=st.integers(0, 3))
    def cancel(self, actor: str, client: str | None, step: int, now: int) -> None:
        if now:
            return  # a cancel ends the interesting part of a history: make it rarer than the other commands
        job = self.legal(Cancelled(), actor, client, step)
        assert (job.cancelled_by_user, job.cancelled_by_client) == (actor, client)
        self.was_cancelled = True

    @precondition(lambda self: self.current.started_at is not None and self.current.finished_at is None)
    @rule(success=st.booleans(), output=st.one_of(st.none(), st.text(max_size=5)), step=st.integers(0, 10**6))
    def finish(self, success: bool, output: str | None, step: int) -> None:
        job = self.legal(Finished(success=success, output=output), self.current.is_locked_by or "", None, step)
        assert job.success is success
        assert not job.running

    @precondition(lambda self: self.current.state in ("Queued", "Running", "Complete"))
    @rule(actor=actors, client=clients, submit_id=submit_ids, step=st.integers(0, 10**6))
    def reuse(self, actor: str, client: str | None, submit_id: str | None, step: int) -> None:
        before = self.current
        job = self.legal(Reused(submit_id=submit_id), actor, client, step)
        assert job.etag != before.etag, "a reuse changes the version, so the representation and its etag"

    # ---- arbitrary attempts ------------------------------------------------------------------------------
    @rule(
        event=any_event(),
        actor=actors,
        step=st.integers(0, 10**6) | st.integers(-(10**6), -1),
        version_skew=st.sampled_from((0,) * 8 + (1, -1)),
        other_job=st.integers(0, 9).map(lambda n: n == 0),
    )
    def attempt(self, event: Event, actor: str, step: int, version_skew: int, other_job: bool) -> None:
        """Any event: refused with exactly the rule it breaks (input untouched), or accepted if it breaks none."""
        rec = record(
            event,
            version=len(self.records) + 1 + version_skew,
            actor=actor,
            when=max(self.clock + step, 0),
            job_uuid=OTHER_JOB if other_job else JOB,
        )
        rule_name = expected_rule(self.job, rec)
        if rule_name is None:
            if isinstance(event, Cancelled):
                return  # legal, but the cancel rule takes care to keep cancels rare
            if self.records and rec.recorded_at < self.records[-1].recorded_at:
                # Legal for the fold (it compares with the last *change*, and a reuse changes nothing), but
                # the database refuses it: not a history worth continuing.
                return
            self.accept(rec)
            self.clock = max(self.clock, self.clock + step)
            self.was_cancelled |= self.current.state == "Cancelled"
            return
        frozen = snapshot(self.job)
        with pytest.raises(IllegalTransition) as refused:
            apply(self.job, rec)
        assert refused.value.rule == rule_name, refused.value.message
        assert snapshot(self.job) == frozen, "a refused event changed the job"

    # ---- determinism -------------------------------------------------------------------------------------
    @rule(data=st.data())
    def fold_in_two_parts(self, data: st.DataObject) -> None:
        """``fold(prefix)`` then ``fold(rest, initial=...)`` is ``fold(all)``, and neither touches ``initial``."""
        cut = data.draw(st.integers(0, len(self.records)))
        head = fold(self.records[:cut])
        frozen = snapshot(head)
        assert fold(self.records[cut:], initial=head) == fold(self.records)
        assert snapshot(head) == frozen

    # ---- invariants --------------------------------------------------------------------------------------
    @invariant()
    def folds_to_the_same_job(self) -> None:
        if self.job is not None:
            assert fold(self.records) == self.job
            assert fold(list(self.records)) == fold(copy.deepcopy(self.records))

    @invariant()
    def derived_attributes_agree(self) -> None:
        job = self.job
        if job is None:
            return
        assert job.state == derive_state(job)
        assert job.running == (job.state == "Running")
        assert job.etag == compute_etag(job)
        if job.finished_at is not None:
            assert not job.running, "a finished job is not running"
        else:
            assert job.success is None, "success is unknown until the job finishes"
        if self.was_cancelled:
            assert job.state == "Cancelled", "once Cancelled, always Cancelled"

    @invariant()
    def versions_are_consecutive(self) -> None:
        assert [rec.version for rec in self.records] == list(range(1, len(self.records) + 1))
        if self.job is not None:
            assert self.job.version == len(self.records)
            assert self.job.modified_at >= self.job.created_at


TestJobLifecycle = JobLifecycle.TestCase
TestJobLifecycle.settings = settings(
    max_examples=300, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# ---------------------------------------------------------------------------------------------------------
# Every rule, hit on purpose
# ---------------------------------------------------------------------------------------------------------
OWNER, DISPATCHER, OTHER_DISPATCHER = OWNERS[0], DISPATCHERS[0], DISPATCHERS[1]
Step = tuple[Event, str]  # an event and its actor


def submitted(version: str = "main") -> Step:
    return Submitted(owner_uuid=OWNER, script_name="hash", script_version=version, script_parameters={}), OWNER


def by_dispatcher(event: Event) -> Step:
    return event, DISPATCHER


QUEUED: Final = [submitted()]
LOCKED: Final = [*QUEUED, by_dispatcher(Locked())]
RUNNING: Final = [*LOCKED, by_dispatcher(Started(script_version=COMMIT))]
COMPLETE: Final = [*RUNNING, by_dispatcher(Finished(success=True))]
FAILED: Final = [*RUNNING, by_dispatcher(Finished(success=False))]
CANCELLED: Final = [*QUEUED, (Cancelled(), OWNER)]
CANCELLED_RUNNING: Final = [*RUNNING, (Cancelled(), OWNER)]


def history(steps: list[Step]) -> list[Recorded]:
    """Records for ``steps``, one second apart."""
    return [
        record(event, version=n, actor=actor, when=n * 1_000_000) for n, (event, actor) in enumerate(steps, start=1)
    ]


def then(steps: list[Step], event: Event, actor: str) -> tuple[list[Recorded], Recorded]:
    """The history ``steps`` and one more event after it, by ``actor``."""
    done = history(steps)
    return done, record(event, version=len(done) + 1, actor=actor, when=(len(done) + 1) * 1_000_000)


def adjusted(steps: list[Step], event: Event, **changes: Any) -> tuple[list[Recorded], Recorded]:
    """Like ``then`` by the dispatcher, with some fields of the new record replaced."""
    done, rec = then(steps, event, DISPATCHER)
    return done, msgspec.structs.replace(rec, **changes)


SCENARIOS: Final[dict[str, Callable[[], tuple[list[Recorded], Recorded]]]] = {
    "job-must-exist": lambda: ([], history([by_dispatcher(Locked())])[0]),
    "versions-consecutive": lambda: adjusted(QUEUED, Locked(), version=3),
    "same-job": lambda: adjusted(QUEUED, Locked(), job_uuid=OTHER_JOB),
    "time-monotonic": lambda: adjusted(QUEUED, Locked(), recorded_at=at(999_999)),
    "submit-once": lambda: then(QUEUED, submitted()[0], OWNER),
    "update-before-finish": lambda: then(COMPLETE, Updated(priority=9), OWNER),
    "update-while-queued-unlocked": lambda: then(LOCKED, Updated(script_name="sort"), OWNER),
    "lock-needs-queued": lambda: then(RUNNING, Locked(), OTHER_DISPATCHER),
    "lock-once": lambda: then(LOCKED, Locked(), OTHER_DISPATCHER),
    "unlock-needs-lock": lambda: then(QUEUED, Unlocked(), DISPATCHER),
    "unlock-before-start": lambda: then(RUNNING, Unlocked(), DISPATCHER),
    "start-needs-queued": lambda: then(CANCELLED, Started(script_version=COMMIT), DISPATCHER),
    "start-needs-lock": lambda: then(QUEUED, Started(script_version=COMMIT), DISPATCHER),
    "start-by-lock-holder": lambda: then(LOCKED, Started(script_version=COMMIT), OTHER_DISPATCHER),
    "start-needs-commit": lambda: then(LOCKED, Started(script_version=None), DISPATCHER),
    "cancel-once": lambda: then(CANCELLED, Cancelled(), OWNER),
    "cancel-before-finish": lambda: then(FAILED, Cancelled(), OWNER),
    "finish-needs-start": lambda: then(LOCKED, Finished(success=True), DISPATCHER),
    "finish-once": lambda: then(COMPLETE, Finished(success=True), DISPATCHER),
    "finish-by-lock-holder": lambda: then(RUNNING, Finished(success=True), OTHER_DISPATCHER),
    "reuse-needs-unfailed": lambda: then(FAILED, Reused(), OWNER),
}


def test_every_rule_has_a_scenario() -> None:
    assert set(SCENARIOS) == RULES_IN_SOURCE


@pytest.mark.parametrize("rule_name", sorted(SCENARIOS))
def test_illegal_event_names_its_rule(rule_name: str) -> None:
    done, illegal = SCENARIOS[rule_name]()
    job = fold(done)
    frozen = snapshot(job)
    assert expected_rule(job, illegal) == rule_name  # the scenario breaks that rule and no earlier one
    with pytest.raises(IllegalTransition) as refused:
        apply(job, illegal)
    assert refused.value.rule == rule_name
    assert snapshot(job) == frozen
    with pytest.raises(IllegalTransition) as refused_in_fold:
        fold([*done, illegal])
    assert refused_in_fold.value.rule == rule_name


def test_first_event_must_be_version_one() -> None:
    rec = msgspec.structs.replace(history(QUEUED)[0], version=2)
    with pytest.raises(IllegalTransition) as refused:
        apply(None, rec)
    assert refused.value.rule == "versions-consecutive"


@pytest.mark.parametrize(
    ("steps", "state", "running", "success"),
    [
        (QUEUED, "Queued", False, None),
        (LOCKED, "Queued", False, None),
        (RUNNING, "Running", True, None),
        (COMPLETE, "Complete", False, True),
        (FAILED, "Failed", False, False),
        (CANCELLED, "Cancelled", False, None),
        (CANCELLED_RUNNING, "Cancelled", False, None),
        ([*CANCELLED_RUNNING, by_dispatcher(Finished(success=True))], "Cancelled", False, True),
    ],
)
def test_states(steps: list[Step], state: str, running: bool, success: bool | None) -> None:
    job = fold(history(steps))
    assert job is not None
    assert (job.state, job.running, job.success) == (state, running, success)


def test_fold_of_nothing_is_nothing() -> None:
    assert fold([]) is None
    job = fold(history(RUNNING))
    assert fold([], initial=job) == job
