"""The one place where domain exceptions become gRPC status codes; it also records call metrics.

User mistakes arrive as `QuiverError` subclasses and map to precise codes; anything else is a bug and
becomes INTERNAL with the traceback logged, never shown to the client.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from quiver.common import errors
from quiver.server.api.metrics import ServerMetrics

log = logging.getLogger(__name__)

STATUS_CODES: dict[type[errors.QuiverError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.DataLoss: grpc.StatusCode.DATA_LOSS,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.ModelLoadError: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_code(error: errors.QuiverError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL


class _Call:
    """Bookkeeping of one call: its outcome becomes a metric, its error a status."""

    def __init__(self, method: str, metrics: ServerMetrics, context: grpc.aio.ServicerContext) -> None:
        self.method = method
        self.metrics = metrics
        self.context = context
        self.code = grpc.StatusCode.OK
        self.start = time.perf_counter()

    async def fail(self, error: Exception) -> None:
        if isinstance(error, errors.QuiverError):
            self.code = status_code(error)
            await self.context.abort(self.code, error.message)
        log.error("internal error in %s", self.method, exc_info=error)
        self.code = grpc.StatusCode.INTERNAL
        await self.context.abort(self.code, f"internal error: {type(error).__name__}")

    def cancelled(self) -> None:
        remaining = self.context.time_remaining()
        expired = remaining is not None and remaining <= 0
        self.code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED

    def done(self) -> None:
        self.metrics.observe_call(self.method, self.code.name, time.perf_counter() - self.start)


def _wrap_unary(
    method: str, metrics: ServerMetrics, behavior: Callable[[Any, Any], Awaitable[Any]]
) -> Callable[[Any, Any], Awaitable[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = _Call(method, metrics, context)
        try:
            return await behavior(request, context)
        except asyncio.CancelledError:
            call.cancelled()
            raise
        except Exception as e:
            if _is_abort(e):
                call.code = _context_code(context)
                raise
            await call.fail(e)
        finally:
            call.done()

    return handler


def _wrap_stream(
    method: str, metrics: ServerMetrics, behavior: Callable[[Any, Any], AsyncIterator[Any]]
) -> Callable[[Any, Any], AsyncIterator[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        call = _Call(method, metrics, context)
        try:
            async for item in behavior(request, context):
                yield item
        except asyncio.CancelledError:
            call.cancelled()
            raise
        except Exception as e:
            if _is_abort(e):
                call.code = _context_code(context)
                raise
            await call.fail(e)
        finally:
            call.done()

    return handler


_CODES_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def _context_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The status an abort set; grpc.aio may report it as a StatusCode or as its integer value."""
    code: object = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    return _CODES_BY_VALUE.get(code, grpc.StatusCode.UNKNOWN) if isinstance(code, int) else grpc.StatusCode.UNKNOWN


def _is_abort(error: Exception) -> bool:
    # context.abort raises this; the status is already set, so it must pass through untouched.
    return isinstance(error, grpc.aio.AbortError)


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Maps QuiverError to status codes and records every call's code and latency."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        codec = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(method, self._metrics, handler.unary_unary), **codec
            )
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(method, self._metrics, handler.unary_stream), **codec
            )
        if handler.unary_stream is not None:  # writes with context.write instead of yielding
            return grpc.unary_stream_rpc_method_handler(
                _wrap_unary(method, self._metrics, handler.unary_stream), **codec
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(method, self._metrics, handler.stream_unary), **codec
            )
        return handler
