"""gRPC GenerationService: validates requests off the event loop, runs them on the engine, shapes replies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from quiver.server.engine import Engine
from quiver.server.generation_events import FinishReason, GenerationEvent
from quiver.server.metrics import RequestTimer, ServerMetrics
from quiver.server.request_builder import GenerationRequest, RequestBuilder, WireRequest
from quiver.server.streaming import stream_events
from quiver.v1 import generation_pb2 as pb
from quiver.v1 import generation_pb2_grpc as pb_grpc

_FINISH_REASONS: dict[FinishReason, pb.FinishReason.ValueType] = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.EOS_TOKEN: pb.FINISH_REASON_EOS_TOKEN,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
}


def _usage(event: GenerationEvent) -> pb.Usage:
    return pb.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens)


def _logprobs(event: GenerationEvent) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                        top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])
        for lp in event.logprobs
    ]


class GenerationService(pb_grpc.GenerationServiceServicer):
    """Implements quiver.v1.GenerationService over one engine."""

    def __init__(
        self, engine: Engine, builder: RequestBuilder, model_info: pb.ModelInfoResponse,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self._engine = engine
        self._builder = builder
        self._model_info = model_info
        self._metrics = metrics

    def _timer(self, request: GenerationRequest) -> RequestTimer | None:
        return self._metrics.timer(request) if self._metrics is not None else None

    async def _prepare(self, request: WireRequest) -> GenerationRequest:
        # Tokenizing and templating take real CPU time on long prompts: keep them off the event loop.
        return await asyncio.to_thread(self._builder.build, request)

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        prepared = await self._prepare(request)
        response = pb.GenerateResponse()
        texts = []
        async for event in stream_events(self._engine, prepared, self._timer(prepared)):
            texts.append(event.text)
            response.token_ids.extend(event.token_ids)
            response.logprobs.extend(_logprobs(event))
            if event.finish_reason is not None:
                response.finish_reason = _FINISH_REASONS[event.finish_reason]
                response.usage.CopyFrom(_usage(event))
        response.text = "".join(texts)
        return response

    async def GenerateStream(
        self, request: pb.GenerateStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        prepared = await self._prepare(request)
        async for event in stream_events(self._engine, prepared, self._timer(prepared)):
            message = pb.GenerateStreamResponse(text=event.text, token_ids=event.token_ids,
                                                logprobs=_logprobs(event))
            if event.finish_reason is not None:
                message.finish_reason = _FINISH_REASONS[event.finish_reason]
                message.usage.CopyFrom(_usage(event))
            yield message

    async def ModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfoResponse:
        return self._model_info
