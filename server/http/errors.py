"""Domain errors as HTTP responses in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}`.

The same exception classes gRPC maps to status codes (server/grpc_front/interceptors.py) map to HTTP statuses here, so a
rule fails the same way on both fronts: 400 invalid argument, 401 credentials, 404 unknown model or adapter, 409
name taken, 413 too large, 429 queue full or out of memory, 503 shutting down, 504 deadline; 500 for corrupt
stored data (`data_loss`) and for bugs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from starlette.responses import JSONResponse

from quiver.common import errors
from quiver.server.api.calls import current_request_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpError:
    """How one domain error class answers over HTTP."""

    status: int
    type: str
    code: str | None


# Most specific first: the first class in an error's MRO that is listed decides.
_ERRORS: dict[type[errors.QuiverError], HttpError] = {
    errors.Unsupported: HttpError(400, "invalid_request_error", "unsupported_parameter"),
    errors.InvalidArgument: HttpError(400, "invalid_request_error", "invalid_value"),
    errors.FailedPrecondition: HttpError(400, "invalid_request_error", "failed_precondition"),
    errors.Unauthenticated: HttpError(401, "invalid_request_error", "invalid_api_key"),
    errors.NotFound: HttpError(404, "invalid_request_error", "not_found"),
    errors.AlreadyExists: HttpError(409, "invalid_request_error", "already_exists"),
    errors.TooLarge: HttpError(413, "invalid_request_error", "request_too_large"),
    errors.ResourceExhausted: HttpError(429, "rate_limit_error", "resource_exhausted"),
    errors.Cancelled: HttpError(499, "invalid_request_error", "cancelled"),
    errors.Unavailable: HttpError(503, "server_error", "unavailable"),
    errors.DeadlineExceeded: HttpError(504, "server_error", "deadline_exceeded"),
    errors.DataLoss: HttpError(500, "server_error", "data_loss"),
    errors.ModelLoadError: HttpError(400, "invalid_request_error", "failed_precondition"),
}
_INTERNAL = HttpError(500, "server_error", "internal_error")
# An HTTP status as the gRPC code name that per-adapter series label calls with on both fronts.
_STATUS_NAMES = {200: "OK", 400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 405: "UNIMPLEMENTED",
                 409: "ALREADY_EXISTS", 413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED",
                 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


def status_name(status: int) -> str:
    """`status` as a gRPC code name (500 and anything unlisted: INTERNAL or UNKNOWN)."""
    if status in _STATUS_NAMES:
        return _STATUS_NAMES[status]
    return "INTERNAL" if status >= 500 else "UNKNOWN"


def http_error(error: BaseException) -> HttpError:
    if isinstance(error, errors.QuiverError):
        for cls in type(error).__mro__:
            if cls in _ERRORS:
                return _ERRORS[cls]
    return _INTERNAL


def error_body(error: BaseException, params: Mapping[str, str] | None = None) -> tuple[int, dict[str, object]]:
    """Status and JSON body for `error`. `params` renames a field the core names (`max_new_tokens`) to the
    request's own (`max_tokens`), for `param` and the message; an unknown model is `model_not_found`."""
    kind = http_error(error)
    if kind is _INTERNAL:
        log.error("internal error in an HTTP request", exc_info=error)
        return kind.status, _body(f"internal error: {type(error).__name__}", kind, None, kind.code)
    param: str | None = None
    if isinstance(error, errors.InvalidArgument):
        error = error.renamed(params or {})
        assert isinstance(error, errors.InvalidArgument)
        param = error.field
    code = kind.code
    if isinstance(error, errors.NotFound) and params is not None and "adapter" in params:
        param, code = params["adapter"], "model_not_found"
    assert isinstance(error, errors.QuiverError)
    return kind.status, _body(error.message, kind, param, code)


def _body(message: str, kind: HttpError, param: str | None, code: str | None) -> dict[str, object]:
    error: dict[str, object] = {"message": message, "type": kind.type, "param": param, "code": code}
    request_id = current_request_id()
    if request_id is not None:  # the call's id (also in the x-request-id header), to quote when reporting it
        error["request_id"] = request_id
    return {"error": error}


def error_response(error: BaseException, params: Mapping[str, str] | None = None) -> JSONResponse:
    status, body = error_body(error, params)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)
