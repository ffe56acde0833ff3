"""Blocking Python client of quiver.v1.GenerationService."""

from __future__ import annotations

from collections.abc import Generator, Mapping, Sequence
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


class QuiverClient:
    """One channel to a Quiver server; use it as a context manager, or call `close()`.

    `timeout` (seconds) is the deadline of each call (of the whole stream for `generate_stream`);
    `metadata` is sent with every call. Every failed call raises `QuiverRpcError`; arguments the wire
    cannot carry raise ValueError before anything is sent.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        self._channel = grpc.insecure_channel(target)
        self._stub = pb_grpc.GenerationServiceStub(self._channel)
        self._timeout = timeout
        self._metadata = tuple(metadata)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(
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
            response = self._stub.Generate(request, timeout=self._timeout, metadata=self._metadata)
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
    ) -> Generator[GenerationChunk, None, None]:
        """Like `generate`, but yields chunks as they are decoded; the last one carries the finish fields.

        The call starts at the first `next()`. Closing the generator (`close()`, or leaving a `for` loop
        over it early) cancels the call, so the server stops generating.
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

    def _stream(self, request: pb.GenerateStreamRequest) -> Generator[GenerationChunk, None, None]:
        call = self._stub.GenerateStream(request, timeout=self._timeout, metadata=self._metadata)
        try:
            for response in call:
                yield chunk_from_response(response)
        except grpc.RpcError as e:
            raise QuiverRpcError.from_grpc(e) from e
        finally:
            call.cancel()  # A no-op once the stream has ended; stops the server if the caller stopped early.

    def model_info(self) -> ModelInfo:
        """Describes the resident base model."""
        try:
            response = self._stub.ModelInfo(pb.ModelInfoRequest(), timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise QuiverRpcError.from_grpc(e) from e
        return model_info_from_response(response)
