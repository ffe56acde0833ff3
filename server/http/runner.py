"""Running one HTTP request's choices on the core: prepare them all, then collect the events (non-streaming) or
send them as Server-Sent Events, ending the engine's work when the client goes away or the deadline passes.

A deadline comes from the `X-Request-Timeout` header (seconds), the HTTP counterpart of a gRPC deadline: past it
a non-streaming request answers 504, and a stream that has begun ends with an error event; either way the engine
frees the rows at its next step. A client that disconnects frees them too: a stream is cancelled by Starlette as
soon as the connection closes, and a non-streaming request watches its connection while it waits.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse

from quiver.server.errors import Cancelled, DeadlineExceeded, InvalidArgument, QuiverError
from quiver.server.generation import Generator
from quiver.server.http.errors import error_body
from quiver.server.request_builder import GenerationRequest
from quiver.server.streaming import EventStream

TIMEOUT_HEADER = "x-request-timeout"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def deadline_of(request: Request) -> float | None:
    """The loop time by which the request must end, from its X-Request-Timeout header (seconds > 0)."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidArgument("X-Request-Timeout", f"must be a number of seconds > 0, got {raw[:40]!r}")
    return asyncio.get_running_loop().time() + seconds


async def prepare_all(generator: Generator, specs: Any) -> list[GenerationRequest]:
    """Validate every choice before any runs: a bad request is refused whole."""
    prepared: list[GenerationRequest] = []
    for spec in specs:
        prepared.append(await generator.prepare(spec))
    return prepared


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - asyncio.get_running_loop().time())


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone away (after the body was read, receive() waits for exactly that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_done(request: Request, work: Awaitable[None], stream: EventStream, deadline: float | None) -> None:
    """Await `work` unless the client disconnects (Cancelled) or the deadline passes (DeadlineExceeded) first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, timeout=_remaining(deadline),
                                     return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        if watcher in done:
            raise Cancelled("the client went away")
        raise DeadlineExceeded("the request's X-Request-Timeout passed")
    finally:
        task.cancel()
        watcher.cancel()
        stream.cancel()


def _sse(data: object) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"


async def _sse_events(chunks: AsyncIterator[dict[str, Any]], stream: EventStream, deadline: float | None,
                      params: Mapping[str, str]) -> AsyncIterator[str]:
    iterator = chunks.__aiter__()
    try:
        while True:
            try:
                if deadline is None:
                    chunk = await iterator.__anext__()
                else:
                    chunk = await asyncio.wait_for(iterator.__anext__(), _remaining(deadline))
            except StopAsyncIteration:
                break
            yield _sse(chunk)
    except TimeoutError:
        yield _sse(error_body(DeadlineExceeded("the request's X-Request-Timeout passed"), params)[1])
    except QuiverError as e:  # the engine failed the request after the stream began
        yield _sse(error_body(e, params)[1])
    finally:
        stream.cancel()
    yield "data: [DONE]\n\n"


def sse_response(chunks: AsyncIterator[dict[str, Any]], stream: EventStream, deadline: float | None,
                 params: Mapping[str, str]) -> StreamingResponse:
    """The chunks as Server-Sent Events ending with `data: [DONE]`; an error after the start is an error event."""
    return StreamingResponse(_sse_events(chunks, stream, deadline, params), media_type="text/event-stream",
                             headers=SSE_HEADERS)


Handler = Callable[[Request], Awaitable[Any]]
