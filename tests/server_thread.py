"""A real Quiver server (gRPC and HTTP) in a background thread of the test process, for any test package."""

from __future__ import annotations

import errno
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


PORT_ATTEMPTS = 3


class ServerThread:
    """A real Quiver server (gRPC and HTTP) on its own event loop in a background thread; `server` overrides
    ServerConfig fields (ports default to free ones; http_port=0 turns HTTP off)."""

    open: ClassVar[list[ServerThread]] = []
    """Servers started and not yet closed: `no_server_left_running` closes a module's leftovers and fails it."""

    def __init__(self, loaded: Any, store: Path, engine_config: Any = None, adapter_config: Any = None,
                 **server: Any) -> None:
        import asyncio

        from quiver.server.app import start_server
        from quiver.server.config import AdapterConfig, EngineConfig, ServerConfig

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        adapter_config = adapter_config or AdapterConfig(store=str(store))
        for attempt in range(PORT_ATTEMPTS):
            # A port found free can be taken by another process before the server binds it: try new ones then
            # (the server opens its ports before it touches the model, so a failed start leaves nothing behind).
            ports = {"port": 0, "metrics_port": _free_port(), "http_port": _free_port()}
            config = ServerConfig(**{"host": "127.0.0.1", **ports, **server})
            start = start_server(loaded, engine_config or EngineConfig(), config, adapter_config)
            try:
                self.running = asyncio.run_coroutine_threadsafe(start, self.loop).result(timeout=60)
                break
            except OSError as e:
                if e.errno != errno.EADDRINUSE or attempt == PORT_ATTEMPTS - 1:
                    self._stop_loop()
                    raise
            except BaseException:
                self._stop_loop()
                raise
        ServerThread.open.append(self)
        self.target = f"127.0.0.1:{self.running.port}"
        self.http = f"http://127.0.0.1:{self.running.http_port}"

    def close(self) -> None:
        """Stop the server (its engine gives the shared model its modules back); idempotent."""
        import asyncio

        if self not in ServerThread.open:
            return
        ServerThread.open.remove(self)
        asyncio.run_coroutine_threadsafe(self.running.stop(0), self.loop).result(timeout=60)
        self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Whether `predicate` becomes true within `timeout` seconds (polled every 10 ms)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return False
