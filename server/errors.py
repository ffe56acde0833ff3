"""Quiver's domain exceptions.

Code anywhere in Quiver raises these; one gRPC interceptor (server/interceptors.py) maps each class to its
status code, so no handler picks codes itself and no user mistake surfaces as INTERNAL.
"""

from __future__ import annotations


class QuiverError(Exception):
    """Base of every error a client may legitimately cause. `reasons` lists every problem found at once."""

    def __init__(self, message: str, *, reasons: list[str] | None = None) -> None:
        self.reasons = list(reasons or [])
        if self.reasons:
            message = f"{message}: " + "; ".join(self.reasons)
        super().__init__(message)
        self.message = message


class InvalidArgument(QuiverError):
    """The request is malformed; `field` names the offending request field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(QuiverError):
    """A named thing (adapter, model) does not exist."""


class AlreadyExists(QuiverError):
    """A name is already taken."""


class FailedPrecondition(QuiverError):
    """The request is well-formed but does not fit the current state (e.g. an adapter for another base)."""


class ResourceExhausted(QuiverError):
    """A size or capacity limit was hit."""


class Unavailable(QuiverError):
    """The server cannot take the request now (starting, shutting down)."""


class DeadlineExceeded(QuiverError):
    """The request's deadline passed before it finished."""


class Unauthenticated(QuiverError):
    """Missing or wrong credentials."""


class Cancelled(QuiverError):
    """The client went away; nothing is sent back."""


class ModelLoadError(QuiverError):
    """The base model could not be found or loaded (raised at start-up, not over the API)."""
