"""Quiver's domain exceptions.

Code anywhere in Quiver raises these; one gRPC interceptor (server/grpc_front/interceptors.py) maps each class to its
status code, so no handler picks codes itself and no user mistake surfaces as INTERNAL.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_FIELD_HEAD = re.compile(r"[A-Za-z_]+")


def _rebuilt(cls: type[QuiverError], state: dict[str, object]) -> QuiverError:
    error = cls.__new__(cls)
    Exception.__init__(error, state.get("message", ""))
    error.__dict__.update(state)
    return error


class QuiverError(Exception):
    """Base of every error a client may legitimately cause. `reasons` lists every problem found at once."""

    def __init__(self, message: str, *, reasons: list[str] | None = None) -> None:
        self.reasons = list(reasons or [])
        if self.reasons:
            message = f"{message}: " + "; ".join(self.reasons)
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[object, ...]:
        # Rebuilt from its attributes, whatever the subclass's constructor takes: errors cross process boundaries
        # (Ray Serve's replicas raise them in the ingress).
        return _rebuilt, (type(self), dict(self.__dict__))


class InvalidArgument(QuiverError):
    """The request is malformed; `field` names the offending request field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem

    def renamed(self, names: Mapping[str, str]) -> InvalidArgument:
        """The same error with the field's first name translated (`messages[2].role` with {"messages":
        "chat.messages"} -> `chat.messages[2].role`): how a front spells the core's field names its own way."""
        head = _FIELD_HEAD.match(self.field)
        if head is None or head.group() not in names:
            return self
        return InvalidArgument(names[head.group()] + self.field[head.end():], self.problem)


class Unsupported(InvalidArgument):
    """The request asks for a feature Quiver does not have (tools, logit bias...): refused, never ignored."""

    def __init__(self, field: str, problem: str = "is not supported by Quiver") -> None:
        super().__init__(field, problem)

    def renamed(self, names: Mapping[str, str]) -> InvalidArgument:
        renamed = super().renamed(names)
        return renamed if renamed is self else Unsupported(renamed.field, renamed.problem)


class NotFound(QuiverError):
    """A named thing (adapter, model) does not exist."""


class AlreadyExists(QuiverError):
    """A name is already taken."""


class FailedPrecondition(QuiverError):
    """The request is well-formed but does not fit the current state (e.g. an adapter for another base)."""


class ResourceExhausted(QuiverError):
    """A capacity limit was hit that may clear later (a full queue, memory): the client may retry."""


class TooLarge(ResourceExhausted):
    """The request itself exceeds a fixed size limit (a body, an upload, a generation the cache can never hold):
    retrying the same request cannot succeed. gRPC: RESOURCE_EXHAUSTED; HTTP: 413."""


class Unavailable(QuiverError):
    """The server cannot take the request now (starting, shutting down)."""


class DeadlineExceeded(QuiverError):
    """The request's deadline passed before it finished."""


class DataLoss(QuiverError):
    """Stored data is corrupt (an adapter file fails its checksum): that adapter fails, the server goes on."""


class Unauthenticated(QuiverError):
    """Missing or wrong credentials."""


class Cancelled(QuiverError):
    """The client went away; nothing is sent back."""


class ModelLoadError(QuiverError):
    """The base model could not be found or loaded (raised at start-up, not over the API)."""
