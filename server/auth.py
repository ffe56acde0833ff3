"""Bearer-token protection of the admin RPCs (adapter registration and deletion).

Compared in constant time; a missing or wrong token answers UNAUTHENTICATED before the handler runs, so an
unauthenticated upload is refused without reading its stream.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

# Full gRPC method names that need the token.
ADMIN_METHODS = frozenset({
    "/quiver.v1.AdapterService/RegisterAdapter",
    "/quiver.v1.AdapterService/ImportAdapter",
    "/quiver.v1.AdapterService/DeleteAdapter",
})

_REFUSERS: dict[str, Callable[..., grpc.RpcMethodHandler]] = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def _bearer(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value.removeprefix("Bearer ")
    return None


class AdminTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on ADMIN_METHODS."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method not in ADMIN_METHODS:
            return handler
        given = _bearer(details.invocation_metadata)  # type: ignore[arg-type]
        if given is not None and hmac.compare_digest(given.encode(), self._token):
            return handler
        message = "missing admin token" if given is None else "wrong admin token"

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        arity = next(name for name in _REFUSERS if getattr(handler, name) is not None)
        return _REFUSERS[arity](
            refuse, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )
