"""Domain errors the service raises. The HTTP layer maps each to its status (CONTRACT §7)."""

from __future__ import annotations


class DomainError(Exception):
    """Base class: a request the ledger refuses, with a message fit for the client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(DomainError):
    """No such job, or one the caller may not read (the two are indistinguishable on purpose)."""


class Forbidden(DomainError):
    """The caller may read the job but not do this to it (or is using a read-only token)."""


class PreconditionFailed(DomainError):
    """``If-Match`` named an etag the job no longer has."""


class Invalid(DomainError):
    """Validation failed, or the request conflicts with the job's state (422)."""

    def __init__(self, message: str, rule: str | None = None) -> None:
        super().__init__(message)
        self.rule = rule
