"""The SSE response cancels the engine's work however it ends, even when the client left before the first chunk."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from quiver.server.http.runner import sse_response


class FakeStream:
    """Stands for a submitted EventStream: records whether its requests were cancelled."""

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def test_a_client_gone_before_the_first_chunk_still_cancels_the_work():
    started = False

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        nonlocal started
        started = True
        await asyncio.sleep(10)
        yield {}

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}  # already gone

    async def send(message: dict[str, Any]) -> None:
        await asyncio.sleep(0.5)  # the response head is still being written when the disconnect is seen

    stream = FakeStream()
    response = sse_response(chunks(), stream, None, {})  # type: ignore[arg-type]
    scope = {"type": "http", "asgi": {"spec_version": "2.3"}, "method": "POST", "path": "/"}
    asyncio.run(asyncio.wait_for(response(scope, receive, send), 5))
    assert stream.cancelled and not started
