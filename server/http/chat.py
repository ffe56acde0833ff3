"""POST /v1/chat/completions: OpenAI's Chat Completions API on the generation core.

Messages render through the model's chat template, the adapter's prompt template wrapping the last user turn,
exactly as a gRPC chat request. `logprobs: true` (with `top_logprobs` alternatives) reports each generated
token; a stream sends every choice's role first, then its content as it is decoded.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from quiver.server.errors import QuiverError
from quiver.server.generation import Generator
from quiver.server.generation_events import GenerationEvent
from quiver.server.http.choices import ChoiceState, TokenTexts, chat_logprobs, usage
from quiver.server.http.errors import error_response
from quiver.server.http.runner import deadline_of, prepare_all, sse_response, until_done
from quiver.server.http.schema import ChatCompletionRequest, parse
from quiver.server.http.translate import CHAT_PARAMS, chat_choices
from quiver.server.streaming import EventStream


@dataclass
class _Call:
    body: ChatCompletionRequest
    n: int
    head: dict[str, Any]  # id, object, created, model, system_fingerprint
    states: list[ChoiceState]


class ChatCompletions:
    def __init__(self, generator: Generator, base_id: str, texts: TokenTexts, fingerprint: str) -> None:
        self._generator = generator
        self._base_id = base_id
        self._texts = texts
        self._fingerprint = fingerprint

    async def handle(self, request: Request) -> Response:
        params = CHAT_PARAMS
        try:
            deadline = deadline_of(request)
            body = parse(ChatCompletionRequest, await request.body())
            choices = chat_choices(body, self._base_id)
            params = choices.params
            prepared = await prepare_all(self._generator, choices.inputs)
            stream = self._generator.run(prepared)
        except QuiverError as e:
            return error_response(e, params)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model,
                "system_fingerprint": self._fingerprint}
        call = _Call(body, choices.n, head, [ChoiceState(i) for i in range(len(prepared))])
        if body.stream:
            return sse_response(self._chunks(call, stream), stream, deadline, params)
        try:
            await until_done(request, self._collect(call, stream), stream, deadline)
        except QuiverError as e:
            return error_response(e, params)
        return JSONResponse(self._body(call))

    @staticmethod
    async def _collect(call: _Call, stream: EventStream) -> None:
        async for i, event in stream:
            call.states[i].add(event)

    def _body(self, call: _Call) -> dict[str, Any]:
        choices = [{
            "index": state.index,
            "message": {"role": "assistant", "content": state.text},
            "logprobs": chat_logprobs(self._texts, state.logprobs) if call.body.logprobs else None,
            "finish_reason": state.finish_reason,
        } for state in call.states]
        return {**call.head, "object": "chat.completion", "choices": choices, "usage": usage(call.states, call.n)}

    async def _chunks(self, call: _Call, stream: EventStream) -> AsyncIterator[dict[str, Any]]:
        include_usage = call.body.stream_options is not None and call.body.stream_options.include_usage
        head = {**call.head, "object": "chat.completion.chunk", **({"usage": None} if include_usage else {})}
        for state in call.states:
            role = {"index": state.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None}
            yield {**head, "choices": [role]}
        async for i, event in stream:
            call.states[i].add(event)
            yield {**head, "choices": [self._chunk_choice(call, i, event)]}
        if include_usage:
            yield {**head, "choices": [], "usage": usage(call.states, call.n)}

    def _chunk_choice(self, call: _Call, i: int, event: GenerationEvent) -> dict[str, Any]:
        final = event.finish_reason is not None
        delta = {"content": event.text} if event.text or not final else {}
        logprobs = chat_logprobs(self._texts, list(event.logprobs)) if call.body.logprobs else None
        return {"index": i, "delta": delta, "logprobs": logprobs,
                "finish_reason": call.states[i].finish_reason if final else None}
