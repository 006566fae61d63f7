"""The Jobs application service: every write is load → check → fold → append, retried on a lost race.

Each command reads the job's current state, checks who may do it (``ledger.access``), builds one event and
folds it onto the state with the same pure ``apply`` the projection uses (which refuses illegal
transitions), then appends the event and the new read-model row in one statement. If another writer
appended first, PostgreSQL's unique key says so, and the command is decided again on fresh state: two
dispatchers locking one job get exactly one success and one ``Invalid``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any, Final

from ledger.access import Action, Caller, authorize, can_read, reads_everything
from ledger.errors import Invalid, NotFound, PreconditionFailed
from ledger.hashing import GENESIS_HASH, canonical_json, digest_parameters
from ledger.store import EventStore, JobRecord, StaleVersion, SubmitIdTaken
from projections.job import (
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
    fold,
)
from projections.timefmt import now_ts

MAX_ATTEMPTS: Final = 25
_ALPHABET: Final = "0123456789abcdefghijklmnopqrstuvwxyz"
# The job an owner's submit_id was answered with by reuse: a ``reused`` event carries the submit_id and the
# submitter is its actor. (Belongs in ``EventStore``; served by the ``events_reused_submit_id`` index.)
_REUSED_FOR_SUBMIT_ID: Final = (
    "SELECT job_uuid, version FROM events "
    "WHERE event_type = 'reused' AND actor_user_uuid = $1 AND data->>'submit_id' = $2 ORDER BY id LIMIT 1"
)


class Contention(Exception):
    """A job kept changing under a command for ``MAX_ATTEMPTS`` tries; the client should retry later."""


# Random bytes to base-36 digits by table: 252 = 7 * 36, so bytes below it map evenly onto the 36 digits and
# the four above are dropped. One C-level translate instead of a big-integer divmod per digit.
_UNIFORM_BYTES: Final = 252
_DIGIT_OF_BYTE: Final = bytes(ord(_ALPHABET[byte % 36]) for byte in range(_UNIFORM_BYTES)) + bytes(256 - _UNIFORM_BYTES)
_DROPPED_BYTES: Final = bytes(range(_UNIFORM_BYTES, 256))


def random_base36(length: int) -> str:
    """``length`` uniformly random base-36 characters from the system's CSPRNG."""
    digits = b""
    while len(digits) < length:
        # A few spare bytes: each is dropped with probability 4/256, so one draw almost always suffices.
        digits += secrets.token_bytes(length + 8).translate(_DIGIT_OF_BYTE, _DROPPED_BYTES)
    return digits[:length].decode()


def new_uuid(prefix: str, infix: str) -> str:
    """A fresh ``PPPPP-TTTTT-RRRRRRRRRRRRRRR`` identifier."""
    return f"{prefix}-{infix}-{random_base36(15)}"


def _recorded(caller: Caller, job_uuid: str, version: int, event: Event, not_before: str | None) -> Recorded:
    moment = now_ts()
    # A job's event times never go backwards (the database checks it too); clocks of several service
    # processes may disagree by a little, so never stamp an event earlier than the job's last one.
    if not_before is not None and moment < not_before:
        moment = not_before
    return Recorded(
        job_uuid=job_uuid,
        version=version,
        event=event,
        actor_user_uuid=caller.user_uuid,
        actor_client_uuid=caller.api_client_uuid,
        request_id=caller.request_id,
        recorded_at=moment,
    )


def etag_matches(if_match: str, etag: str) -> bool:
    """Whether an ``If-Match`` header value admits a job with ``etag`` (RFC 9110 §13.1.1).

    ``*`` matches any existing job; otherwise one of the comma-separated entity tags must equal the etag by
    strong comparison (a weak ``W/"..."`` tag never matches). Unquoted tags are tolerated.
    """
    for tag in if_match.split(","):
        tag = tag.strip()
        if tag == "*":
            return True
        if not tag.startswith("W/") and tag.strip('"') == etag:
            return True
    return False


def _choose_reusable(submitted: Submitted, candidates: list[JobRecord]) -> JobRecord | None:
    """The job to answer ``submitted`` with, among the reuse look-up's candidates (CONTRACT §4), if any."""
    # Digests can collide in principle; identity is deep equality of the parameters.
    candidates = [c for c in candidates if c.job.script_parameters == submitted.script_parameters]
    complete = [c for c in candidates if c.job.state == "Complete"]
    # As Arvados did: if finished candidates disagree about the output, trust none of them.
    if complete and len({c.job.output for c in complete}) == 1:
        return complete[0]
    unfinished = [c for c in candidates if c.job.state in ("Running", "Queued")]
    unfinished.sort(key=lambda c: (c.job.state != "Running", c.job.created_at))
    return unfinished[0] if unfinished else None


def _fold_one(record: JobRecord | None, rec: Recorded) -> Job:
    try:
        return apply(None if record is None else record.job, rec)
    except IllegalTransition as exc:
        raise Invalid(exc.message, rule=exc.rule) from None


class JobService:
    """Commands and reads on jobs, for one authenticated caller at a time."""

    def __init__(self, store: EventStore, uuid_prefix: str = "zzzzz") -> None:
        self.store = store
        self.uuid_prefix = uuid_prefix

    # ---- reads -------------------------------------------------------------------------------------------
    async def get(self, caller: Caller, job_uuid: str) -> Job:
        """The job's current state; ``NotFound`` if it does not exist or the caller may not read it."""
        record = await self.store.get_job(job_uuid)
        if record is None or not can_read(caller, record.job):
            raise NotFound("Path not found")
        return record.job

    # ---- create ------------------------------------------------------------------------------------------
    async def create(
        self,
        caller: Caller,
        *,
        script_name: str,
        script_version: str,
        script_parameters: dict[str, Any],
        priority: int = 0,
        resource_limits: dict[str, int] | None = None,
        submit_id: str | None = None,
        reuse: bool = True,
    ) -> tuple[Job, bool]:
        """Submit a job. Returns ``(job, created)``: ``created`` is False when an existing job is returned.

        With ``submit_id``, a retry of the same submission returns the original job and appends nothing; the
        same ``submit_id`` with different attributes is ``Invalid``. With ``reuse`` (the default: CONTRACT §4
        ``allow_duplicate`` false), an identical unfailed job the caller can read is returned instead, with a
        ``reused`` event appended to it.
        """
        authorize(caller, "create")
        submitted = Submitted(
            owner_uuid=caller.user_uuid,
            script_name=script_name,
            script_version=script_version,
            script_parameters=script_parameters,
            priority=priority,
            resource_limits=dict(resource_limits or {}),
            submit_id=submit_id,
        )
        for _ in range(MAX_ATTEMPTS):
            if submit_id is not None:
                earlier = await self._earlier_submission(caller, submitted, submit_id)
                if earlier is not None:
                    return earlier, False
            job_uuid = new_uuid(self.uuid_prefix, "8i9sb")
            rec = _recorded(caller, job_uuid, 1, submitted, None)
            job = _fold_one(None, rec)
            if reuse:
                if submit_id is None:
                    # The usual case in one round trip: look for a job to reuse and, finding none, create.
                    found = await self.store.create_unless_identical(rec, job, readable_by_all=reads_everything(caller))
                    if not found:
                        return job, True
                    candidate = _choose_reusable(submitted, found)
                else:
                    candidate = await self._find_reusable(caller, submitted)
                if candidate is not None:
                    if submit_id is not None:
                        # A concurrent request with this submit_id may have committed since the look-up above
                        # (creating the very job found, or reusing it): then this is its retry, not a reuse.
                        # Anything committed after the candidate was read makes the append below stale.
                        earlier = await self._earlier_submission(caller, submitted, submit_id)
                        if earlier is not None:
                            return earlier, False
                    try:
                        job = await self._append(caller, candidate, Reused(submit_id=submit_id))
                    except StaleVersion:
                        continue
                    return job, False
            try:
                await self.store.append(job_uuid, 0, GENESIS_HASH, [rec], job)
            except SubmitIdTaken:
                continue  # a concurrent retry of this submission won; return its job on the next pass
            return job, True
        raise Contention("the submission kept conflicting with concurrent ones")

    async def _earlier_submission(self, caller: Caller, submitted: Submitted, submit_id: str) -> Job | None:
        """The job an earlier submission with this ``submit_id`` got, created or reused; None if there was none.

        ``Invalid`` if that submission differs from this one.
        """
        existing = await self.store.get_job_by_submit_id(caller.user_uuid, submit_id)
        if existing is not None:
            first = (await self.store.load_events(existing.job.uuid, up_to_version=1))[0]
            _check_same_submission(existing.job.uuid, first.to_recorded().event, submitted)
            return existing.job
        # The earlier submission may have been answered with an existing job: a ``reused`` event records it.
        row = await self.store.pool.fetchrow(_REUSED_FOR_SUBMIT_ID, caller.user_uuid, submit_id)
        if row is None:
            return None
        history = await self.store.load_events(row["job_uuid"], up_to_version=row["version"])
        then = fold(event.to_recorded() for event in history)
        record = await self.store.get_job(row["job_uuid"])
        assert then is not None
        assert record is not None
        # What the earlier request asked for is what the job was when it was reused (that is what matched).
        mismatched = [
            name
            for name in ("script_name", "script_version", "script_parameters")
            if not _same_value(getattr(then, name), getattr(submitted, name))
        ]
        if mismatched or not can_read(caller, record.job):
            raise Invalid(
                f"submit_id {submit_id!r} was already used for job {then.uuid}"
                + (f" with different {', '.join(mismatched)}" if mismatched else ""),
                rule="submit-id-unique",
            )
        return record.job

    async def _find_reusable(self, caller: Caller, submitted: Submitted) -> JobRecord | None:
        candidates = await self.store.find_identical(
            script_name=submitted.script_name,
            parameters_digest=digest_parameters(submitted.script_parameters),
            script_version=submitted.script_version,
            owner_uuid=caller.user_uuid,
            readable_by_all=reads_everything(caller),
        )
        return _choose_reusable(submitted, candidates)

    # ---- lifecycle ---------------------------------------------------------------------------------------
    async def update(self, caller: Caller, job_uuid: str, changes: dict[str, Any], if_match: str | None = None) -> Job:
        """Change client-settable attributes (``Updated`` fields) of a Queued, unlocked job.

        Attributes supplied with the value they already have are not changes; an update that changes nothing
        succeeds and appends nothing.
        """

        def decide(job: Job) -> Event | None:
            effective = {name: value for name, value in changes.items() if not _same_value(getattr(job, name), value)}
            return Updated(**effective) if effective else None

        return await self._command(caller, job_uuid, "update", decide, if_match)

    async def lock(self, caller: Caller, job_uuid: str, if_match: str | None = None) -> Job:
        """Claim a Queued, unlocked job for the calling dispatcher."""
        return await self._command(caller, job_uuid, "lock", lambda job: Locked(), if_match)

    async def unlock(self, caller: Caller, job_uuid: str, if_match: str | None = None) -> Job:
        """Release a lock before the job starts: the holder, or an admin."""

        def decide(job: Job) -> Event:
            if caller.role != "admin" and job.is_locked_by not in (None, caller.user_uuid):
                raise Invalid(f"job {job.uuid} is locked by {job.is_locked_by}", rule="unlock-by-lock-holder")
            return Unlocked()

        return await self._command(caller, job_uuid, "unlock", decide, if_match)

    async def start(
        self, caller: Caller, job_uuid: str, script_version: str | None = None, if_match: str | None = None
    ) -> Job:
        """The lock holder starts the job, supplying the resolved commit if the job names a branch or tag."""
        return await self._command(
            caller, job_uuid, "start", lambda job: Started(script_version=script_version), if_match
        )

    async def cancel(self, caller: Caller, job_uuid: str, if_match: str | None = None) -> Job:
        """Cancel a Queued or Running job. Cancelling a cancelled job changes nothing and succeeds."""

        def decide(job: Job) -> Event | None:
            return None if job.state == "Cancelled" else Cancelled()

        return await self._command(caller, job_uuid, "cancel", decide, if_match)

    async def finish(
        self,
        caller: Caller,
        job_uuid: str,
        *,
        success: bool,
        output: str | None = None,
        log: str | None = None,
        if_match: str | None = None,
    ) -> Job:
        """The lock holder records how a started job ended (also after a cancel: the state stays Cancelled)."""
        event = Finished(success=success, output=output, log=log)
        return await self._command(caller, job_uuid, "finish", lambda job: event, if_match)

    # ---- the write loop ----------------------------------------------------------------------------------
    async def _command(
        self,
        caller: Caller,
        job_uuid: str,
        action: Action,
        decide: Callable[[Job], Event | None],
        if_match: str | None,
    ) -> Job:
        for _ in range(MAX_ATTEMPTS):
            record = await self.store.get_job(job_uuid)
            # A job the caller may not read is not found, whatever they wanted to do to it (never 403: that
            # would tell them it exists). Only then: may they do this?
            if record is None or not can_read(caller, record.job):
                raise NotFound("Path not found")
            authorize(caller, action, record.job)
            if if_match is not None and not etag_matches(if_match, record.job.etag):
                raise PreconditionFailed(f"If-Match {if_match} does not match the job's etag {record.job.etag}")
            event = decide(record.job)
            if event is None:
                return record.job
            try:
                return await self._append(caller, record, event)
            except StaleVersion:
                continue
        raise Contention(f"job {job_uuid} kept changing; try again")

    async def _append(self, caller: Caller, record: JobRecord, event: Event) -> Job:
        job = record.job
        rec = _recorded(caller, job.uuid, job.version + 1, event, record.last_recorded_at)
        new_job = _fold_one(record, rec)
        await self.store.append(job.uuid, job.version, record.last_hash, [rec], new_job)
        return new_job


def _same_value(current: Any, new: Any) -> bool:
    # Exact JSON equality: Python's == would take True for 1 inside script_parameters.
    return canonical_json(current) == canonical_json(new)


def _check_same_submission(job_uuid: str, original: Event, submitted: Submitted) -> None:
    # A retry must repeat the original submission, whatever updates the job has had since.
    assert isinstance(original, Submitted)
    mismatched = [
        name
        for name in ("script_name", "script_version", "script_parameters", "priority", "resource_limits")
        if not _same_value(getattr(original, name), getattr(submitted, name))
    ]
    if mismatched:
        raise Invalid(
            f"submit_id {submitted.submit_id!r} was already used for job {job_uuid} with different "
            f"{', '.join(mismatched)}",
            rule="submit-id-unique",
        )
