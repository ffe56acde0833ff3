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
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from quiver.server.api.generation import EventSource, GenerationBackend
from quiver.server.engine.generation_events import GenerationEvent
from quiver.server.http.choices import (
    TokenTexts,
    completion_logprobs,
    generated,
    joined,
    scored_prompt,
    usage,
)
from quiver.server.http.runner import Run, serve_choices
from quiver.server.http.schema import CompletionRequest, parse
from quiver.server.http.translate import COMPLETION_PARAMS, Choices, completion_choices


class Completions:
    """The Completions endpoint's part of `serve_choices`."""

    params = COMPLETION_PARAMS

    def __init__(self, generator: GenerationBackend, base_id: str, texts: TokenTexts) -> None:
        self._generator = generator
        self._base_id = base_id
        self._texts = texts

    async def handle(self, request: Request) -> Response:
        return await serve_choices(request, self._generator, self)

    def choices(self, raw: bytes) -> tuple[CompletionRequest, Choices]:
        body = parse(CompletionRequest, raw)
        return body, completion_choices(body, self._base_id)

    def head(self, body: CompletionRequest) -> dict[str, Any]:
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model}

    def _echo(self, run: Run, i: int) -> tuple[str, list[tuple[int, Any]]]:
        """The prompt's text and scored tokens, for an echo."""
        ids = run.prepared[i].prompt_ids
        return self._texts.prompt_text(ids), scored_prompt(ids, run.states[i].prompt_logprobs)

    def reply(self, run: Run) -> dict[str, Any]:
        out = []
        for state in run.states:
            prefix, tokens = self._echo(run, state.index) if run.body.echo else ("", [])
            logprobs = None
            if run.body.logprobs is not None:  # the generated tokens' offsets start where the echoed prompt ends
                logprobs = joined(completion_logprobs(self._texts, tokens, 0),
                                  completion_logprobs(self._texts, generated(state.logprobs), len(prefix)))
            out.append({"index": state.index, "text": prefix + state.text, "logprobs": logprobs,
                        "finish_reason": state.finish_reason})
        return {**run.head, "choices": out, "usage": usage(run.states, run.n)}

    async def chunks(self, run: Run, stream: EventSource) -> AsyncIterator[dict[str, Any]]:
        include_usage = run.body.stream_options is not None and run.body.stream_options.include_usage
        extra = {"usage": None} if include_usage else {}
        async for i, event in stream:
            run.states[i].add(event)
            yield {**run.head, "choices": [self._chunk_choice(run, i, event)], **extra}
        if include_usage:
            yield {**run.head, "choices": [], "usage": usage(run.states, run.n)}

    def _chunk_choice(self, run: Run, i: int, event: GenerationEvent) -> dict[str, Any]:
        state, first = run.states[i], run.states[i].completion_tokens == len(event.token_ids)
        prefix, tokens = self._echo(run, i) if run.body.echo and first else ("", [])
        logprobs = None
        if run.body.logprobs is not None:
            logprobs = joined(completion_logprobs(self._texts, tokens, run.sent[i]),
                              completion_logprobs(self._texts, generated(list(event.logprobs)),
                                                  run.sent[i] + len(prefix)))
        text = prefix + event.text
        run.sent[i] += len(text)
        finish = state.finish_reason if event.finish_reason is not None else None
        return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}
