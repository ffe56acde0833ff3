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
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from quiver.common.errors import Cancelled, DeadlineExceeded, InvalidArgument
from quiver.server.api.generation import EventSource, GenerationBackend
from quiver.server.engine.request import GenerationRequest
from quiver.server.http.choices import ChoiceState
from quiver.server.http.errors import error_body, error_response
from quiver.server.http.translate import Choices

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


async def prepare_all(generator: GenerationBackend, specs: Any) -> list[GenerationRequest]:
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


async def until_done(request: Request, work: Awaitable[None], stream: EventSource, deadline: float | None) -> None:
    """Await `work` unless the client disconnects (Cancelled) or the deadline passes (DeadlineExceeded) first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, timeout=_remaining(deadline),
                                     return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        if watcher in done:
            watcher.result()  # a failure of the watch itself is raised as it is
            raise Cancelled("the client went away")
        raise DeadlineExceeded("the request's X-Request-Timeout passed")
    finally:
        task.cancel()
        watcher.cancel()
        stream.cancel()


def _sse(data: object) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"


async def _sse_events(chunks: AsyncIterator[dict[str, Any]], stream: EventSource, deadline: float | None,
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
    except Exception as e:  # the request failed after the stream began (a bug too: error_body logs it, 500)
        yield _sse(error_body(e, params)[1])
    finally:
        stream.cancel()
    yield "data: [DONE]\n\n"


class _EventStreamResponse(StreamingResponse):
    """Cancels the engine's work whenever the response ends, including when the client left before the first
    chunk (Starlette then cancels the body's task before the chunks' generator ever starts)."""

    def __init__(self, content: AsyncIterator[str], stream: EventSource) -> None:
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._stream.cancel()


def sse_response(chunks: AsyncIterator[dict[str, Any]], stream: EventSource, deadline: float | None,
                 params: Mapping[str, str]) -> StreamingResponse:
    """The chunks as Server-Sent Events ending with `data: [DONE]`; an error after the start is an error event."""
    return _EventStreamResponse(_sse_events(chunks, stream, deadline, params), stream)



@dataclass
class Run:
    """One request's choices in flight: what was asked, what runs, what each choice has produced."""

    body: Any  # the parsed request (CompletionRequest or ChatCompletionRequest)
    n: int  # choices per prompt
    prepared: list[GenerationRequest]
    head: dict[str, Any]  # fields every object sent back starts with (id, object, created, model...)
    states: list[ChoiceState]
    sent: list[int]  # characters of each choice's text sent so far (a stream's text offsets)


class ChoicesEndpoint(Protocol):
    """What differs between the Completions and Chat Completions endpoints; `serve_choices` does the rest."""

    params: Mapping[str, str]  # the core's field names as the endpoint spells them, before the body is read

    def choices(self, raw: bytes) -> tuple[Any, Choices]: ...

    def head(self, body: Any) -> dict[str, Any]: ...

    def chunks(self, run: Run, stream: EventSource) -> AsyncIterator[dict[str, Any]]: ...

    def reply(self, run: Run) -> dict[str, Any]: ...


async def serve_choices(request: Request, generator: GenerationBackend, endpoint: ChoicesEndpoint) -> Response:
    """Parse, validate every choice, submit them all, then stream their chunks or answer with the whole reply; any
    failure is an OpenAI-shaped error (a bug too: logged, 500)."""
    params = endpoint.params
    try:
        deadline = deadline_of(request)
        body, choices = endpoint.choices(await request.body())
        params = choices.params
        prepared = await prepare_all(generator, choices.inputs)
        stream = generator.run(prepared)
    except Exception as e:
        return error_response(e, params)
    count = len(prepared)
    run = Run(body, choices.n, prepared, endpoint.head(body), [ChoiceState(i) for i in range(count)], [0] * count)
    if body.stream:
        return sse_response(endpoint.chunks(run, stream), stream, deadline, params)
    try:
        await until_done(request, _collect(run, stream), stream, deadline)
    except Exception as e:
        return error_response(e, params)
    return JSONResponse(endpoint.reply(run))


async def _collect(run: Run, stream: EventSource) -> None:
    async for i, event in stream:
        run.states[i].add(event)
