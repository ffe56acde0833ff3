"""Serving through faults of the store, on a real server: an adapter file corrupted on disk fails that adapter with
DATA_LOSS (HTTP 500 `data_loss`) while the base and the other adapters keep serving the same tokens; an adapter
replaced or deleted while 50 streaming requests use it lets all 50 finish on the version they started with, and a
request started afterwards sees the change."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from quiver.clients.client import QuiverClient
from quiver.clients.errors import QuiverRpcError

from ...adapters.adapter_factory import make_lora
from ...server_thread import ServerThread
from .conftest import ADMIN, start

PROMPT = "w9 w8 w7"
CONCURRENT = 50
LONG = 200  # tokens: a generation that runs for a while on the tiny model


@dataclass(frozen=True)
class Served:
    server: ServerThread
    store: Path


@pytest.fixture
def served(loaded: Any, adapter_dirs: dict[str, Path], tmp_path: Path) -> Iterator[Served]:
    """A server of its own over a new store, with the lora, prompt and prefix adapters registered (none loaded yet)."""
    srv = start(loaded, tmp_path / "store", adapter_dirs)
    yield Served(srv, tmp_path / "store")
    srv.close()


def tokens(client: QuiverClient, adapter: str, max_new_tokens: int = 16) -> list[int]:
    """Greedy tokens of PROMPT under `adapter` ("" for the base)."""
    reply = client.generate(PROMPT, adapter=adapter, max_new_tokens=max_new_tokens, temperature=0.0,
                            ignore_eos=True)
    assert reply.finish_reason == "length"
    return reply.token_ids


def rpc_code(client: QuiverClient, adapter: str) -> grpc.StatusCode:
    with pytest.raises(QuiverRpcError) as failed:
        tokens(client, adapter)
    return failed.value.code


# --- a corrupted file -------------------------------------------------------------------------------------------


def flip_bytes(path: Path) -> None:
    """Flip the last bytes of a safetensors file: tensor data, so the file still parses, with other weights."""
    data = bytearray(path.read_bytes())
    for i in range(1, 9):
        data[-i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupted_adapter_file_fails_that_adapter_only_with_data_loss(served: Served) -> None:
    others = ("", "prompt", "prefix")  # the base, and the adapters of the other kinds
    completion = {"model": "lora", "prompt": PROMPT, "max_tokens": 4}
    with QuiverClient(served.server.target, timeout=60) as client:
        before = {name: tokens(client, name) for name in others}
        flip_bytes(served.store / "lora" / "1" / "adapter_model.safetensors")
        for _ in range(2):  # a failed load is not kept: the next request checks again, and fails again
            with pytest.raises(QuiverRpcError) as failed:
                tokens(client, "lora")
            assert failed.value.code == grpc.StatusCode.DATA_LOSS
            assert "adapter_model.safetensors fails its checksum" in failed.value.details
        reply = httpx.post(f"{served.server.http}/v1/completions", json=completion, timeout=60)
        assert reply.status_code == 500 and reply.json()["error"]["code"] == "data_loss"
        assert {name: tokens(client, name) for name in others} == before


# --- an adapter changed under running requests ------------------------------------------------------------------


@dataclass
class Stream:
    """What one streaming request received, and when it ended."""

    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    started: threading.Event = field(default_factory=threading.Event)
    ended_at: float = 0.0


def consume(client: QuiverClient, adapter: str, stream: Stream) -> None:
    for chunk in client.generate_stream(PROMPT, adapter=adapter, max_new_tokens=LONG, temperature=0.0,
                                        ignore_eos=True):
        stream.tokens.extend(chunk.token_ids)
        stream.finish = chunk.finish_reason or stream.finish
        if stream.tokens:
            stream.started.set()
    stream.ended_at = time.monotonic()


def change(client: QuiverClient, how: str, new_weights: Path) -> None:
    if how == "delete":
        client.delete_adapter("x@1")
    else:
        client.register_adapter(new_weights, "x", mode="new_version" if how == "new_version" else "replace")


@pytest.mark.parametrize("how", ["new_version", "replace", "delete"])
def test_running_requests_finish_on_the_version_they_started_with(
    loaded: Any, base_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path, how: str
) -> None:
    new_weights = make_lora(base_dir, tmp_path / "x2", r=4, target_modules="all-linear", seed=7)
    srv = start(loaded, tmp_path / "store", {"x": adapter_dirs["lora"]}, engine={"max_running": 2 * CONCURRENT})
    try:
        with QuiverClient(srv.target, timeout=120, admin_token=ADMIN) as client:
            first = tokens(client, "x@1", LONG)
            streams = [Stream() for _ in range(CONCURRENT)]
            with ThreadPoolExecutor(CONCURRENT) as pool:
                running = [pool.submit(consume, client, "x", stream) for stream in streams]
                assert all(stream.started.wait(60) for stream in streams)  # every one is decoding version 1
                change(client, how, new_weights)
                changed_at = time.monotonic()
                for future in running:
                    future.result()
            assert min(stream.ended_at for stream in streams) > changed_at  # the change came while all ran
            assert all(stream.finish == "length" and stream.tokens == first for stream in streams)
            if how == "delete":
                assert rpc_code(client, "x") == rpc_code(client, "x@1") == grpc.StatusCode.NOT_FOUND
                return
            second = tokens(client, "x", LONG)
            assert second != first and tokens(client, "x@2", LONG) == second
            assert how == "new_version" or rpc_code(client, "x@1") == grpc.StatusCode.NOT_FOUND
    finally:
        srv.close()


# --- deletion frees the host tier -------------------------------------------------------------------------------


def test_deleting_an_adapter_drops_it_from_the_host_tier(served: Served):
    from .test_operations_metrics import samples, value

    def host() -> tuple[float, float]:
        s = samples(served.server)
        return value(s, "quiver_adapters_resident", tier="host"), value(s, "quiver_adapter_bytes", tier="host")

    with QuiverClient(served.server.target, admin_token=ADMIN) as client:
        for adapter in ("lora", "prompt"):
            tokens(client, adapter, max_new_tokens=2)
        resident, held = host()
        assert resident == 2
        client.delete_adapter("lora")
        assert host()[0] == 1 and host()[1] < held  # at once, not when the LRU would have reached it
        assert rpc_code(client, "lora") == grpc.StatusCode.NOT_FOUND
        tokens(client, "prompt", max_new_tokens=2)  # the other one still served from the tier
