"""TLS and mutual TLS on every listener, with certificates the tests make: a plaintext or wrongly trusting client
fails, a client without a certificate is refused under mTLS, and keys are still checked over TLS."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from quiver.clients.cli import main as cli
from quiver.clients.client import QuiverClient
from quiver.clients.errors import QuiverRpcError
from quiver.server.config import ServerConfig
from quiver.server.tls import Tls

from ...server_thread import ServerThread
from ...tls_certs import Pki, make_pki
from .conftest import ADMIN, start

KEY = "inference-key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def https(srv: ServerThread) -> str:
    return f"https://127.0.0.1:{srv.running.http_port}"


def context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


@pytest.fixture
def tls_server(loaded: Any, adapter_dirs: dict[str, Path], pki: Pki, tmp_path: Path) -> Iterator[ServerThread]:
    """A TLS server with an API key (one per test: a model serves one engine at a time)."""
    srv = start(loaded, tmp_path / "store", adapter_dirs, register=False, api_key=KEY,
                tls_cert=str(pki.server_cert), tls_key=str(pki.server_key))
    yield srv
    srv.close()


def test_tls_serves_clients_that_trust_its_ca_and_checks_keys(tls_server: ServerThread, pki: Pki,
                                                              adapter_dirs: dict[str, Path]):
    with QuiverClient(tls_server.target, api_key=KEY, tls_ca=str(pki.ca), timeout=10) as client:
        assert client.generate("w1 w2", max_new_tokens=2).completion_tokens == 2
    with QuiverClient(tls_server.target, tls_ca=str(pki.ca), timeout=10) as keyless, \
            pytest.raises(QuiverRpcError) as refused:
        keyless.model_info()
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED  # keys still checked over TLS
    with QuiverClient(tls_server.target, api_key=KEY, tls_ca=str(pki.ca), timeout=10) as not_admin, \
            pytest.raises(QuiverRpcError) as denied:
        not_admin.register_adapter(adapter_dirs["lora"], "x")
    assert denied.value.code == grpc.StatusCode.UNAUTHENTICATED  # the admin token is what changes adapters
    with QuiverClient(tls_server.target, admin_token=ADMIN, tls_ca=str(pki.ca), timeout=30) as admin:
        assert admin.register_adapter(adapter_dirs["lora"], "over-tls").name == "over-tls"
    body = {"model": "tiny", "prompt": "w1", "max_tokens": 2}
    reply = httpx.post(https(tls_server) + "/v1/completions", verify=context(pki.ca),
                       headers={"Authorization": f"Bearer {KEY}"}, json=body)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2
    assert httpx.post(https(tls_server) + "/v1/completions", verify=context(pki.ca), json={}).status_code == 401
    metrics = httpx.get(f"https://127.0.0.1:{tls_server.running.metrics_port}/metrics", verify=context(pki.ca))
    assert metrics.status_code == 200 and "quiver_requests_total" in metrics.text


def test_plaintext_and_wrong_ca_clients_fail(tls_server: ServerThread, pki: Pki):
    for options in ({}, {"tls_ca": str(pki.other_ca)}):
        with QuiverClient(tls_server.target, api_key=KEY, timeout=5, **options) as client, \
                pytest.raises(QuiverRpcError) as failed:
            client.model_info()
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE, options
    with pytest.raises(httpx.HTTPError):  # plaintext HTTP to a TLS port
        httpx.get(f"http://127.0.0.1:{tls_server.running.http_port}/ready", timeout=5)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(https(tls_server) + "/ready", verify=context(pki.other_ca), timeout=5)


def test_mutual_tls_refuses_clients_without_a_certificate_its_ca_signed(
        loaded: Any, adapter_dirs: dict[str, Path], pki: Pki, tmp_path: Path):
    srv = start(loaded, tmp_path / "store", adapter_dirs, register=False, tls_cert=str(pki.server_cert),
                tls_key=str(pki.server_key), tls_client_ca=str(pki.ca))
    try:
        with QuiverClient(srv.target, tls_ca=str(pki.ca), tls_cert=str(pki.client_cert),
                          tls_key=str(pki.client_key), timeout=10) as client:
            assert client.generate("w1 w2", max_new_tokens=2).completion_tokens == 2
        for cert, key in ((None, None), (pki.other_client_cert, pki.other_client_key)):
            options = {"tls_cert": str(cert), "tls_key": str(key)} if cert else {}
            with QuiverClient(srv.target, tls_ca=str(pki.ca), timeout=5, **options) as refused, \
                    pytest.raises(QuiverRpcError) as failed:
                refused.model_info()
            assert failed.value.code == grpc.StatusCode.UNAVAILABLE, cert
        good = context(pki.ca, pki.client_cert, pki.client_key)
        assert httpx.get(https(srv) + "/ready", verify=good).status_code == 200
        for ctx in (context(pki.ca), context(pki.ca, pki.other_client_cert, pki.other_client_key)):
            with pytest.raises(httpx.HTTPError):
                httpx.get(https(srv) + "/ready", verify=ctx, timeout=5)
        metrics = f"https://127.0.0.1:{srv.running.metrics_port}/metrics"
        assert httpx.get(metrics, verify=good).status_code == 200
        with pytest.raises(httpx.HTTPError):
            httpx.get(metrics, verify=context(pki.ca), timeout=5)
    finally:
        srv.close()


def test_the_cli_speaks_tls(tls_server: ServerThread, pki: Pki, capsys: pytest.CaptureFixture[str]):
    assert cli(["info", "--server", tls_server.target, "--api-key", KEY, "--tls-ca", str(pki.ca)]) == 0
    assert "tiny" in capsys.readouterr().out
    assert cli(["info", "--server", tls_server.target, "--api-key", KEY, "--tls-ca", "/nonexistent.pem"]) == 2
    assert "--tls-ca '/nonexistent.pem'" in capsys.readouterr().err


def test_tls_flags_are_checked_at_start(pki: Pki):
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        ServerConfig(tls_cert=str(pki.server_cert))
    with pytest.raises(ValueError, match="--tls-client-ca needs --tls-cert"):
        ServerConfig(tls_client_ca=str(pki.ca))
    with pytest.raises(ValueError, match="cannot load the pair"):
        Tls.of(ServerConfig(tls_cert=str(pki.server_cert), tls_key=str(pki.client_key)))  # a key of another cert
    with pytest.raises(ValueError, match="--tls-client-ca"):
        Tls.of(ServerConfig(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca="/nope.pem"))
