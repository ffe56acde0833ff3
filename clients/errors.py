"""The one exception the Quiver client raises for a failed call, sync or async."""

from __future__ import annotations

import grpc


class QuiverRpcError(Exception):
    """A call failed; `code` and `details` are the server's status (or the transport's, e.g. UNAVAILABLE)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_grpc(cls, error: grpc.RpcError) -> QuiverRpcError:
        """Wraps a sync `grpc.RpcError` (which is also a `grpc.Call`) or an async `grpc.aio.AioRpcError`."""
        if isinstance(error, grpc.Call | grpc.aio.AioRpcError):
            return cls(error.code(), error.details() or "")
        return cls(grpc.StatusCode.UNKNOWN, str(error))
