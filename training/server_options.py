"""Where the training-side commands that talk to a server (`quiver eval`, `quiver data synth`, `quiver data pairs`)
find it: a running one (--server, with its key and TLS files) or one started in-process over --model/--store.
Their configs inherit these fields, so the flags and their rules are the same for all of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

from quiver.clients.client import QuiverClient
from quiver.clients.types import DEFAULT_TARGET

SERVER_ENV = "QUIVER_SERVER"  # as quiver.clients.cli.common: the default --server
API_KEY_ENV = "QUIVER_API_KEY"  # as quiver.clients.cli.common: the default --api-key

# (model, store) -> a context manager holding an in-process server for the duration, yielding its target. The
# caller wires it in (the CLI passes `local_server` from server/local.py): training never imports the server.
LocalServer = Callable[[str | None, str | None], AbstractContextManager[str]]


@dataclass
class ServerOptions:
    """The server a command talks to, and how many requests it keeps in flight."""

    server: str | None = field(
        default=None,
        metadata={"help": f"HOST:PORT of a running server (default: ${SERVER_ENV} or {DEFAULT_TARGET}); "
                  "not with --model/--store"},
    )
    model: str | None = field(
        default=None,
        metadata={"help": "work locally: start an in-process server over this base model (a checkpoint "
                  "directory or .gguf; default model when only --store is given)"},
    )
    store: str | None = field(
        default=None, metadata={"help": "work locally: the adapter store of the in-process server"}
    )
    concurrency: int = field(default=8, metadata={"help": "requests in flight at once (the server batches them)"})
    timeout: float = field(default=600.0, metadata={"help": "deadline of each request, in seconds"})
    api_key: str | None = field(
        default=None, metadata={"help": f"the key of a server started with --api-key (default: ${API_KEY_ENV})"}
    )
    tls_ca: str | None = field(
        default=None, metadata={"help": "PEM CA of the server's certificate: connect over TLS"}
    )
    tls_cert: str | None = field(
        default=None, metadata={"help": "PEM client certificate, for a server requiring mutual TLS"}
    )
    tls_key: str | None = field(default=None, metadata={"help": "PEM private key of --tls-cert"})

    def __post_init__(self) -> None:
        if self.server is not None and self.local:
            raise ValueError("--server cannot be combined with --model/--store (those start a local server)")
        if self.concurrency < 1:
            raise ValueError("--concurrency must be >= 1")
        if not self.timeout > 0:
            raise ValueError("--timeout must be > 0")
        if self.local and (self.tls_ca or self.tls_cert or self.tls_key):
            raise ValueError("--tls-* are for --server: the local server (--model/--store) is plaintext in-process")

    @property
    def local(self) -> bool:
        """Whether an in-process server is started (--model or --store given)."""
        return self.model is not None or self.store is not None

    def target(self) -> str:
        """The remote server's address."""
        return self.server or os.environ.get(SERVER_ENV, DEFAULT_TARGET)

    def client(self, target: str) -> QuiverClient:
        """A client of the server at `target` with this config's deadline, key and TLS files."""
        return QuiverClient(target, timeout=self.timeout, api_key=self.api_key or os.environ.get(API_KEY_ENV),
                            tls_ca=self.tls_ca, tls_cert=self.tls_cert, tls_key=self.tls_key)

    @contextmanager
    def connect(self, local_server: LocalServer | None) -> Iterator[tuple[QuiverClient, str]]:
        """A client of the server these options name, and where it is ("local" for the in-process one)."""
        if not self.local:
            with self.client(self.target()) as client:
                yield client, self.target()
            return
        if local_server is None:
            raise ValueError("working without --server needs a local server (the CLI passes one)")
        with local_server(self.model, self.store) as target, self.client(target) as client:
            yield client, "local"
