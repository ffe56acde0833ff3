"""The HTTP front on uvicorn, in the same process and event loop as the gRPC server.

Quiver's own signal handlers drive shutdown (server/app.py), so uvicorn's are not installed. Stopping first
drains: new requests answer 503 while those in flight get up to the grace period to finish, then uvicorn closes
the listening socket and any connection still open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

from quiver.server.http.gate import ServingState

log = logging.getLogger(__name__)
_POLL_S = 0.05


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # Quiver's handlers, not uvicorn's


class HttpServer:
    """A started uvicorn server; `port` is the bound port (useful when 0 was asked)."""

    def __init__(self, server: uvicorn.Server, task: asyncio.Task[None], state: ServingState, port: int) -> None:
        self._server = server
        self._task = task
        self._state = state
        self.port = port

    @classmethod
    async def start(cls, app: ASGIApp, host: str, port: int, state: ServingState) -> HttpServer:
        config = uvicorn.Config(app, host=host, port=port, lifespan="off", access_log=False, log_level="warning",
                                timeout_graceful_shutdown=0)
        server = _Uvicorn(config)
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():  # failed to bind, or exited at start-up (uvicorn logs why and exits)
                with contextlib.suppress(SystemExit):
                    task.result()
                raise OSError(f"cannot serve HTTP on {host}:{port}")
            await asyncio.sleep(_POLL_S)
        bound = server.servers[0].sockets[0].getsockname()[1]
        return cls(server, task, state, bound)

    async def stop(self, grace: float | None) -> None:
        """Refuse new requests (503), give those in flight `grace` seconds, then close."""
        self._state.draining = True
        loop = asyncio.get_running_loop()
        end = loop.time() + (grace or 0)
        while self._state.in_flight and loop.time() < end:
            await asyncio.sleep(_POLL_S)
        self._server.should_exit = True
        await self._task
