"""Bridges the engine thread to asyncio: the events of one or several submitted requests as an async iterator.

Requests are submitted when the stream is made, so a refusal (queue full, a generation the cache can never
hold, shutting down) raises there, before a front has sent anything. Several requests (the choices of one HTTP
request) share one queue and arrive interleaved, tagged by their index. Leaving the iteration early (the call was
cancelled, its deadline passed, the client went away) or `cancel()` cancels every request still running, so the
engine frees their sequences at its next step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from quiver.server.api.metrics import RequestTimer
from quiver.server.engine.engine import Engine
from quiver.server.engine.generation_events import GenerationEvent, RequestHandle
from quiver.server.engine.request import GenerationRequest


class EventStream:
    """Submitted requests' events, `(index, event)` in arrival order, up to each one's final event."""

    def __init__(
        self, engine: Engine, requests: Sequence[GenerationRequest], timers: Sequence[RequestTimer | None] = ()
    ) -> None:
        loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[tuple[int, GenerationEvent]] = asyncio.Queue()
        self._timers = list(timers) or [None] * len(requests)
        self._handles: list[RequestHandle] = []
        try:
            for i, request in enumerate(requests):
                def sink(event: GenerationEvent, i: int = i) -> None:
                    loop.call_soon_threadsafe(self._events.put_nowait, (i, event))

                self._handles.append(engine.submit(request, sink))
        except BaseException:
            self.cancel()  # the ones already submitted
            raise

    def cancel(self) -> None:
        for handle in self._handles:
            handle.cancel()

    async def __aiter__(self) -> AsyncIterator[tuple[int, GenerationEvent]]:
        """Raise the first error a request reports (the others are cancelled)."""
        running = len(self._handles)
        try:
            while running:
                i, event = await self._events.get()
                timer = self._timers[i]
                if timer is not None:
                    timer.on_event(event)
                if event.error is not None:
                    raise event.error
                yield i, event
                if event.finish_reason is not None:
                    running -= 1
        finally:
            self.cancel()

    async def events(self) -> AsyncIterator[GenerationEvent]:
        """The events of a stream of one request."""
        try:
            async for _, event in self:
                yield event
        finally:
            self.cancel()  # also when this generator is closed at its yield, before the inner one
