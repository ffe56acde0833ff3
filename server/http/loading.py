"""The HTTP front before the model has loaded: the port answers at once (probes, scrapes), every other route
answers 503; `AppSwitch` then hands requests to the real application (server/app.py)."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Receive, Scope, Send

from quiver.common.errors import Unavailable
from quiver.server.api.metrics import ServerMetrics
from quiver.server.api.serving_state import ServingState
from quiver.server.http.errors import error_body

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class LoadingApp:
    """`/health` (alive: 200), `/ready` (503), `/metrics`; anything else 503 in OpenAI's error shape."""

    def __init__(self, state: ServingState, metrics: ServerMetrics) -> None:
        self._state = state
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/metrics":
            await _send(send, 200, PROMETHEUS_TEXT, self._metrics.exposition())
            return
        if path in ("/health", "/ready"):
            ok = self._state.live if path == "/health" else self._state.ready
            body = json.dumps({"status": self._state.phase.value}).encode()
            await _send(send, 200 if ok else 503, "application/json", body)
            return
        status, error = error_body(self._state.refusal() or Unavailable("the server is loading its model"))
        await _send(send, status, "application/json", json.dumps(error).encode())


async def _send(send: Send, status: int, content_type: str, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode())]})
    await send({"type": "http.response.body", "body": body})


class AppSwitch:
    """An ASGI application that forwards to `app`, which may be replaced while serving."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)
