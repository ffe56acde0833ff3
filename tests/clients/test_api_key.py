"""The clients' credentials against a real server started with an API key (and the admin token): `api_key` goes with
every inference call, `admin_token` instead of it with every adapter call, `metadata` with every call; the CLI
takes the key from --api-key or $QUIVER_API_KEY. Without the right one, each call is UNAUTHENTICATED."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from quiver.clients import AsyncQuiverClient, QuiverClient, QuiverRpcError
from quiver.clients.cli import main

from ..served import ADMIN, start
from ..server_thread import ServerThread

KEY = "k3y"


@pytest.fixture(scope="module")
def server(served_loaded: Any, served_adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerThread]:
    """This module's server needs the API key for inference and the admin token for changes."""
    srv = start(served_loaded, tmp_path_factory.mktemp("store"), served_adapter_dirs, api_key=KEY)
    yield srv
    srv.close()


def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(QuiverRpcError) as error:
        call()
    return error.value.code


@pytest.mark.parametrize("key", [None, "wrong"])
def test_inference_needs_the_api_key(server: ServerThread, key: str | None) -> None:
    with QuiverClient(server.target, timeout=60, api_key=key) as c:
        for call in (lambda: c.generate("w1", max_new_tokens=2), lambda: list(c.generate_stream("w1")),
                     c.model_info, lambda: c.embed("w1"), c.list_adapters):
            assert code_of(call) == grpc.StatusCode.UNAUTHENTICATED


def test_the_api_key_goes_with_inference_and_the_admin_token_with_changes(
        server: ServerThread, served_adapter_dirs: dict[str, Path]) -> None:
    with QuiverClient(server.target, timeout=60, api_key=KEY, admin_token=ADMIN) as c:
        assert c.generate("w1", adapter="lora", max_new_tokens=2).completion_tokens == 2
        assert c.import_adapter(str(served_adapter_dirs["prompt"]), "keyed").ref == "keyed@1"
        assert [a.ref for a in c.delete_adapter("keyed")] == ["keyed@1"]
    with QuiverClient(server.target, timeout=60, api_key=KEY) as c:  # the API key does not open changes
        assert c.get_adapter("lora").versions == [1]
        assert code_of(lambda: c.delete_adapter("lora")) == grpc.StatusCode.UNAUTHENTICATED


def test_metadata_goes_with_every_call(server: ServerThread) -> None:
    with QuiverClient(server.target, timeout=60, metadata=[("authorization", f"Bearer {KEY}")]) as c:
        assert c.model_info().architecture == "LlamaForCausalLM"
        assert [chunk.finish_reason for chunk in c.generate_stream("w1", max_new_tokens=2)][-1] == "length"


def test_async_client_sends_the_api_key(server: ServerThread) -> None:
    async def body(key: str | None) -> int:
        async with AsyncQuiverClient(server.target, timeout=60, api_key=key) as c:
            return (await c.generate("w1", max_new_tokens=3)).completion_tokens

    assert asyncio.run(body(KEY)) == 3
    with pytest.raises(QuiverRpcError) as error:
        asyncio.run(body(None))
    assert error.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_cli_takes_the_key_from_the_flag_or_the_environment(server: ServerThread, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("QUIVER_API_KEY", raising=False)
    argv = ["info", "--server", server.target]
    assert main(argv) == 1
    assert capsys.readouterr() == ("", "error: UNAUTHENTICATED: missing API key\n")
    assert main([*argv, "--api-key", KEY]) == 0
    assert capsys.readouterr().out.startswith("model_name: ")
    monkeypatch.setenv("QUIVER_API_KEY", KEY)
    assert main(["generate", "--server", server.target, "--max-new-tokens", "2", "w1"]) == 0
    assert main(["adapters", "list", "--server", server.target]) == 0
    # Without an admin token the API key is sent for changes too (a server with no admin token takes it there);
    # this server has one, so the key is the wrong token.
    assert main(["adapters", "delete", "lora", "--server", server.target]) == 1
    assert capsys.readouterr().err == "error: UNAUTHENTICATED: wrong admin token\n"
