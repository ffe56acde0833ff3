"""A fake GenerationService for the client tests: a grpc.aio server on its own thread and event loop.

It answers deterministically from the request, so a test can predict every reply: the completion is the
input reversed (chat input is rendered `role:content|role:content` first), one token id per character
(its code point), cut by stop sequences and max_new_tokens the way the real server cuts. It records every
call it gets, and a few adapter names trigger the behaviours a client must handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, Self, TypeAlias, TypeVar

import grpc

from quiver.v1 import generation_pb2 as pb
from quiver.v1 import generation_pb2_grpc as pb_grpc

T = TypeVar("T")

MISSING_ADAPTER = "missing"
"""Answers NOT_FOUND."""
ENDLESS_ADAPTER = "endless"
"""GenerateStream sends "x" chunks until the client cancels."""
SLOW_ADAPTER = "slow"
"""Waits a minute before answering (for deadlines and cancellation)."""

STREAM_CHUNK_CHARS = 3
"""Characters of completion per streamed message."""

MODEL_INFO = pb.ModelInfoResponse(
    model_name="fake-model",
    fingerprint="f1ngerpr1nt",
    quantization="none",
    device="cpu",
    context_length=2048,
    resident_bytes=123_456_789,
    dtype="float32",
    architecture="FakeForCausalLM",
    max_new_tokens_limit=512,
    has_chat_template=True,
)

Request: TypeAlias = pb.GenerateRequest | pb.GenerateStreamRequest


@dataclass(frozen=True)
class ReceivedCall:
    """One call as the server saw it."""

    method: str
    request: Any
    metadata: dict[str, str]
    time_remaining: float | None
    """Seconds left before the client's deadline when the call arrived; None without a deadline."""


def source_text(request: Request) -> str:
    """The input the fake completes: the raw text, or the chat turns rendered as `role:content|...`."""
    if request.WhichOneof("input") == "chat":
        return "|".join(f"{m.role}:{m.content}" for m in request.chat.messages)
    return request.text


def fake_completion(request: Request) -> tuple[str, pb.FinishReason.ValueType]:
    """The reversed input, ended by the earliest stop sequence or by max_new_tokens characters."""
    text = source_text(request)[::-1]
    stopping = request.stopping
    limit = stopping.max_new_tokens if stopping.HasField("max_new_tokens") else len(text)
    cut = min((text.find(s) for s in stopping.stop_sequences if s in text), default=None)
    if cut is not None and cut <= limit:
        return text[:cut], pb.FINISH_REASON_STOP_SEQUENCE
    if len(text) > limit:
        return text[:limit], pb.FINISH_REASON_LENGTH
    return text, pb.FINISH_REASON_EOS_TOKEN


def _fake_logprobs(request: pb.GenerateRequest | pb.GenerateStreamRequest, text: str) -> list[pb.TokenLogprob]:
    """When asked: each token at log-probability -(its position in `text` + 1), its top the next ids down."""
    if not request.HasField("logprobs"):
        return []
    return [
        pb.TokenLogprob(token_id=t, logprob=-(i + 1.0),
                        top=[pb.TopLogprob(token_id=t - j, logprob=-(i + 1.0 + j)) for j in range(request.logprobs)])
        for i, t in enumerate(_token_ids(text))
    ]


def _token_ids(text: str) -> list[int]:
    return [ord(c) for c in text]


class FakeGenerationService(pb_grpc.GenerationServiceServicer):
    """Records calls in `calls`; sets `cancelled` when the client cancels a call it is serving."""

    def __init__(self) -> None:
        self.calls: list[ReceivedCall] = []
        self.cancelled = threading.Event()

    def reset(self) -> None:
        self.calls = []
        self.cancelled = threading.Event()

    def _record(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        metadata = {key: value for key, value in context.invocation_metadata() or ()}
        self.calls.append(ReceivedCall(method, request, metadata, context.time_remaining()))

    async def _check(self, request: Request, context: grpc.aio.ServicerContext) -> None:
        """Aborts the way the real server does for the mistakes the tests make; waits for SLOW_ADAPTER."""
        if request.adapter == MISSING_ADAPTER:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"adapter {request.adapter!r} not found")
        if request.stopping.HasField("max_new_tokens") and request.stopping.max_new_tokens == 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "stopping.max_new_tokens: must be >= 1")
        if request.WhichOneof("input") is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "input: set text or chat")
        if request.adapter == SLOW_ADAPTER:
            await asyncio.sleep(60)

    @contextlib.contextmanager
    def _observing_cancellation(self) -> Iterator[None]:
        """Sets `cancelled` if the client cancels the call: grpc.aio cancels the handler's task."""
        cancelled = self.cancelled  # The event of the test that made this call, even after a reset.
        try:
            yield
        except (asyncio.CancelledError, GeneratorExit):
            cancelled.set()
            raise

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        self._record("Generate", request, context)
        with self._observing_cancellation():
            await self._check(request, context)
        text, finish_reason = fake_completion(request)
        return pb.GenerateResponse(
            text=text,
            token_ids=_token_ids(text),
            logprobs=_fake_logprobs(request, text),
            finish_reason=finish_reason,
            usage=pb.Usage(prompt_tokens=len(source_text(request)), completion_tokens=len(text)),
        )

    async def GenerateStream(
        self, request: pb.GenerateStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        self._record("GenerateStream", request, context)
        with self._observing_cancellation():
            await self._check(request, context)
            while request.adapter == ENDLESS_ADAPTER:
                yield pb.GenerateStreamResponse(text="x", token_ids=_token_ids("x"))
                await asyncio.sleep(0.01)
            text, finish_reason = fake_completion(request)
            for start in range(0, len(text), STREAM_CHUNK_CHARS):
                piece = text[start : start + STREAM_CHUNK_CHARS]
                yield pb.GenerateStreamResponse(text=piece, token_ids=_token_ids(piece),
                                                logprobs=_fake_logprobs(request, piece))
        usage = pb.Usage(prompt_tokens=len(source_text(request)), completion_tokens=len(text))
        yield pb.GenerateStreamResponse(finish_reason=finish_reason, usage=usage)

    async def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfoResponse:
        self._record("ModelInfo", request, context)
        return MODEL_INFO


class FakeServer:
    """Serves a FakeGenerationService on 127.0.0.1 (a free port) from a background thread's event loop."""

    def __init__(self) -> None:
        self.servicer = FakeGenerationService()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-quiver-server", daemon=True)
        self._thread.start()
        self._server, self.port = self._run(self._start())

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    async def _start(self) -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        pb_grpc.add_GenerationServiceServicer_to_server(self.servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    def close(self) -> None:
        self._run(self._server.stop(grace=None))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
