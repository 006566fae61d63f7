"""Who may do what (CONTRACT §2). Pure functions of the caller and the job."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from ledger.errors import Forbidden
from projections.job import Job

Role = Literal["user", "auditor", "dispatcher", "admin"]
ROLES: Final[tuple[Role, ...]] = ("user", "auditor", "dispatcher", "admin")
Action = Literal["create", "update", "lock", "unlock", "start", "cancel", "finish"]

# Which roles may attempt each write at all. Ownership and the lock are checked per job on top of this.
_ROLES_FOR: Final[dict[str, frozenset[str]]] = {
    "create": frozenset({"user", "admin"}),
    "update": frozenset({"user", "admin"}),
    "lock": frozenset({"dispatcher", "admin"}),
    "unlock": frozenset({"dispatcher", "admin"}),
    "start": frozenset({"dispatcher", "admin"}),
    "finish": frozenset({"dispatcher", "admin"}),
    "cancel": frozenset({"user", "dispatcher", "admin"}),
}


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated principal behind a request."""

    user_uuid: str
    role: Role
    api_client_uuid: str | None = None
    token_uuid: str | None = None
    read_only: bool = False
    request_id: str = ""


def reads_everything(caller: Caller) -> bool:
    """Auditors, dispatchers and admins read every job and event."""
    return caller.role != "user"


def can_read(caller: Caller, job: Job) -> bool:
    """Whether ``caller`` may see ``job`` at all (if not, it is 404 to them)."""
    return reads_everything(caller) or job.owner_uuid == caller.user_uuid


def authorize(caller: Caller, action: Action, job: Job | None = None) -> None:
    """Raise ``Forbidden`` unless ``caller`` may perform ``action`` (on ``job``, already known readable)."""
    if caller.read_only:
        raise Forbidden("this token is read-only")
    if caller.role not in _ROLES_FOR[action]:
        raise Forbidden(f"the {caller.role} role may not {action} jobs")
    if job is None or caller.role == "admin":
        return
    if action == "update" and job.owner_uuid != caller.user_uuid:
        raise Forbidden("only the job's owner or an admin may update it")
    if action == "cancel" and caller.role == "user" and job.owner_uuid != caller.user_uuid:
        raise Forbidden("only the job's owner, a dispatcher or an admin may cancel it")
