"""The HTTP front on uvicorn, in the same process and event loop as the gRPC server.

Quiver's own signal handlers drive shutdown (server/app.py), so uvicorn's are not installed. Stopping waits for
the requests in flight (the serving state already refuses new ones: 503) up to the grace period, then uvicorn
closes the listening socket and any connection still open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from quiver.server.api.serving_state import ServingState
from quiver.server.tls import Tls

log = logging.getLogger(__name__)
_POLL_S = 0.05


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # Quiver's handlers, not uvicorn's


def _listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host:port`, made with proto IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted
    connections only then, and without it Nagle's algorithm holds each response's body behind its head until the
    client's delayed ACK (about 40 ms per response)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    return sock


def _ssl_options(tls: Tls | None) -> dict[str, Any]:
    if tls is None:
        return {}
    options: dict[str, Any] = {"ssl_certfile": tls.cert, "ssl_keyfile": tls.key}
    if tls.client_ca is not None:
        options.update(ssl_ca_certs=tls.client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
    return options


class HttpServer:
    """A started uvicorn server; `port` is the bound port (an ephemeral one when started on 0, as tests may)."""

    def __init__(self, server: uvicorn.Server, task: asyncio.Task[None], state: ServingState, port: int) -> None:
        self._server = server
        self._task = task
        self._state = state
        self.port = port

    @classmethod
    async def start(cls, app: ASGIApp, host: str, port: int, state: ServingState, tls: Tls | None = None
                    ) -> HttpServer:
        """Bind `host:port` (OSError when taken: before anything starts) and serve `app` on it, over TLS (mutual
        with a client CA) when `tls` is given."""
        sock = _listening_socket(host, port)
        # log_config=None: uvicorn's loggers propagate to the process's own logging instead of handlers of their
        # own bound to whatever sys.stderr was at start-up.
        config = uvicorn.Config(app, lifespan="off", access_log=False, log_config=None, log_level="warning",
                                timeout_graceful_shutdown=0, **_ssl_options(tls))
        server = _Uvicorn(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                sock.close()
                task.result()
                raise OSError(f"HTTP on {host}:{port} stopped at start-up")
            await asyncio.sleep(_POLL_S)
        return cls(server, task, state, sock.getsockname()[1])

    async def stop(self, grace: float | None) -> None:
        """Give the requests in flight `grace` seconds (new ones are refused: the state is DRAINING), then close."""
        loop = asyncio.get_running_loop()
        end = loop.time() + (grace or 0)
        while self._state.in_flight and loop.time() < end:
            await asyncio.sleep(_POLL_S)
        self._server.should_exit = True
        await self._task
