"""A fake AdapterService beside the fake GenerationService, on fake_server's background-thread grpc.aio server.

It keeps adapters in memory, enforces the admin token on mutating calls when `admin_token` is set, and records
every call (RegisterAdapter's as the list of messages received), so tests can check what crossed the wire.
Registered adapters are LoRAs of rank 8 whose size is the bytes uploaded; their files are kept in `uploads`.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import grpc

from quiver.v1 import adapters_pb2 as apb
from quiver.v1 import adapters_pb2_grpc as apb_grpc
from quiver.v1 import generation_pb2_grpc as pb_grpc

from .fake_server import FakeServer, ReceivedCall

IMPORT_ROOT = "/imports/"
"""ImportAdapter accepts only paths under this root (PERMISSION_DENIED otherwise)."""
CREATED_AT = "2025-01-02T03:04:05+00:00"


def lora_info(name: str, version: int = 1, **fields: object) -> apb.AdapterInfo:
    """A plausible AdapterInfo of a LoRA; `fields` override any field."""
    values: dict[str, object] = {
        "name": name,
        "version": version,
        "kind": apb.ADAPTER_KIND_LORA,
        "peft_type": "LORA",
        "base_fingerprint": "f1ngerpr1nt",
        "base_architecture": "FakeForCausalLM",
        "size_bytes": 4096,
        "num_parameters": 1024,
        "rank": 8,
        "target_modules": ["q_proj", "v_proj"],
        "sha256": "ab" * 32,
        "created_at": CREATED_AT,
        **fields,
    }
    return apb.AdapterInfo(**values)  # type: ignore[arg-type]


def parse_ref(ref: str) -> tuple[str, int | None]:
    name, _, version = ref.partition("@")
    return name, int(version) if version else None


class FakeAdapterService(apb_grpc.AdapterServiceServicer):
    """Adapters in `adapters` (name -> version -> info); calls in `calls`; uploaded files in `uploads`."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.adapters: dict[str, dict[int, apb.AdapterInfo]] = {}
        self.uploads: dict[str, dict[str, bytes]] = {}
        """`name@version` -> file name -> contents, for each RegisterAdapter."""
        self.calls: list[ReceivedCall] = []
        self.admin_token: str | None = None

    def add(self, info: apb.AdapterInfo) -> None:
        self.adapters.setdefault(info.name, {})[info.version] = info

    async def _record(self, method: str, request: object, context: grpc.aio.ServicerContext, admin: bool) -> None:
        metadata = {key: value for key, value in context.invocation_metadata() or ()}
        self.calls.append(ReceivedCall(method, request, metadata, context.time_remaining()))
        if admin and self.admin_token is not None and metadata.get("authorization") != f"Bearer {self.admin_token}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong admin token")

    async def _store(
        self, options: apb.RegistrationOptions, context: grpc.aio.ServicerContext, **fields: object
    ) -> apb.AdapterInfo:
        versions = self.adapters.get(options.name, {})
        if versions and options.mode == apb.REGISTER_MODE_CREATE:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"adapter {options.name!r} already exists")
        template = {"prompt_template": options.prompt_template} if options.HasField("prompt_template") else {}
        info = lora_info(
            options.name, max(versions, default=0) + 1, description=options.description, **template, **fields
        )
        if options.mode == apb.REGISTER_MODE_REPLACE:
            versions.clear()
        self.add(info)
        return info

    async def RegisterAdapter(
        self, request_iterator: AsyncIterator[apb.RegisterAdapterRequest], context: grpc.aio.ServicerContext
    ) -> apb.RegisterAdapterResponse:
        messages = [message async for message in request_iterator]
        await self._record("RegisterAdapter", messages, context, admin=True)
        if not messages or messages[0].WhichOneof("part") != "options":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "first message: expected options")
        files: dict[str, bytes] = {}
        for message in messages[1:]:
            if message.WhichOneof("part") != "chunk":
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "options: only in the first message")
            files[message.chunk.file_name] = files.get(message.chunk.file_name, b"") + message.chunk.data
        weights = files.get("adapter_model.safetensors", b"")
        size = sum(len(data) for data in files.values())
        info = await self._store(
            messages[0].options, context, size_bytes=size, sha256=hashlib.sha256(weights).hexdigest()
        )
        self.uploads[f"{info.name}@{info.version}"] = files
        return apb.RegisterAdapterResponse(adapter=info)

    async def ImportAdapter(
        self, request: apb.ImportAdapterRequest, context: grpc.aio.ServicerContext
    ) -> apb.ImportAdapterResponse:
        await self._record("ImportAdapter", request, context, admin=True)
        if not request.path.startswith(IMPORT_ROOT):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"path: not under an import root: {request.path}")
        return apb.ImportAdapterResponse(adapter=await self._store(request.options, context))

    async def ListAdapters(
        self, request: apb.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> apb.ListAdaptersResponse:
        """Pages of `page_size` names; the page token is the last name of the previous page."""
        await self._record("ListAdapters", request, context, admin=False)
        names = sorted(name for name in self.adapters if name > request.page_token)
        page, rest = names[: request.page_size or 100], names[request.page_size or 100 :]
        latest = [self.adapters[name][max(self.adapters[name])] for name in page]
        return apb.ListAdaptersResponse(adapters=latest, next_page_token=page[-1] if rest else "")

    async def _versions(self, ref: str, context: grpc.aio.ServicerContext) -> tuple[str, list[int]]:
        """The name and the versions `ref` names; NOT_FOUND when there are none."""
        name, version = parse_ref(ref)
        stored = self.adapters.get(name, {})
        versions = sorted(stored) if version is None else [v for v in stored if v == version]
        if not versions:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"adapter {ref!r} not found")
        return name, versions

    async def GetAdapter(
        self, request: apb.GetAdapterRequest, context: grpc.aio.ServicerContext
    ) -> apb.GetAdapterResponse:
        await self._record("GetAdapter", request, context, admin=False)
        name, versions = await self._versions(request.adapter, context)
        return apb.GetAdapterResponse(adapter=self.adapters[name][versions[-1]], versions=sorted(self.adapters[name]))

    async def DeleteAdapter(
        self, request: apb.DeleteAdapterRequest, context: grpc.aio.ServicerContext
    ) -> apb.DeleteAdapterResponse:
        await self._record("DeleteAdapter", request, context, admin=True)
        name, versions = await self._versions(request.adapter, context)
        deleted = [self.adapters[name].pop(version) for version in versions]
        if not self.adapters[name]:
            del self.adapters[name]
        return apb.DeleteAdapterResponse(deleted=deleted)


class FakeAdapterServer(FakeServer):
    """FakeServer serving a FakeAdapterService (`adapters`) too."""

    def __init__(self) -> None:
        self.adapters = FakeAdapterService()
        super().__init__()

    def reset(self) -> None:
        self.servicer.reset()
        self.adapters.reset()

    async def _start(self) -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        pb_grpc.add_GenerationServiceServicer_to_server(self.servicer, server)
        apb_grpc.add_AdapterServiceServicer_to_server(self.adapters, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port
