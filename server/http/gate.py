"""What every HTTP request passes before its route, as one pure ASGI middleware: the access policy (401), the body
cap (413), the serving phase (503 while loading, draining or dead: server/api/serving_state.py), its call record
(request id in and out as `x-request-id`, the access line: server/api/calls.py) and its metrics (route, status,
duration to the last byte of a stream).

The route, and so the access level, is found by the application's own router (`Route.matches`), so the gate and
the router cannot disagree on which handler a path reaches; a path no route matches needs the API key (the router
answers 404, or redirects a trailing slash to a route that is checked in turn). A path with control characters is
refused outright. Pure ASGI rather than Starlette's BaseHTTPMiddleware, which would buffer streams and hide
disconnects.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.routing import BaseRoute, Match, Route
from starlette.types import Message, Receive, Scope, Send

from quiver.common.errors import InvalidArgument, QuiverError, TooLarge
from quiver.server.api.access import Access, AccessPolicy, bearer_token
from quiver.server.api.calls import REQUEST_ID_KEY, CallLog
from quiver.server.api.serving_state import ServingState
from quiver.server.http.errors import error_body, status_name

# Route path (as declared) -> what it needs; a path no route matches needs the API key (fail closed).
ROUTE_ACCESS: dict[str, Access] = {
    "/health": Access.OPEN,
    "/ready": Access.OPEN,
    "/metrics": Access.OPEN,
    "/v1/models": Access.INFERENCE,
    "/v1/models/{model:path}": Access.INFERENCE,
    "/v1/completions": Access.INFERENCE,
    "/v1/chat/completions": Access.INFERENCE,
    "/v1/embeddings": Access.INFERENCE,
    "/v1/classify": Access.INFERENCE,
    "/v1/load_lora_adapter": Access.ADMIN,
    "/v1/unload_lora_adapter": Access.ADMIN,
}
UNMATCHED = "other"
# Routes that answer in every serving phase (probes and scrapes), and that are not calls worth an access line.
ALWAYS_OPEN = frozenset({"/health", "/ready", "/metrics"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def route_of(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The declared path of the route the router picks for `scope` (as Starlette's router: the first full match,
    else the first partial one, i.e. the path with another method), or UNMATCHED."""
    partial = UNMATCHED
    for route in routes:
        match, _ = route.matches(scope)
        if isinstance(route, Route) and match is Match.FULL:
            return route.path
        if isinstance(route, Route) and match is Match.PARTIAL and partial == UNMATCHED:
            partial = route.path
    return partial


class Gate:
    def __init__(self, app: Starlette, policy: AccessPolicy, state: ServingState, calls: CallLog,
                 max_body_bytes: int) -> None:
        self._app = app
        self._routes = app.router.routes
        self._policy = policy
        self._state = state
        self._calls = calls
        self._max_body = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # no route takes one: refused, never let past the checks
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        route = route_of(self._routes, scope)
        headers = _headers(scope)
        record = None if route in ALWAYS_OPEN else self._calls.begin("http", route, headers.get(REQUEST_ID_KEY))
        status = 500  # unless a response starts
        start = time.perf_counter()

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if record is not None:
                    message = {**message, "headers": [*message.get("headers", ()),
                                                      (REQUEST_ID_KEY.encode(), record.request_id.encode())]}
            await send(message)

        self._state.in_flight += 1
        try:
            refusal = self._refusal(route, scope, headers)
            if refusal is not None:
                await _respond(timed_send, refusal)
            else:
                await self._app(scope, self._capped(receive), timed_send)
        finally:
            self._state.in_flight -= 1
            self._calls.metrics.observe_http(route, status, time.perf_counter() - start)
            if record is not None:
                self._calls.end(record, status_name(status), str(status))

    def _refusal(self, route: str, scope: Scope, headers: Mapping[str, str]) -> QuiverError | None:
        try:
            if _CONTROL.search(scope["path"]):
                raise InvalidArgument("path", "must not hold control characters")
            if route not in ALWAYS_OPEN and (refusal := self._state.refusal()) is not None:
                raise refusal
            self._policy.check(ROUTE_ACCESS.get(route, Access.INFERENCE), bearer_token(headers.get("authorization")))
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self._max_body:
                raise TooLarge(f"the request body is {length} bytes; the server accepts {self._max_body}")
        except QuiverError as e:
            return e
        return None

    def _capped(self, receive: Receive) -> Receive:
        """`receive` that refuses a body growing past the cap (a chunked body has no Content-Length)."""
        seen = 0

        async def capped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self._max_body:
                    raise TooLarge(f"the request body exceeds {self._max_body} bytes")
            return message

        return capped


def _headers(scope: Scope) -> Mapping[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


async def _respond(send: Send, error: QuiverError) -> None:
    status, body = error_body(error)
    headers: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    payload: Any = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
