"""One record per call, shared by both fronts: its request id, what it generated and how long each part took;
at its end, one access-log line and the per-adapter series.

A front opens a record when a call arrives (`CallLog.begin`: the gRPC interceptor, the HTTP gate) and closes it
with the call's status (`CallLog.end`). In between, the record is the context variable `CURRENT_CALL`, so the
generation core fills it in (adapter, tokens, queue wait, time to first token) without any front passing it
along, and error bodies carry the request id. The request id is the caller's `x-request-id` (metadata or header)
when it is a plain token of at most 128 characters, else a new one; it is returned in the response's
`x-request-id`. Prompt text is kept only with `--log-prompts`: the prompt as the model reads it (decoded from its
token ids, after any chat or adapter template).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
import time
import uuid
from dataclasses import dataclass, field

from quiver.server.api.metrics import ServerMetrics

REQUEST_ID_KEY = "x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+=-]{0,127}", re.ASCII)
_MAX_LOGGED_ADAPTER = 80

access_log = logging.getLogger("quiver.access")


def request_id(raw: str | None) -> str:
    """The caller's id when it is a plain token (letters, digits, `._:/+=-`, at most 128), else a new one."""
    if raw is not None and _REQUEST_ID.fullmatch(raw):
        return raw
    return uuid.uuid4().hex


@dataclass
class CallRecord:
    """One call as it goes; the generation core fills in the middle fields."""

    request_id: str
    front: str
    """"grpc" or "http"."""
    method: str
    """The gRPC method's name, or the HTTP route as declared."""
    start: float
    """`time.perf_counter()` when the call arrived."""
    keep_prompt: bool = False
    """Whether the prompt's text may be logged (`--log-prompts`)."""
    adapter: str | None = None
    """The adapter the request named, as sent (for the log only: it may not exist)."""
    served_adapter: str | None = None
    """The registered adapter it ran on (a validated name: the one label metrics may use)."""
    prompt_tokens: int = 0
    generated_tokens: int = 0
    queue_seconds: float | None = None
    ttft_seconds: float | None = None
    prompt: str | None = None
    context_token: contextvars.Token[CallRecord | None] | None = field(default=None, repr=False)

    def fields(self, code: str, seconds: float) -> dict[str, object]:
        """The access line's fields, in their order; timings in milliseconds."""
        out: dict[str, object] = {
            "request_id": self.request_id, "front": self.front, "method": self.method,
            "adapter": (self.adapter or "")[:_MAX_LOGGED_ADAPTER], "status": code,
            "prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
            "queue_ms": _ms(self.queue_seconds), "ttft_ms": _ms(self.ttft_seconds), "duration_ms": _ms(seconds),
        }
        if self.prompt is not None:
            out["prompt"] = self.prompt
        return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


CURRENT_CALL: contextvars.ContextVar[CallRecord | None] = contextvars.ContextVar("quiver_call", default=None)


def current_request_id() -> str | None:
    record = CURRENT_CALL.get()
    return record.request_id if record is not None else None


class CallLog:
    """Opens and closes call records: the access line and the per-adapter series come from here, for both fronts."""

    def __init__(self, metrics: ServerMetrics, log_prompts: bool = False) -> None:
        self.metrics = metrics
        self._log_prompts = log_prompts

    def begin(self, front: str, method: str, raw_request_id: str | None) -> CallRecord:
        """A record for a call arriving now, made current for the task handling it."""
        record = CallRecord(request_id(raw_request_id), front, method, time.perf_counter(),
                            keep_prompt=self._log_prompts)
        record.context_token = CURRENT_CALL.set(record)
        return record

    def end(self, record: CallRecord, code: str, status: str | None = None) -> None:
        """The call ended with `code`, a gRPC status name (an HTTP front maps its status to one); `status` is what
        the access line shows (default: `code`)."""
        seconds = time.perf_counter() - record.start
        if record.context_token is not None:
            with contextlib.suppress(ValueError):  # ended in another context than it began: nothing to undo
                CURRENT_CALL.reset(record.context_token)
            record.context_token = None
        if record.served_adapter is not None:
            self.metrics.adapters.observe(record.served_adapter, code, seconds, record.prompt_tokens,
                                          record.generated_tokens, record.ttft_seconds)
        fields = record.fields(status or code, seconds)
        text = " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
        access_log.info(text, extra={"fields": fields})


def _text_value(value: object) -> str:
    """A value of the text access line: strings quoted when they hold spaces, quotes or control characters."""
    if value is None:
        return "-"
    if isinstance(value, str) and (not value or re.search(r'[\s"\\\x00-\x1f\x7f=]', value)):
        return '"' + value.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'
    return str(value)
