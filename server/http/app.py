"""The HTTP application: OpenAI's /v1 routes, vLLM's adapter routes, /metrics and /health, behind the gate.

Every route is a thin translation onto the core: generation through `Generator`, adapters through
`AdapterCatalog`, credentials through `AccessPolicy`, errors through the domain exceptions.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from quiver.adapters.store import StoredAdapter
from quiver.server.api.access import AccessPolicy
from quiver.server.api.adapter_catalog import AdapterCatalog
from quiver.server.api.calls import CallLog, current_request_id
from quiver.server.api.generation import GenerationBackend
from quiver.server.api.metrics import ServerMetrics
from quiver.server.api.serving_state import ServingState
from quiver.server.http.admin import AdapterRoutes
from quiver.server.http.chat import ChatCompletions
from quiver.server.http.choices import TokenTexts
from quiver.server.http.completions import Completions
from quiver.server.http.embeddings import Classify, Embeddings
from quiver.server.http.errors import error_response
from quiver.server.http.gate import ROUTE_ACCESS, Gate
from quiver.server.http.translate import adapter_of

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class HttpContext:
    """What the HTTP front serves, all of it shared with the gRPC front."""

    generator: GenerationBackend
    catalog: AdapterCatalog
    policy: AccessPolicy
    calls: CallLog  # call records (access lines, per-adapter series) and, as `calls.metrics`, the server's metrics
    state: ServingState
    base_id: str  # the base model's id in `model`
    fingerprint: str  # the base model's fingerprint (OpenAI's `system_fingerprint` is derived from it)
    context_length: int
    max_body_bytes: int


def _epoch(iso: str) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return 0


class _Models:
    """GET /v1/models and /v1/models/{model}: the base model and every adapter registered for it."""

    def __init__(self, ctx: HttpContext) -> None:
        self._ctx = ctx
        self._created = int(time.time())

    def _base(self) -> dict[str, Any]:
        return {"id": self._ctx.base_id, "object": "model", "created": self._created, "owned_by": "quiver",
                "root": self._ctx.base_id, "parent": None, "max_model_len": self._ctx.context_length}

    def _adapter(self, stored: StoredAdapter) -> dict[str, Any]:
        m = stored.metadata
        return {"id": m.name, "object": "model", "created": _epoch(m.created_at), "owned_by": "quiver",
                "root": f"{m.name}@{m.version}", "parent": self._ctx.base_id, "kind": m.kind,
                "max_model_len": self._ctx.context_length, **({"labels": list(m.labels)} if m.labels else {})}

    async def list(self, request: Request) -> Response:
        adapters = await asyncio.to_thread(lambda: list(self._ctx.catalog.servable()))
        return JSONResponse({"object": "list", "data": [self._base(), *map(self._adapter, adapters)]})

    async def get(self, request: Request) -> Response:
        model = request.path_params["model"]
        if model == self._ctx.base_id:
            return JSONResponse(self._base())
        try:
            stored = await asyncio.to_thread(self._ctx.catalog.resolve, adapter_of(model, self._ctx.base_id), "model")
        except Exception as e:
            return error_response(e, {"adapter": "model", "model": "model"})
        return JSONResponse(self._adapter(stored))


def build_app(ctx: HttpContext) -> Gate:
    """The ASGI application (FastAPI routes inside the gate)."""
    app = FastAPI(title="Quiver", docs_url=None, redoc_url=None, openapi_url=None)
    texts = TokenTexts(ctx.generator.tokenizer)
    models = _Models(ctx)
    adapters = AdapterRoutes(ctx.catalog)
    routes: list[tuple[str, Any, list[str]]] = [
        ("/v1/completions", Completions(ctx.generator, ctx.base_id, texts).handle, ["POST"]),
        ("/v1/chat/completions", ChatCompletions(ctx.generator, ctx.base_id, texts, _short(ctx.fingerprint)).handle,
         ["POST"]),
        ("/v1/embeddings", Embeddings(ctx.generator, ctx.base_id).handle, ["POST"]),
        ("/v1/classify", Classify(ctx.generator, ctx.base_id).handle, ["POST"]),
        ("/v1/models", models.list, ["GET"]),
        ("/v1/models/{model:path}", models.get, ["GET"]),
        ("/v1/load_lora_adapter", adapters.load, ["POST"]),
        ("/v1/unload_lora_adapter", adapters.unload, ["POST"]),
        ("/metrics", _metrics(ctx.calls.metrics), ["GET"]),
        ("/health", _health(ctx.state), ["GET"]),
        ("/ready", _ready(ctx.state), ["GET"]),
    ]
    unguarded = {path for path, _, _ in routes} - ROUTE_ACCESS.keys()
    if unguarded:  # every route's access level is declared beside the gate's table: never by omission
        raise RuntimeError(f"routes without an access level in gate.ROUTE_ACCESS: {sorted(unguarded)}")
    for path, endpoint, methods in routes:
        app.add_route(path, endpoint, methods=methods)
    app.add_exception_handler(HTTPException, _http_exception)  # 404 / 405 in OpenAI's shape
    return Gate(app, ctx.policy, ctx.state, ctx.calls, ctx.max_body_bytes)


def _short(fingerprint: str) -> str:
    """OpenAI's `system_fingerprint` form, from the base model's fingerprint."""
    return "fp_" + fingerprint.removeprefix("sha256:")[:12]


def _metrics(metrics: ServerMetrics) -> Any:
    async def serve(request: Request) -> Response:
        return Response(await asyncio.to_thread(metrics.exposition), media_type=PROMETHEUS_TEXT)

    return serve


def _health(state: ServingState) -> Any:
    """Liveness: 200 unless the engine died or stalled (what a restart cures); loading and draining are alive."""
    async def health(request: Request) -> Response:
        return JSONResponse({"status": state.phase.value}, status_code=200 if state.live else 503)

    return health


def _ready(state: ServingState) -> Any:
    """Readiness: 200 only when a generation would be served now (as gRPC health's SERVING)."""
    async def ready(request: Request) -> Response:
        return JSONResponse({"status": state.phase.value}, status_code=200 if state.ready else 503)

    return ready


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "invalid_request_error"
    error: dict[str, object] = {"message": f"{request.method} {request.url.path}: {exc.detail}", "type": kind,
                                "param": None, "code": "not_found" if exc.status_code == 404 else None}
    if (request_id := current_request_id()) is not None:
        error["request_id"] = request_id
    body = {"error": error}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)  # a 405 keeps its Allow
