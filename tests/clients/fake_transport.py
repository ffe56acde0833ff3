"""The one fake the client tests keep: a network failure, which a real server cannot produce (a server that stops
still ends each call with a status; a lost connection ends it with none).

`CuttableProxy` stands between a client and a real server, forwarding every TCP connection byte for byte until
`cut()` drops them all at once, as a crashed host or a dropped link would.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from typing import Self

BUFFER = 1 << 16


class CuttableProxy:
    """Forwards `target` (a free loopback port) to `upstream` ("host:port") until `cut()`."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.target = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="cuttable-proxy", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # the listener was closed by cut()
                return
            server = socket.create_connection(self._upstream)
            with self._lock:
                self._sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(BUFFER):
                sink.sendall(data)

    def cut(self) -> None:
        """Drops both sides of every connection, without a gRPC status, and stops accepting new ones."""
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept(): close() alone would not
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset, not close
                    s.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked in recv(): close() alone would not
                    s.close()
            self._sockets.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cut()
