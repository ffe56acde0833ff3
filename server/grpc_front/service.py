"""gRPC GenerationService: translates proto messages to and from the core (server/api/generation.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeAlias

import grpc

from quiver.common.errors import InvalidArgument
from quiver.server.api.embeddings import Embedder, EmbeddingInput
from quiver.server.api.generation import GenerationBackend
from quiver.server.api.generation_input import ChatMessage, GenerationInput
from quiver.server.engine.generation_events import FinishReason, GenerationEvent
from quiver.server.engine.logprobs import TokenLogprob
from quiver.server.engine.pooling import EmbedSpec, Pooling
from quiver.server.engine.request import GenerationRequest
from quiver.v1 import generation_pb2 as pb
from quiver.v1 import generation_pb2_grpc as pb_grpc

_FINISH_REASONS: dict[FinishReason, pb.FinishReason.ValueType] = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.EOS_TOKEN: pb.FINISH_REASON_EOS_TOKEN,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
}
# The core's field names (server/api/generation_input.py) as the proto spells them.
FIELD_NAMES = {
    **{name: f"sampling.{name}" for name in ("temperature", "top_p", "top_k", "repetition_penalty", "seed")},
    "max_new_tokens": "stopping.max_new_tokens",
    "stop_sequences": "stopping.stop_sequences",
    "messages": "chat.messages",
    "token_ids": "tokens.ids",
}
_SAMPLING = ("temperature", "top_p", "top_k", "repetition_penalty", "seed")

WireRequest: TypeAlias = pb.GenerateRequest | pb.GenerateStreamRequest


def generation_input(request: WireRequest) -> GenerationInput:
    """The core's view of a GenerateRequest or GenerateStreamRequest."""
    kind = request.WhichOneof("input")
    sampling, stopping = request.sampling, request.stopping
    return GenerationInput(
        adapter=request.adapter,
        text=request.text if kind == "text" else None,
        messages=tuple(ChatMessage(m.role, m.content) for m in request.chat.messages) if kind == "chat" else None,
        token_ids=tuple(request.tokens.ids) if kind == "tokens" else None,
        **{name: getattr(sampling, name) if sampling.HasField(name) else None for name in _SAMPLING},
        max_new_tokens=stopping.max_new_tokens if stopping.HasField("max_new_tokens") else None,
        stop_sequences=tuple(stopping.stop_sequences),
        ignore_eos=stopping.ignore_eos,
        logprobs=request.logprobs if request.HasField("logprobs") else None,
        prompt_logprobs=request.prompt_logprobs if request.HasField("prompt_logprobs") else None,
    )


_POOLING = {pb.POOLING_UNSPECIFIED: Pooling.MEAN, pb.POOLING_MEAN: Pooling.MEAN, pb.POOLING_LAST: Pooling.LAST}
EMBED_FIELD_NAMES = {"input": "inputs"}


def embedding_input(request: pb.EmbedRequest) -> EmbeddingInput:
    """The core's view of an EmbedRequest."""
    if request.pooling not in _POOLING:
        raise InvalidArgument("pooling", f"unknown pooling {request.pooling}")
    inputs: list[str | tuple[int, ...]] = []
    for i, one in enumerate(request.inputs):
        kind = one.WhichOneof("input")
        if kind is None:
            raise InvalidArgument(f"inputs[{i}]", "set text or tokens")
        inputs.append(one.text if kind == "text" else tuple(one.tokens.ids))
    normalize = request.normalize if request.HasField("normalize") else True
    return EmbeddingInput(tuple(inputs), request.adapter, EmbedSpec(_POOLING[request.pooling], normalize))


def _usage(event: GenerationEvent) -> pb.Usage:
    return pb.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens)


def _logprob(lp: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                           top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])


def _logprobs(event: GenerationEvent) -> list[pb.TokenLogprob]:
    return [_logprob(lp) for lp in event.logprobs]


def _prompt_logprobs(event: GenerationEvent) -> list[pb.TokenLogprob]:
    """The prompt's tokens after the first (which has no log-probability), in order."""
    return [_logprob(lp) for lp in event.prompt_logprobs if lp is not None]


class GenerationService(pb_grpc.GenerationServiceServicer):
    """Implements quiver.v1.GenerationService over the generation core."""

    def __init__(self, generator: GenerationBackend, model_info: pb.ModelInfoResponse) -> None:
        self._generator = generator
        self._embedder = Embedder(generator)
        self._model_info = model_info

    async def _prepare(self, request: WireRequest) -> GenerationRequest:
        try:
            return await self._generator.prepare(generation_input(request))
        except InvalidArgument as e:
            raise e.renamed(FIELD_NAMES) from None

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        prepared = await self._prepare(request)
        response = pb.GenerateResponse()
        texts = []
        async for event in self._generator.run([prepared]).events():
            texts.append(event.text)
            response.token_ids.extend(event.token_ids)
            response.logprobs.extend(_logprobs(event))
            response.prompt_logprobs.extend(_prompt_logprobs(event))
            if event.finish_reason is not None:
                response.finish_reason = _FINISH_REASONS[event.finish_reason]
                response.usage.CopyFrom(_usage(event))
        response.text = "".join(texts)
        return response

    async def GenerateStream(
        self, request: pb.GenerateStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        prepared = await self._prepare(request)
        async for event in self._generator.run([prepared]).events():
            message = pb.GenerateStreamResponse(text=event.text, token_ids=event.token_ids,
                                                logprobs=_logprobs(event),
                                                prompt_logprobs=_prompt_logprobs(event))
            if event.finish_reason is not None:
                message.finish_reason = _FINISH_REASONS[event.finish_reason]
                message.usage.CopyFrom(_usage(event))
            yield message

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        try:
            done = await self._embedder.embed(embedding_input(request))
        except InvalidArgument as e:
            raise e.renamed(EMBED_FIELD_NAMES) from None
        return pb.EmbedResponse(
            embeddings=[pb.Embedding(values=v, prompt_tokens=n) for v, n in zip(done.vectors, done.prompt_tokens,
                                                                                  strict=True)],
            usage=pb.Usage(prompt_tokens=done.total_tokens),
        )

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        inputs = embedding_input(pb.EmbedRequest(adapter=request.adapter, inputs=request.inputs))
        try:
            done = await self._embedder.classify(inputs)
        except InvalidArgument as e:
            raise e.renamed(EMBED_FIELD_NAMES) from None
        results = [
            pb.Classification(labels=[pb.LabelProbability(label=label, probability=p)
                                      for label, p in zip(done.labels, probabilities, strict=True)],
                              prompt_tokens=tokens)
            for probabilities, tokens in zip(done.probabilities, done.prompt_tokens, strict=True)
        ]
        return pb.ClassifyResponse(results=results, usage=pb.Usage(prompt_tokens=done.total_tokens))

    async def ModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfoResponse:
        return self._model_info
