"""asyncio Python client of quiver.v1.GenerationService and AdapterService; `QuiverClient`'s API, awaitable."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Self

import grpc

from quiver.clients.adapters_types import (
    AdapterDetails,
    AdapterInfo,
    AdapterPage,
    RegisterMode,
    adapter_info_from_proto,
    admin_metadata,
    deleted_from_response,
    details_from_response,
    list_request,
    page_from_response,
    registration_options,
)
from quiver.clients.errors import QuiverRpcError
from quiver.clients.tls import channel_credentials
from quiver.clients.types import (
    DEFAULT_TARGET,
    Classification,
    Embeddings,
    Generation,
    GenerationChunk,
    ModelInfo,
    Pooling,
    build_classify_request,
    build_embed_request,
    build_request,
    chunk_from_response,
    classifications_from_response,
    embeddings_from_response,
    generation_from_response,
    model_info_from_response,
)
from quiver.clients.upload import Upload
from quiver.v1 import adapters_pb2 as apb
from quiver.v1 import adapters_pb2_grpc as apb_grpc
from quiver.v1 import generation_pb2 as pb
from quiver.v1 import generation_pb2_grpc as pb_grpc


class AsyncQuiverClient:
    """One grpc.aio channel to a Quiver server; use `async with`, or `await close()`.

    Create it inside the event loop that will use it. `timeout` (seconds) is the deadline of each call
    (of the whole stream for `generate_stream`); `metadata` is sent with every call, `api_key` (as
    `authorization: Bearer <key>`) with every call of a server started with `--api-key`, and `admin_token` instead
    of it with every adapter call. `tls_ca` (the CA of the server's certificate), `tls_cert` and `tls_key` (a client
    certificate, for mutual TLS) make the channel TLS. Every failed call raises `QuiverRpcError`;
    arguments the wire cannot carry raise ValueError before anything is sent.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        admin_token: str | None = None,
        api_key: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        credentials = channel_credentials(tls_ca, tls_cert, tls_key)
        self._channel = (grpc.aio.secure_channel(target, credentials) if credentials is not None
                         else grpc.aio.insecure_channel(target))
        self._stub = pb_grpc.GenerationServiceStub(self._channel)
        self._adapters = apb_grpc.AdapterServiceStub(self._channel)
        self._timeout = timeout
        self._metadata = admin_metadata(metadata, api_key)
        self._admin_metadata = admin_metadata(metadata, admin_token or api_key)

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
        logprobs: int | None = None,
        ignore_eos: bool = False,
    ) -> Generation:
        """Generates a completion of `prompt` (raw text) or `messages` (chat turns) and returns it whole.

        Parameters left as None are not sent, so the server's defaults apply. `logprobs=n` returns each
        token's log-probability and the n most likely tokens at its position (`Generation.logprobs`).
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
            logprobs=logprobs,
            ignore_eos=ignore_eos,
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
        logprobs: int | None = None,
        ignore_eos: bool = False,
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
            logprobs=logprobs,
            ignore_eos=ignore_eos,
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

    async def embed(
        self,
        inputs: str | Sequence[int] | Sequence[str | Sequence[int]],
        *,
        adapter: str = "",
        pooling: Pooling = "mean",
        normalize: bool = True,
    ) -> Embeddings:
        """Embeds one input (a text or a list of token ids) or a list of them: the base model's last hidden
        states pooled over each input's tokens (`mean` or `last`), under `adapter` if given (its prompt template
        applies to texts), scaled to unit length unless `normalize` is False."""
        request = build_embed_request(inputs, adapter, pooling, normalize)
        try:
            response = await self._stub.Embed(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise QuiverRpcError.from_grpc(e) from e
        return embeddings_from_response(response)

    async def classify(
        self, inputs: str | Sequence[int] | Sequence[str | Sequence[int]], *, adapter: str
    ) -> list[Classification]:
        """Classifies one input (a text or a list of token ids) or a list of them with `adapter`, a classification
        (SEQ_CLS) adapter: every label's probability per input, in order (`.label` is the most likely)."""
        request = build_classify_request(inputs, adapter)
        try:
            response = await self._stub.Classify(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise QuiverRpcError.from_grpc(e) from e
        return classifications_from_response(response)

    # --- adapters -------------------------------------------------------------------------------------

    async def register_adapter(
        self,
        path: str | Path,
        name: str,
        *,
        mode: RegisterMode = "create",
        description: str = "",
        prompt_template: str | None = None,
        labels: Sequence[str] = (),
        chunk_size: int = 1 << 20,
    ) -> AdapterInfo:
        """Uploads the adapter directory `path` (its plain files, not subdirectories) and registers it as `name`;
        `labels` names a classification adapter's classes (default: its own metadata's, else LABEL_0, ...).

        Files are read lazily on worker threads, `chunk_size` bytes per message. A directory that cannot be
        listed raises OSError before the call starts; a file that cannot be read raises its OSError (the call
        is cancelled).
        """
        upload = Upload(path, registration_options(name, mode, description, prompt_template, labels), chunk_size)
        try:
            response = await self._adapters.RegisterAdapter(
                upload.in_threads(), timeout=self._timeout, metadata=self._admin_metadata
            )
        except grpc.RpcError as e:
            raise QuiverRpcError.from_grpc(e) from e
        except asyncio.CancelledError:
            # grpc.aio cancels the call when the request iterator raises; awaiting it then raises this.
            if upload.read_error is None:
                raise
            raise upload.read_error from None
        return adapter_info_from_proto(response.adapter)

    async def import_adapter(
        self,
        server_path: str,
        name: str,
        *,
        mode: RegisterMode = "create",
        description: str = "",
        prompt_template: str | None = None,
    ) -> AdapterInfo:
        """Registers the adapter directory `server_path` on the server's own disk (under an import root) as `name`."""
        options = registration_options(name, mode, description, prompt_template)
        request = apb.ImportAdapterRequest(path=server_path, options=options)
        try:
            response = await self._adapters.ImportAdapter(request, timeout=self._timeout, metadata=self._admin_metadata)
        except grpc.RpcError as e:
            raise QuiverRpcError.from_grpc(e) from e
        return adapter_info_from_proto(response.adapter)

    async def list_adapters(self, page_size: int = 100, page_token: str = "") -> AdapterPage:
        """One page of the latest version of every adapter, sorted by name."""
        request = list_request(page_size, page_token)
        try:
            response = await self._adapters.ListAdapters(request, timeout=self._timeout, metadata=self._admin_metadata)
        except grpc.RpcError as e:
            raise QuiverRpcError.from_grpc(e) from e
        return page_from_response(response)

    async def iter_adapters(self, page_size: int = 100) -> AsyncIterator[AdapterInfo]:
        """The latest version of every adapter, sorted by name, fetching pages as the iteration reaches them."""
        page_token = ""
        while True:
            page = await self.list_adapters(page_size, page_token)
            for adapter in page.adapters:
                yield adapter
            if not (page_token := page.next_page_token):
                return

    async def get_adapter(self, ref: str) -> AdapterDetails:
        """Describes `name` (its latest version) or `name@version`, with every version number of the name."""
        try:
            response = await self._adapters.GetAdapter(
                apb.GetAdapterRequest(adapter=ref), timeout=self._timeout, metadata=self._admin_metadata
            )
        except grpc.RpcError as e:
            raise QuiverRpcError.from_grpc(e) from e
        return details_from_response(response)

    async def delete_adapter(self, ref: str) -> list[AdapterInfo]:
        """Deletes every version of `name`, or only `name@version`; returns the versions deleted."""
        try:
            response = await self._adapters.DeleteAdapter(
                apb.DeleteAdapterRequest(adapter=ref), timeout=self._timeout, metadata=self._admin_metadata
            )
        except grpc.RpcError as e:
            raise QuiverRpcError.from_grpc(e) from e
        return deleted_from_response(response)
