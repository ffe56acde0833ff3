"""TLS for every listener, from `--tls-cert`, `--tls-key` and `--tls-client-ca`: gRPC's credentials, an SSL context
for the HTTP front, and the metrics port's settings, all from the same files, read once at start-up (a missing or
unreadable file stops the start, naming the flag).

With `--tls-client-ca` every listener requires a client certificate signed by it (mutual TLS); Prometheus then
scrapes with one too. Without TLS flags everything is plaintext, as on loopback by default.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from quiver.server.config import ServerConfig


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{flag} {path!r}: {e.strerror or e}") from None


@dataclass(frozen=True)
class Tls:
    """The server's TLS material; `client_ca` set means mutual TLS."""

    cert: str
    key: str
    client_ca: str | None

    @classmethod
    def of(cls, config: ServerConfig) -> Tls | None:
        """The configuration's TLS, checked readable (and the pair loadable); None for plaintext."""
        if config.tls_cert is None or config.tls_key is None:
            return None
        tls = cls(config.tls_cert, config.tls_key, config.tls_client_ca)
        tls.ssl_context()  # a bad pair or CA file fails here, at start-up, naming the flag
        return tls

    def grpc_credentials(self) -> grpc.ServerCredentials:
        client_ca = _read(self.client_ca, "--tls-client-ca") if self.client_ca else None
        pair = (_read(self.key, "--tls-key"), _read(self.cert, "--tls-cert"))
        return grpc.ssl_server_credentials([pair], root_certificates=client_ca,
                                           require_client_auth=client_ca is not None)

    def ssl_context(self) -> ssl.SSLContext:
        """A server context (TLS 1.2 at least) for the HTTP front."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"--tls-cert/--tls-key: cannot load the pair: {e}") from None
        if self.client_ca is not None:
            try:
                context.load_verify_locations(cafile=self.client_ca)
            except (OSError, ssl.SSLError) as e:
                raise ValueError(f"--tls-client-ca {self.client_ca!r}: {e}") from None
            context.verify_mode = ssl.CERT_REQUIRED
        return context
