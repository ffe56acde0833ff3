"""gRPC AdapterService: register (upload or import), list, inspect and delete adapters while serving."""

from __future__ import annotations

import asyncio
import re
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

import grpc

from quiver.adapters.metadata import AdapterMetadata
from quiver.adapters.names import parse_ref
from quiver.adapters.registry import RegistrationOptions
from quiver.adapters.store import RegisterMode
from quiver.common.errors import InvalidArgument, QuiverError, TooLarge
from quiver.server.api.adapter_catalog import AdapterCatalog
from quiver.v1 import adapters_pb2 as pb
from quiver.v1 import adapters_pb2_grpc as pb_grpc

MAX_UPLOAD_FILES = 16
DEFAULT_PAGE_SIZE = 100
# Plain file names only: no separators, no leading dot, nothing that could walk out of the upload dir.
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}", re.ASCII)

_MODES: dict[int, RegisterMode] = {
    pb.REGISTER_MODE_CREATE: "create",
    pb.REGISTER_MODE_NEW_VERSION: "new_version",
    pb.REGISTER_MODE_REPLACE: "replace",
}
_KINDS: dict[str, pb.AdapterKind.ValueType] = {
    "lora": pb.ADAPTER_KIND_LORA,
    "prompt_tuning": pb.ADAPTER_KIND_PROMPT_TUNING,
    "prefix_tuning": pb.ADAPTER_KIND_PREFIX_TUNING,
}


def adapter_info(m: AdapterMetadata) -> pb.AdapterInfo:
    return pb.AdapterInfo(
        name=m.name, version=m.version, kind=_KINDS[m.kind], peft_type=m.peft_type,
        base_fingerprint=m.base_fingerprint, base_architecture=m.base_architecture, size_bytes=m.size_bytes,
        num_parameters=m.num_parameters, rank=m.rank or 0, num_virtual_tokens=m.num_virtual_tokens or 0,
        target_modules=m.target_modules, sha256=m.sha256, created_at=m.created_at, description=m.description,
        prompt_template=m.prompt_template or "", labels=m.labels, chat_template=m.chat_template,
    )


def registration_options(options: pb.RegistrationOptions, field: str) -> RegistrationOptions:
    ref = parse_ref(options.name, field=f"{field}.name")
    if ref.version is not None:
        raise InvalidArgument(f"{field}.name", "give a name without @version: the server assigns versions")
    if options.mode not in _MODES:
        raise InvalidArgument(f"{field}.mode", f"unknown mode {options.mode}")
    return RegistrationOptions(
        name=ref.name,
        mode=_MODES[options.mode],
        description=options.description,
        prompt_template=options.prompt_template if options.HasField("prompt_template") else None,
        labels=tuple(options.labels) if options.labels else None,
    )


class _Upload:
    """Writes a stream of FileChunk messages into a directory, enforcing the size and file-count caps."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self._dir = directory
        self._max_bytes = max_bytes
        self._total = 0
        self._current: tuple[str, BinaryIO] | None = None
        self._seen: set[str] = set()

    def write(self, chunk: pb.FileChunk) -> None:
        name = chunk.file_name
        if self._current is None or self._current[0] != name:
            self._open(name)
        self._total += len(chunk.data)
        if self._total > self._max_bytes:
            raise TooLarge(f"upload exceeds {self._max_bytes} bytes (--max-adapter-bytes)")
        assert self._current is not None
        self._current[1].write(chunk.data)

    def _open(self, name: str) -> None:
        if not _FILE_NAME.fullmatch(name):
            raise InvalidArgument("chunk.file_name", f"{name!r} is not a plain file name")
        if name in self._seen:
            raise InvalidArgument("chunk.file_name", f"chunks of {name!r} are not consecutive")
        if len(self._seen) >= MAX_UPLOAD_FILES:
            raise InvalidArgument("chunk.file_name", f"at most {MAX_UPLOAD_FILES} files per adapter")
        self.close()
        self._seen.add(name)
        self._current = (name, (self._dir / name).open("xb"))

    def close(self) -> None:
        if self._current is not None:
            self._current[1].close()
            self._current = None


async def _discard(requests: AsyncIterator[pb.RegisterAdapterRequest], max_bytes: int) -> None:
    """Read and drop what is left of a refused upload, up to `max_bytes` of messages."""
    left = max_bytes
    async for request in requests:
        left -= request.ByteSize()
        if left < 0:
            return


class AdapterService(pb_grpc.AdapterServiceServicer):
    """Implements quiver.v1.AdapterService over the adapter catalog."""

    def __init__(self, catalog: AdapterCatalog, max_upload_bytes: int) -> None:
        self._catalog = catalog
        self._max_upload_bytes = max_upload_bytes

    async def RegisterAdapter(
        self, request_iterator: AsyncIterator[pb.RegisterAdapterRequest], context: grpc.aio.ServicerContext
    ) -> pb.RegisterAdapterResponse:
        with tempfile.TemporaryDirectory(prefix="quiver-upload-") as tmp:
            options = await self._receive(request_iterator, Path(tmp))
            stored = await asyncio.to_thread(self._catalog.register, Path(tmp), options)
        return pb.RegisterAdapterResponse(adapter=adapter_info(stored.metadata))

    async def _receive(
        self, requests: AsyncIterator[pb.RegisterAdapterRequest], directory: Path
    ) -> RegistrationOptions:
        """The upload's options, its files written into `directory`. A refusal before the client has sent
        everything waits for the rest (discarded, at most --max-adapter-bytes of it) before answering: grpc.aio
        clients (grpcio 1.7x-1.8x, grpc/grpc#36066) otherwise often report a write that raced the answer as
        `INTERNAL: Internal error from Core` in place of the server's status."""
        try:
            return await self._read(requests, directory)
        except QuiverError:
            await _discard(requests, self._max_upload_bytes)
            raise

    async def _read(
        self, requests: AsyncIterator[pb.RegisterAdapterRequest], directory: Path
    ) -> RegistrationOptions:
        options: RegistrationOptions | None = None
        upload = _Upload(directory, self._max_upload_bytes)
        try:
            async for request in requests:
                part = request.WhichOneof("part")
                if part == "options":
                    if options is not None:
                        raise InvalidArgument("options", "send options once, in the first message")
                    options = registration_options(request.options, "options")
                elif part == "chunk":
                    if options is None:
                        raise InvalidArgument("options", "the first message must carry options")
                    upload.write(request.chunk)
                else:
                    raise InvalidArgument("part", "each message must carry options or a chunk")
        finally:
            upload.close()
        if options is None:
            raise InvalidArgument("options", "no options received")
        return options

    async def ImportAdapter(
        self, request: pb.ImportAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.ImportAdapterResponse:
        options = registration_options(request.options, "options")
        stored = await asyncio.to_thread(self._catalog.import_path, request.path, options)
        return pb.ImportAdapterResponse(adapter=adapter_info(stored.metadata))

    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAdaptersResponse:
        page, token = await asyncio.to_thread(
            self._catalog.page, request.page_size or DEFAULT_PAGE_SIZE, request.page_token
        )
        return pb.ListAdaptersResponse(adapters=[adapter_info(s.metadata) for s in page], next_page_token=token)

    async def GetAdapter(
        self, request: pb.GetAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetAdapterResponse:
        stored, versions = await asyncio.to_thread(self._catalog.get, request.adapter)
        return pb.GetAdapterResponse(adapter=adapter_info(stored.metadata), versions=versions)

    async def DeleteAdapter(
        self, request: pb.DeleteAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteAdapterResponse:
        deleted = await asyncio.to_thread(self._catalog.delete, request.adapter)
        return pb.DeleteAdapterResponse(deleted=[adapter_info(s.metadata) for s in deleted])
