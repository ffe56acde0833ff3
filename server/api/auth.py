"""gRPC side of the access policy (server/api/access.py): each method's level, checked before its handler runs.

A missing or wrong token answers UNAUTHENTICATED before the handler runs, so an unauthenticated upload is refused
without reading its stream.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from quiver.common.errors import Unauthenticated
from quiver.server.api.access import Access, AccessPolicy, bearer_token

# Full gRPC method names that change adapters; every other method of Quiver's own services is INFERENCE.
ADMIN_METHODS = frozenset({
    "/quiver.v1.AdapterService/RegisterAdapter",
    "/quiver.v1.AdapterService/ImportAdapter",
    "/quiver.v1.AdapterService/DeleteAdapter",
})
_QUIVER_PREFIX = "/quiver.v1."

_REFUSERS: dict[str, Callable[..., grpc.RpcMethodHandler]] = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def method_access(method: str) -> Access:
    """The level a full gRPC method name needs: health and reflection are open."""
    if method in ADMIN_METHODS:
        return Access.ADMIN
    return Access.INFERENCE if method.startswith(_QUIVER_PREFIX) else Access.OPEN


def _bearer(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            return bearer_token(value)
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Applies the access policy to every call, from its `authorization: Bearer <token>` metadata."""

    def __init__(self, policy: AccessPolicy) -> None:
        self._policy = policy

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        try:
            self._policy.check(method_access(details.method), _bearer(details.invocation_metadata))  # type: ignore[arg-type]
        except Unauthenticated as e:
            message = e.message
        else:
            return handler

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        arity = next(name for name in _REFUSERS if getattr(handler, name) is not None)
        return _REFUSERS[arity](
            refuse, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )
