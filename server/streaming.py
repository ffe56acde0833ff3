"""Bridges the engine thread to asyncio: a request's events as an async iterator.

Leaving the iterator early (the call was cancelled or its deadline passed) cancels the request, so the
engine frees its sequence at the next step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from quiver.server.engine import Engine
from quiver.server.generation_events import GenerationEvent
from quiver.server.metrics import RequestTimer
from quiver.server.request_builder import GenerationRequest


async def stream_events(
    engine: Engine, request: GenerationRequest, timer: RequestTimer | None = None
) -> AsyncIterator[GenerationEvent]:
    """Yield the request's events up to and including the final one; raise the engine's error if any.

    `timer`, if given, sees every event as it reaches this coroutine: the latency a caller sees."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[GenerationEvent] = asyncio.Queue()
    handle = engine.submit(request, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
    try:
        while True:
            event = await events.get()
            if timer is not None:
                timer.on_event(event)
            if event.error is not None:
                raise event.error
            yield event
            if event.finish_reason is not None:
                return
    finally:
        handle.cancel()
