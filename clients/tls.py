"""TLS for the clients' channel: `tls_ca` (the CA that signed the server's certificate; the system's roots when
omitted), and `tls_cert` with `tls_key` (the client's certificate, for a server that requires mutual TLS)."""

from __future__ import annotations

from pathlib import Path

import grpc


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{what} {path!r}: {e.strerror or e}") from None


def channel_credentials(tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None
                        ) -> grpc.ChannelCredentials | None:
    """Credentials for a TLS channel when any of the three is given, else None (plaintext). ValueError for a
    certificate without its key (or the reverse) and for an unreadable file."""
    if tls_ca is None and tls_cert is None and tls_key is None:
        return None
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls_ca, "--tls-ca") if tls_ca else None,
        private_key=_read(tls_key, "--tls-key") if tls_key else None,
        certificate_chain=_read(tls_cert, "--tls-cert") if tls_cert else None,
    )
