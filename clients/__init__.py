"""Python clients of Quiver's gRPC API (quiver.v1.GenerationService and AdapterService), blocking and asyncio.

Example:

    with QuiverClient("127.0.0.1:50051") as client:
        print(client.generate("Hello", adapter="summarize", max_new_tokens=32).text)

    with QuiverClient("127.0.0.1:50051", admin_token=token) as client:
        print(client.register_adapter("out/summarize", "summarize", mode="new_version").ref)
"""

from __future__ import annotations

from quiver.clients.adapters_types import AdapterDetails, AdapterInfo, AdapterKind, AdapterPage, RegisterMode
from quiver.clients.aio import AsyncQuiverClient
from quiver.clients.client import QuiverClient
from quiver.clients.errors import QuiverRpcError
from quiver.clients.types import (
    DEFAULT_TARGET,
    FinishReason,
    Generation,
    GenerationChunk,
    ModelInfo,
    TokenLogprob,
)

__all__ = [
    "DEFAULT_TARGET",
    "AdapterDetails",
    "AdapterInfo",
    "AdapterKind",
    "AdapterPage",
    "AsyncQuiverClient",
    "FinishReason",
    "Generation",
    "GenerationChunk",
    "ModelInfo",
    "QuiverClient",
    "QuiverRpcError",
    "RegisterMode",
    "TokenLogprob",
]
