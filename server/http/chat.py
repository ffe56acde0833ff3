"""POST /v1/chat/completions: OpenAI's Chat Completions API on the generation core.

Messages render through the model's chat template, the adapter's prompt template wrapping the last user turn,
exactly as a gRPC chat request. `logprobs: true` (with `top_logprobs` alternatives) reports each generated
token; a stream sends every choice's role first, then its content as it is decoded.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from quiver.server.api.generation import EventSource, GenerationBackend
from quiver.server.engine.generation_events import GenerationEvent
from quiver.server.http.choices import TokenTexts, chat_logprobs, usage
from quiver.server.http.runner import Run, serve_choices
from quiver.server.http.schema import ChatCompletionRequest, parse
from quiver.server.http.translate import CHAT_PARAMS, Choices, chat_choices


class ChatCompletions:
    """The Chat Completions endpoint's part of `serve_choices`."""

    params = CHAT_PARAMS

    def __init__(self, generator: GenerationBackend, base_id: str, texts: TokenTexts, fingerprint: str) -> None:
        self._generator = generator
        self._base_id = base_id
        self._texts = texts
        self._fingerprint = fingerprint

    async def handle(self, request: Request) -> Response:
        return await serve_choices(request, self._generator, self)

    def choices(self, raw: bytes) -> tuple[ChatCompletionRequest, Choices]:
        body = parse(ChatCompletionRequest, raw)
        return body, chat_choices(body, self._base_id)

    def head(self, body: ChatCompletionRequest) -> dict[str, Any]:
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model,
                "system_fingerprint": self._fingerprint}

    def reply(self, run: Run) -> dict[str, Any]:
        choices = [{
            "index": state.index,
            "message": {"role": "assistant", "content": state.text},
            "logprobs": chat_logprobs(self._texts, state.logprobs) if run.body.logprobs else None,
            "finish_reason": state.finish_reason,
        } for state in run.states]
        return {**run.head, "object": "chat.completion", "choices": choices, "usage": usage(run.states, run.n)}

    async def chunks(self, run: Run, stream: EventSource) -> AsyncIterator[dict[str, Any]]:
        include_usage = run.body.stream_options is not None and run.body.stream_options.include_usage
        head = {**run.head, "object": "chat.completion.chunk", **({"usage": None} if include_usage else {})}
        for state in run.states:
            role = {"index": state.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None}
            yield {**head, "choices": [role]}
        async for i, event in stream:
            run.states[i].add(event)
            yield {**head, "choices": [self._chunk_choice(run, i, event)]}
        if include_usage:
            yield {**head, "choices": [], "usage": usage(run.states, run.n)}

    def _chunk_choice(self, run: Run, i: int, event: GenerationEvent) -> dict[str, Any]:
        final = event.finish_reason is not None
        delta = {"content": event.text} if event.text or not final else {}
        logprobs = chat_logprobs(self._texts, list(event.logprobs)) if run.body.logprobs else None
        return {"index": i, "delta": delta, "logprobs": logprobs,
                "finish_reason": run.states[i].finish_reason if final else None}
