"""POST /v1/completions: OpenAI's (legacy) Completions API on the generation core.

`prompt` is a string, a list of strings, token ids or a list of token-id lists; each prompt runs `n` times.
`echo` returns the prompt (as the model saw it: the adapter's template applied) before the completion, and with
`logprobs` the log-probabilities of the prompt's own tokens, the first one null, which is how evaluation
harnesses score log-likelihoods (`max_tokens: 1, echo: true, logprobs: 1`).
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
from quiver.server.http.choices import (
    ChoiceState,
    TokenTexts,
    completion_logprobs,
    generated,
    scored_prompt,
    usage,
)
from quiver.server.http.errors import error_response
from quiver.server.http.runner import deadline_of, prepare_all, sse_response, until_done
from quiver.server.http.schema import CompletionRequest, parse
from quiver.server.http.translate import COMPLETION_PARAMS, completion_choices
from quiver.server.request_builder import GenerationRequest
from quiver.server.streaming import EventStream


@dataclass
class _Call:
    """One request in flight: what was asked, what runs, and the shared parts of every object sent back."""

    body: CompletionRequest
    prepared: list[GenerationRequest]
    n: int
    head: dict[str, Any]  # id, object, created, model
    states: list[ChoiceState]
    sent: list[int]  # characters of each choice's text sent so far (a stream's text offsets)


class Completions:
    def __init__(self, generator: Generator, base_id: str, texts: TokenTexts) -> None:
        self._generator = generator
        self._base_id = base_id
        self._texts = texts

    async def handle(self, request: Request) -> Response:
        params = COMPLETION_PARAMS
        try:
            deadline = deadline_of(request)
            body = parse(CompletionRequest, await request.body())
            choices = completion_choices(body, self._base_id)
            prepared = await prepare_all(self._generator, choices.inputs)
            stream = self._generator.run(prepared)
        except QuiverError as e:
            return error_response(e, params)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model}
        call = _Call(body, prepared, choices.n, head, [ChoiceState(i) for i in range(len(prepared))],
                     [0] * len(prepared))
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

    def _echo(self, call: _Call, i: int) -> tuple[str, list[tuple[int, Any]]]:
        """The prompt's text and scored tokens, for an echo."""
        ids = call.prepared[i].prompt_ids
        return self._texts.prompt_text(ids), scored_prompt(ids, call.states[i].prompt_logprobs)

    def _body(self, call: _Call) -> dict[str, Any]:
        out = []
        for state in call.states:
            prefix, tokens = self._echo(call, state.index) if call.body.echo else ("", [])
            logprobs = None
            if call.body.logprobs is not None:
                logprobs = completion_logprobs(self._texts, [*tokens, *generated(state.logprobs)], 0)
            out.append({"index": state.index, "text": prefix + state.text, "logprobs": logprobs,
                        "finish_reason": state.finish_reason})
        return {**call.head, "choices": out, "usage": usage(call.states, call.n)}

    async def _chunks(self, call: _Call, stream: EventStream) -> AsyncIterator[dict[str, Any]]:
        include_usage = call.body.stream_options is not None and call.body.stream_options.include_usage
        extra = {"usage": None} if include_usage else {}
        async for i, event in stream:
            call.states[i].add(event)
            yield {**call.head, "choices": [self._chunk_choice(call, i, event)], **extra}
        if include_usage:
            yield {**call.head, "choices": [], "usage": usage(call.states, call.n)}

    def _chunk_choice(self, call: _Call, i: int, event: GenerationEvent) -> dict[str, Any]:
        state, first = call.states[i], call.states[i].completion_tokens == len(event.token_ids)
        prefix, tokens = self._echo(call, i) if call.body.echo and first else ("", [])
        logprobs = None
        if call.body.logprobs is not None:
            logprobs = completion_logprobs(self._texts, [*tokens, *generated(list(event.logprobs))], call.sent[i])
        text = prefix + event.text
        call.sent[i] += len(text)
        finish = state.finish_reason if event.finish_reason is not None else None
        return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}
