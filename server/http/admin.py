"""vLLM's runtime adapter routes, so scripts written for `vllm serve --enable-lora` work unchanged:
POST /v1/load_lora_adapter {lora_name, lora_path} registers the PEFT adapter directory `lora_path` (any kind, a
directory under `--import-roots`) as `lora_name`; POST /v1/unload_lora_adapter {lora_name} deletes it (running
requests finish on their version). Quiver's adapters live in its store, so a load persists across restarts and an
unload deletes from the store, where vLLM's only change what one process serves: what a client sees (servable
after a load, 404 after an unload) is the same. Both answer vLLM's plain-text success line; errors are
OpenAI-shaped JSON (a name already loaded is 409, where vLLM answers 400).
They need the admin token (server/api/access.py), and go through the same catalog as gRPC's AdapterService.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from quiver.adapters.names import parse_ref
from quiver.adapters.registry import RegistrationOptions
from quiver.common.errors import InvalidArgument
from quiver.server.api.adapter_catalog import AdapterCatalog
from quiver.server.http.errors import error_response
from quiver.server.http.schema import LoadLoraRequest, UnloadLoraRequest, parse

# The catalog's and store's field names as these routes spell them.
PARAMS = {"name": "lora_name", "adapter": "lora_name", "path": "lora_path"}


class AdapterRoutes:
    def __init__(self, catalog: AdapterCatalog) -> None:
        self._catalog = catalog

    async def load(self, request: Request) -> Response:
        try:
            body = parse(LoadLoraRequest, await request.body())
            ref = parse_ref(body.lora_name, field="lora_name")
            if ref.version is not None:
                raise InvalidArgument("lora_name", "give a name without @version: the server assigns versions")
            options = RegistrationOptions(name=ref.name, mode="new_version" if body.load_inplace else "create")
            await asyncio.to_thread(self._catalog.import_path, body.lora_path, options, "lora_path", "lora_name")
        except Exception as e:  # a domain error, or a bug (logged, 500): OpenAI's shape either way
            return error_response(e, PARAMS)
        return PlainTextResponse(f"Success: LoRA adapter '{ref.name}' added successfully.")

    async def unload(self, request: Request) -> Response:
        try:
            body = parse(UnloadLoraRequest, await request.body())
            await asyncio.to_thread(self._catalog.delete, body.lora_name, "lora_name")
        except Exception as e:  # a domain error, or a bug (logged, 500): OpenAI's shape either way
            return error_response(e, PARAMS)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
