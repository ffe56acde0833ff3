"""asyncio Python client of quiver.v1.GenerationService; the same API as `QuiverClient`, awaitable."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Self

import grpc

from quiver.clients.errors import QuiverRpcError
from quiver.clients.types import (
    DEFAULT_TARGET,
    Generation,
    GenerationChunk,
    ModelInfo,
    build_request,
    chunk_from_response,
    generation_from_response,
    model_info_from_response,
)
from quiver.v1 import generation_pb2 as pb
from quiver.v1 import generation_pb2_grpc as pb_grpc


class AsyncQuiverClient:
    """One grpc.aio channel to a Quiver server; use `async with`, or `await close()`.

    Create it inside the event loop that will use it. `timeout` (seconds) is the deadline of each call
    (of the whole stream for `generate_stream`); `metadata` is sent with every call. Every failed call
    raises `QuiverRpcError`; arguments the wire cannot carry raise ValueError before anything is sent.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = pb_grpc.GenerationServiceStub(self._channel)
        self._timeout = timeout
        self._metadata = tuple(metadata)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
        adapter: str = "",
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> Generation:
        """Generates a completion of `prompt` (raw text) or `messages` (chat turns) and returns it whole.

        Parameters left as None are not sent, so the server's defaults apply.
        """
        request = build_request(
            pb.GenerateRequest,
            prompt=prompt,
            messages=messages,
            adapter=adapter,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            stop=stop,
            seed=seed,
        )
        try:
            response = await self._stub.Generate(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise QuiverRpcError.from_grpc(e) from e
        return generation_from_response(response)

    def generate_stream(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
        adapter: str = "",
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> AsyncGenerator[GenerationChunk, None]:
        """Like `generate`, but an async iterator of chunks; the last one carries the finish fields.

        The call starts at the first `__anext__()`. `aclose()` on the generator, or cancelling the task
        that iterates it, cancels the call, so the server stops generating.
        """
        request = build_request(
            pb.GenerateStreamRequest,
            prompt=prompt,
            messages=messages,
            adapter=adapter,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            stop=stop,
            seed=seed,
        )
        return self._stream(request)

    async def _stream(self, request: pb.GenerateStreamRequest) -> AsyncGenerator[GenerationChunk, None]:
        call = self._stub.GenerateStream(request, timeout=self._timeout, metadata=self._metadata)
        try:
            async for response in call:
                yield chunk_from_response(response)
        except grpc.RpcError as e:
            raise QuiverRpcError.from_grpc(e) from e
        finally:
            call.cancel()  # A no-op once the stream has ended; stops the server if the caller stopped early.

    async def model_info(self) -> ModelInfo:
        """Describes the resident base model."""
        try:
            response = await self._stub.ModelInfo(pb.ModelInfoRequest(), timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise QuiverRpcError.from_grpc(e) from e
        return model_info_from_response(response)
