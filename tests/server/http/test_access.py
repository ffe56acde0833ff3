"""`--api-key` on both fronts, the admin token on adapter changes, and vLLM's adapter-loading routes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from quiver.clients.client import QuiverClient
from quiver.clients.errors import QuiverRpcError

from ...server_thread import ServerThread
from .conftest import ADMIN, BASE_ID, start

KEY = "sk-quiver-test"


@pytest.fixture(scope="module")
def keyed(loaded: Any, adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[ServerThread]:
    srv = start(loaded, tmp_path_factory.mktemp("store"), adapter_dirs, register=False, api_key=KEY)
    yield srv
    srv.close()


def _client(server: ServerThread, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http}/v1", api_key=key, max_retries=0)


def test_inference_needs_the_key(keyed: ServerThread):
    with _client(keyed, "wrong") as client, pytest.raises(openai.AuthenticationError) as err:
        client.models.list()
    assert err.value.code == "invalid_api_key" and "wrong API key" in err.value.message  # type: ignore[attr-defined]
    assert err.value.response.headers["www-authenticate"] == "Bearer"
    missing = httpx.get(f"{keyed.http}/v1/models")
    assert missing.status_code == 401 and missing.json()["error"]["message"] == "missing API key"
    bare = httpx.post(f"{keyed.http}/v1/chat/completions", json={"model": BASE_ID, "messages": []})
    assert bare.status_code == 401  # before the body is even read
    for path in ("/v1/completions/", "/v1/models/lora", "/v1/anything", "/v1/../v1/models"):
        assert httpx.get(f"{keyed.http}{path}").status_code == 401, path  # fail closed: only the probes and /metrics
    with _client(keyed, KEY) as client:
        assert client.completions.create(model=BASE_ID, prompt="w1 w2", max_tokens=3).choices[0].text
    with _client(keyed, ADMIN) as client:  # whoever may change adapters may use them
        assert [m.id for m in client.models.list()] == [BASE_ID]
    assert httpx.get(f"{keyed.http}/metrics").status_code == 200  # scrapers and probes need no key
    assert httpx.get(f"{keyed.http}/health").status_code == 200
    assert httpx.get(f"{keyed.http}/ready").status_code == 200


def test_grpc_needs_the_same_key(keyed: ServerThread):
    with QuiverClient(keyed.target) as bare, pytest.raises(QuiverRpcError) as err:
        bare.generate("w1 w2", max_new_tokens=2)
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and "missing API key" in err.value.details
    with QuiverClient(keyed.target) as bare, pytest.raises(QuiverRpcError) as err:
        bare.list_adapters()
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    with QuiverClient(keyed.target, api_key=KEY) as client:
        assert client.generate("w1 w2", max_new_tokens=2).completion_tokens == 2
        assert client.list_adapters().adapters == []
    with grpc.insecure_channel(keyed.target) as channel:  # health stays open for orchestrators
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_the_cli_sends_the_key(keyed: ServerThread, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch):
    from quiver.clients.cli import main

    assert main(["generate", "--server", keyed.target, "--max-new-tokens", "2", "w1 w2"]) == 1
    assert "UNAUTHENTICATED: missing API key" in capsys.readouterr().err
    assert main(["generate", "--server", keyed.target, "--api-key", KEY, "--max-new-tokens", "2", "w1 w2"]) == 0
    assert capsys.readouterr().out.strip()
    monkeypatch.setenv("QUIVER_API_KEY", KEY)
    assert main(["info", "--server", keyed.target]) == 0
    assert main(["adapters", "list", "--server", keyed.target]) == 0


def test_the_key_comes_from_the_environment(loaded: Any, adapter_dirs: dict[str, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, keyed: ServerThread):
    keyed.close()  # one engine per model at a time
    keyed.close = lambda: None  # type: ignore[method-assign]
    monkeypatch.setenv("QUIVER_API_KEY", "from-env")
    srv = start(loaded, tmp_path / "store", adapter_dirs, register=False)
    try:
        assert httpx.get(f"{srv.http}/v1/models").status_code == 401
        ok = httpx.get(f"{srv.http}/v1/models", headers={"Authorization": "Bearer from-env"})
        assert ok.status_code == 200
    finally:
        srv.close()


@pytest.fixture
def admin_server(loaded: Any, adapter_dirs: dict[str, Path], tmp_path: Path) -> Iterator[ServerThread]:
    srv = start(loaded, tmp_path / "store", adapter_dirs, register=False, api_key=KEY)
    yield srv
    srv.close()


def _admin(server: ServerThread, route: str, body: dict[str, Any], token: str = ADMIN) -> httpx.Response:
    return httpx.post(f"{server.http}/v1/{route}", json=body, headers={"Authorization": f"Bearer {token}"})


def test_paths_that_routers_would_stretch_onto_a_route_are_refused(admin_server: ServerThread,
                                                                   adapter_dirs: dict[str, Path]):
    """`$` in a route's pattern also matches before a final newline: `/v1/load_lora_adapter%0A` reaches the admin
    handler, so it must be judged as that route (or refused), never as an unknown path."""
    body = {"lora_name": "sneaky", "lora_path": str(adapter_dirs["lora"])}
    for path in ("/v1/load_lora_adapter%0A", "/v1/load_lora_adapter%0a", "/v1/completions%0D%0A"):
        response = httpx.post(f"{admin_server.http}{path}", json=body, headers={"Authorization": f"Bearer {KEY}"})
        assert response.status_code in (400, 401), (path, response.status_code)
    assert _admin(admin_server, "load_lora_adapter", body, token=KEY).status_code == 401
    with QuiverClient(admin_server.target, api_key=KEY) as client, pytest.raises(QuiverRpcError):
        client.get_adapter("sneaky")  # nothing was registered
    lower = httpx.get(f"{admin_server.http}/v1/models", headers={"Authorization": f"bearer {KEY}"})
    assert lower.status_code == 200  # the scheme's case does not matter (RFC 7235)


def test_vllm_adapter_routes(admin_server: ServerThread, adapter_dirs: dict[str, Path]):
    srv = admin_server
    load = {"lora_name": "sql", "lora_path": str(adapter_dirs["lora"])}
    assert _admin(srv, "load_lora_adapter", load, token=KEY).status_code == 401  # the API key is not the admin token
    loaded = _admin(srv, "load_lora_adapter", load)
    assert loaded.status_code == 200 and loaded.text == "Success: LoRA adapter 'sql' added successfully."
    soft = _admin(srv, "load_lora_adapter", {"lora_name": "soft", "lora_path": str(adapter_dirs["prompt"])})
    assert soft.status_code == 200  # any PEFT kind, despite the route's name
    with _client(srv, KEY) as client, QuiverClient(srv.target, api_key=KEY) as grpc_client:
        assert {m.id for m in client.models.list()} == {BASE_ID, "sql", "soft"}
        for name in ("sql", "soft"):
            http = client.completions.create(model=name, prompt="w7 w5 w9 w11", max_tokens=6, temperature=0)
            assert http.choices[0].text == grpc_client.generate("w7 w5 w9 w11", adapter=name, max_new_tokens=6).text
        again = _admin(srv, "load_lora_adapter", load)
        assert again.status_code == 409 and again.json()["error"]["code"] == "already_exists"
        assert _admin(srv, "load_lora_adapter", {**load, "load_inplace": True}).status_code == 200
        assert grpc_client.get_adapter("sql").versions == [1, 2]
        unloaded = _admin(srv, "unload_lora_adapter", {"lora_name": "sql"})
        assert unloaded.status_code == 200 and unloaded.text == "Success: LoRA adapter 'sql' removed successfully."
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="sql", prompt="w1", max_tokens=2)
    missing = _admin(srv, "unload_lora_adapter", {"lora_name": "sql"})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "lora_name"


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"lora_name": "x", "lora_path": "/etc"}, 400, "lora_path"),
    ({"lora_name": "x", "lora_path": "relative/dir"}, 400, "lora_path"),
    ({"lora_name": "Bad Name", "lora_path": "/tmp"}, 400, "lora_name"),
    ({"lora_name": "x@2", "lora_path": "/tmp"}, 400, "lora_name"),
    ({"lora_name": BASE_ID, "lora_path": "LORA"}, 400, "lora_name"),
    ({"lora_name": "x"}, 400, "lora_path"),
    ({"lora_name": "x", "lora_path": "/tmp", "base_model_name": "m"}, 400, "base_model_name"),
])
def test_bad_loads_are_refused_with_the_field(admin_server: ServerThread, adapter_dirs: dict[str, Path],
                                              body: dict[str, Any], status: int, param: str):
    if body.get("lora_path") == "LORA":
        body = {**body, "lora_path": str(adapter_dirs["lora"])}
    response = _admin(admin_server, "load_lora_adapter", body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param
