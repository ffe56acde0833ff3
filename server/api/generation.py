"""The generation service every front calls: validate and tokenize off the event loop, run on the engine, time.

gRPC (server/grpc_front/service.py) and HTTP (server/http/) differ only in how they translate their messages into a
`GenerationInput` and events back into replies; what a request may ask for, how it is tokenized and how its
tokens are timed is decided here, once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from quiver.server.api.calls import CURRENT_CALL
from quiver.server.api.generation_input import GenerationInput
from quiver.server.api.metrics import ServerMetrics
from quiver.server.api.request_builder import RequestBuilder
from quiver.server.api.streaming import EventStream
from quiver.server.engine.engine import Engine
from quiver.server.engine.generation_events import GenerationEvent
from quiver.server.engine.request import GenerationRequest


class EventSource(Protocol):
    """Submitted requests' events (server/api/streaming.py's EventStream, or one across processes)."""

    def cancel(self) -> None: ...

    def __aiter__(self) -> AsyncIterator[tuple[int, GenerationEvent]]: ...

    def events(self) -> AsyncIterator[GenerationEvent]: ...


class GenerationBackend(Protocol):
    """What a front needs to generate: `Generator` on a local engine, or Ray Serve's replicas
    (server/ray_serve/remote.py)."""

    @property
    def tokenizer(self) -> Any: ...

    async def prepare(self, spec: GenerationInput) -> GenerationRequest: ...

    def run(self, requests: Sequence[GenerationRequest]) -> EventSource: ...


INLINE_PROMPT_CHARS = 2048


def _size(spec: GenerationInput) -> int:
    """Characters (or token ids) of a request's prompt."""
    return len(spec.text or "") + sum(len(m.content) for m in spec.messages or ()) + len(spec.token_ids or ())


class Generator:
    """Runs `GenerationInput`s on one engine."""

    def __init__(self, engine: Engine, builder: RequestBuilder, metrics: ServerMetrics | None = None) -> None:
        self._engine = engine
        self._builder = builder
        self._metrics = metrics

    @property
    def tokenizer(self) -> Any:
        return self._builder.tokenizer

    async def prepare(self, spec: GenerationInput) -> GenerationRequest:
        """Validate and tokenize `spec`; raises the domain error of the first problem found."""
        record = CURRENT_CALL.get()
        if record is not None and spec.adapter:
            record.adapter = spec.adapter
        # Tokenizing and templating take real CPU time on long prompts, and resolving an adapter reads its store (a
        # disk, or S3): those go off the event loop. A short base-model prompt takes well under a millisecond, less
        # than the hop to a worker thread while the engine keeps the cores busy.
        if not spec.adapter and _size(spec) <= INLINE_PROMPT_CHARS:
            request = self._builder.build(spec)
        else:
            request = await asyncio.to_thread(self._builder.build, spec)
        self._engine.check_queue()  # after validation: a request that can never run hears why, not "retry later"
        if record is not None and record.keep_prompt:
            prompt = self._builder.tokenizer.decode(request.prompt_ids)
            record.prompt = prompt if record.prompt is None else f"{record.prompt}\n{prompt}"
        return request

    def run(self, requests: Sequence[GenerationRequest]) -> EventStream:
        """Submit `requests` now (a refusal raises here) and stream their events; leaving the stream early cancels
        them (the engine frees their rows). The call's record (if any) collects their tokens and timings."""
        record = CURRENT_CALL.get()
        timers = [self._metrics.timer(r, record) if self._metrics is not None else None for r in requests]
        return EventStream(self._engine, requests, timers)
