"""Ray Serve's ingress deployment: the OpenAI-compatible HTTP routes (the same FastAPI application as the
single-process server) and Quiver's gRPC GenerationService (through Ray Serve's gRPC proxy), both over
`RemoteGenerator`, so requests are validated here and run on the engine replicas.

Adapter registration and deletion (vLLM's HTTP routes) go to the shared store, which every replica reads: an
adapter registered through any ingress replica is served by every engine replica.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from quiver.common.errors import QuiverError
from quiver.server.api.access import Access, bearer_token
from quiver.server.api.calls import CallLog
from quiver.server.api.core import access_policy, adapter_catalog, request_builder, served_model_name
from quiver.server.api.metrics import ServerMetrics
from quiver.server.api.serving_state import ServingState
from quiver.server.config import AdapterConfig, EngineConfig, ModelConfig
from quiver.server.grpc_front.interceptors import status_code
from quiver.server.grpc_front.service import GenerationService
from quiver.server.http.app import HttpContext, build_app
from quiver.server.model.model_loader import load_model_view
from quiver.server.ray_serve.remote import RemoteGenerator
from quiver.v1 import generation_pb2 as pb

T = TypeVar("T")


class Ingress:
    """HTTP (via `__serve_build_asgi_app__`) and gRPC (methods named as the RPCs) onto the engine deployment."""

    def __init__(self, engine: Any, model: ModelConfig, engine_config: EngineConfig, adapters: AdapterConfig,
                 served_name: str | None = None, api_key: str | None = None,
                 max_request_bytes: int = 4 * 2**20) -> None:
        view = load_model_view(model)  # the tokenizer and identity; the weights stay on the engine replicas
        self._engine = engine
        self._base_id = served_model_name(served_name, view)
        catalog = adapter_catalog(view, adapters, engine_config, self._base_id)
        self._generator = RemoteGenerator(request_builder(view, engine_config, catalog), engine)
        self._policy = access_policy(api_key, adapters)
        self._http = HttpContext(self._generator, catalog, self._policy, CallLog(ServerMetrics()), ServingState(),
                                 self._base_id, view.fingerprint, view.context_length, max_request_bytes)
        self._service: GenerationService | None = None

    def __serve_build_asgi_app__(self) -> Any:
        return build_app(self._http)

    async def _grpc(self, grpc_context: Any) -> GenerationService:
        """The gRPC service, once the caller's key is checked (model info comes from an engine replica)."""
        metadata = dict(grpc_context.invocation_metadata())
        self._policy.check(Access.INFERENCE, bearer_token(metadata.get("authorization")))
        if self._service is None:
            info = await self._engine.model_info.remote()
            response = pb.ModelInfoResponse(model_name=info.pop("name"), **info)
            self._service = GenerationService(self._generator, response)
        return self._service

    @staticmethod
    def _fail(grpc_context: Any, error: QuiverError) -> None:
        grpc_context.set_code(status_code(error))
        grpc_context.set_details(error.message)

    async def _unary(self, grpc_context: Any, call: Callable[[GenerationService], Awaitable[T]]) -> T:
        try:
            return await call(await self._grpc(grpc_context))
        except QuiverError as e:
            self._fail(grpc_context, e)
            raise

    async def Generate(self, request: pb.GenerateRequest, grpc_context: Any) -> pb.GenerateResponse:
        return await self._unary(grpc_context, lambda service: service.Generate(request, grpc_context))

    async def Embed(self, request: pb.EmbedRequest, grpc_context: Any) -> pb.EmbedResponse:
        return await self._unary(grpc_context, lambda service: service.Embed(request, grpc_context))

    async def Classify(self, request: pb.ClassifyRequest, grpc_context: Any) -> pb.ClassifyResponse:
        return await self._unary(grpc_context, lambda service: service.Classify(request, grpc_context))

    async def ModelInfo(self, request: pb.ModelInfoRequest, grpc_context: Any) -> pb.ModelInfoResponse:
        return await self._unary(grpc_context, lambda service: service.ModelInfo(request, grpc_context))

    async def GenerateStream(
        self, request: pb.GenerateStreamRequest, grpc_context: Any
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        try:
            service = await self._grpc(grpc_context)
            async for message in service.GenerateStream(request, grpc_context):
                yield message
        except QuiverError as e:
            self._fail(grpc_context, e)
            raise
