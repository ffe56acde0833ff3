"""The one place where domain exceptions become gRPC status codes; it also refuses calls the serving phase does
not allow (UNAVAILABLE while loading, draining or dead), counts calls in flight, and keeps each call's record
(request id in and out as `x-request-id` metadata, the access line, metrics).

User mistakes arrive as `QuiverError` subclasses and map to precise codes; anything else is a bug and
becomes INTERNAL with the traceback logged, never shown to the client. Health and reflection calls pass through
in every phase, unrecorded.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from quiver.common import errors
from quiver.server.api.access import Access
from quiver.server.api.auth import method_access
from quiver.server.api.calls import REQUEST_ID_KEY, CallLog
from quiver.server.api.serving_state import ServingState
from quiver.v1 import adapters_pb2, generation_pb2

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


class ConnectionStreams:
    """Calls in flight per connection (by peer address and port), capped (`--max-streams-per-connection`): one call
    over the cap is refused at once rather than queued behind the others (event-loop thread only)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._open: dict[str, int] = {}

    def enter(self, peer: str) -> None:
        count = self._open.get(peer, 0)
        if count >= self._limit:
            raise errors.ResourceExhausted(f"this connection already has {count} calls in flight "
                                           "(--max-streams-per-connection)")
        self._open[peer] = count + 1

    def leave(self, peer: str) -> None:
        count = self._open.pop(peer, 1) - 1
        if count:
            self._open[peer] = count


class _Call:
    """Bookkeeping of one call: its outcome becomes a metric and an access line, its error a status."""

    def __init__(self, method: str, calls: CallLog, state: ServingState, streams: ConnectionStreams,
                 context: grpc.aio.ServicerContext) -> None:
        self.method = method
        self.calls = calls
        self.state = state
        self.streams = streams
        self.peer: str | None = None  # set once the call counts against its connection
        self.context = context
        self.code = grpc.StatusCode.OK
        self.start = time.perf_counter()
        metadata = dict((k, v) for k, v in context.invocation_metadata() or () if isinstance(v, str))
        self.record = calls.begin("grpc", method, metadata.get(REQUEST_ID_KEY))
        state.in_flight += 1

    async def open(self) -> None:
        """Send the request id first; refuse the call when the serving phase does not allow new ones."""
        await self.context.send_initial_metadata(((REQUEST_ID_KEY, self.record.request_id),))
        refusal = self.state.refusal()
        if refusal is not None:
            await self.fail(refusal)
        peer = self.context.peer()
        try:
            self.streams.enter(peer)
        except errors.ResourceExhausted as e:
            await self.fail(e)
        self.peer = peer

    async def fail(self, error: Exception) -> None:
        suffix = f" (request id {self.record.request_id})"
        if isinstance(error, errors.QuiverError):
            self.code = status_code(error)
            await self.context.abort(self.code, _capped(error.message) + suffix)
        log.error("internal error in %s", self.method, exc_info=error)
        self.code = grpc.StatusCode.INTERNAL
        await self.context.abort(self.code, f"internal error: {type(error).__name__}{suffix}")

    def cancelled(self) -> None:
        remaining = self.context.time_remaining()
        expired = remaining is not None and remaining <= 0
        self.code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED

    def done(self) -> None:
        self.state.in_flight -= 1
        if self.peer is not None:
            self.streams.leave(self.peer)
        self.calls.metrics.observe_call(self.method, self.code.name, time.perf_counter() - self.start)
        self.calls.end(self.record, self.code.name)


_Guard = tuple[CallLog, ServingState, ConnectionStreams]
_MAX_DETAILS = 4096  # grpc refuses trailing metadata over 16 KiB, which would turn a status into another one


def _capped(message: str) -> str:
    """`message` within the details' budget (a message may quote what the client sent)."""
    return message if len(message) <= _MAX_DETAILS else message[: _MAX_DETAILS - 20] + " ... (truncated)"


@dataclass(frozen=True)
class _Undecodable:
    """What a request deserializer gives for bytes that are not the method's message (the handler refuses it)."""

    problem: str

    def error(self) -> errors.QuiverError:
        return errors.InvalidArgument("request", f"is not a valid message: {self.problem}")


@dataclass(frozen=True)
class _Oversized(_Undecodable):
    """A message over --max-message-bytes, left undecoded."""

    def error(self) -> errors.QuiverError:
        return errors.TooLarge(self.problem)


def _decoding(deserializer: Callable[[bytes], Any] | None, max_bytes: int) -> Callable[[bytes], Any] | None:
    """`deserializer` that returns `_Undecodable` instead of raising: grpc would answer UNKNOWN (or INTERNAL inside a
    client stream) for what is the client's malformed message; and `_Oversized`, undecoded, past `max_bytes`."""
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        if len(data) > max_bytes:
            return _Oversized(f"a message of {len(data)} bytes exceeds {max_bytes} (--max-message-bytes)")
        try:
            return deserializer(data)
        except Exception as e:  # DecodeError, bad UTF-8 in a string field: whatever the bytes were, they are wrong
            return _Undecodable(str(e)[:200] or type(e).__name__)

    return decode


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A client stream whose undecodable message raises InvalidArgument where the handler reads it."""
    async for request in requests:
        if isinstance(request, _Undecodable):
            raise request.error()
        yield request


def _checked(request: Any) -> Any:
    """A unary request, or a client stream wrapped by `_checked_stream`; an undecodable one raises InvalidArgument."""
    if isinstance(request, _Undecodable):
        raise request.error()
    if hasattr(request, "__aiter__"):
        return _checked_stream(request)
    return request


def _wrap_unary(
    method: str, guard: _Guard, behavior: Callable[[Any, Any], Awaitable[Any]]
) -> Callable[[Any, Any], Awaitable[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = _Call(method, *guard, context)
        try:
            await call.open()
            return await behavior(_checked(request), context)
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
    method: str, guard: _Guard, behavior: Callable[[Any, Any], AsyncIterator[Any]]
) -> Callable[[Any, Any], AsyncIterator[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        call = _Call(method, *guard, context)
        try:
            await call.open()
            async for item in behavior(_checked(request), context):
                yield item
        except (asyncio.CancelledError, GeneratorExit):  # grpc closes a generator paused at a send: GeneratorExit
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


# Every Quiver method's full name -> (client streams, server streams), from the protos.
_ARITY = {f"/{service.full_name}/{method.name}": (method.client_streaming, method.server_streaming)
          for file in (generation_pb2.DESCRIPTOR, adapters_pb2.DESCRIPTOR)
          for service in file.services_by_name.values() for method in service.methods}


def refusing_handler(method: str) -> grpc.RpcMethodHandler | None:
    """For a Quiver method whose service is not there yet: a handler of its arity that answers UNAVAILABLE (None
    for any other method: UNIMPLEMENTED)."""
    if method not in _ARITY:
        return None
    gone = errors.Unavailable("the server is loading its model")

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise gone

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        raise gone
        yield  # an async generator, as the streaming fronts are

    client_streams, server_streams = _ARITY[method]
    if server_streams:
        return grpc.unary_stream_rpc_method_handler(refuse_stream)
    return (grpc.stream_unary_rpc_method_handler if client_streams else grpc.unary_unary_rpc_method_handler)(refuse)


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Maps QuiverError to status codes, applies the serving phase, and records every Quiver call."""

    def __init__(self, calls: CallLog, state: ServingState, max_streams_per_connection: int = 256,
                 max_message_bytes: int = 4 * 2**20) -> None:
        self._guard: _Guard = (calls, state, ConnectionStreams(max_streams_per_connection))
        self._max_message_bytes = max_message_bytes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or method_access(handler_call_details.method) is Access.OPEN:  # health, reflection
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        codec = {
            "request_deserializer": _decoding(handler.request_deserializer, self._max_message_bytes),
            "response_serializer": handler.response_serializer,
        }
        guard = self._guard
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(_wrap_unary(method, guard, handler.unary_unary), **codec)
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(_wrap_stream(method, guard, handler.unary_stream), **codec)
        if handler.unary_stream is not None:  # writes with context.write instead of yielding
            return grpc.unary_stream_rpc_method_handler(_wrap_unary(method, guard, handler.unary_stream), **codec)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(_wrap_unary(method, guard, handler.stream_unary), **codec)
        return handler
