"""AdapterService over gRPC on a tiny random Llama: register each kind, restart, refuse bad adapters, auth."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from quiver.server.config import AdapterConfig
from quiver.v1 import adapters_pb2 as apb
from quiver.v1 import adapters_pb2_grpc as apb_grpc
from quiver.v1 import generation_pb2 as gpb
from quiver.v1 import generation_pb2_grpc as gpb_grpc

from ...adapters.adapter_factory import load_base, load_peft_model, make_lora, make_prefix_tuning, make_prompt_tuning
from ...conftest import write_tiny_checkpoint
from ...server_thread import ServerThread
from .peft_reference import greedy

TOKEN = "s3cret-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
MAX_BYTES = 2 * 2**20


def adapter_config(store: Path, **kw: Any) -> AdapterConfig:
    return AdapterConfig(store=str(store), admin_token=TOKEN, max_adapter_bytes=MAX_BYTES, **kw)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def server(loaded: Any, store: Path, tmp_path: Path) -> Iterator[ServerThread]:
    srv = ServerThread(loaded, store, adapter_config=adapter_config(store, import_roots=(str(tmp_path / "imports"),)))
    yield srv
    srv.close()


@pytest.fixture
def stub(server: ServerThread) -> Iterator[apb_grpc.AdapterServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield apb_grpc.AdapterServiceStub(channel)


def upload(directory: Path, name: str, mode: int = apb.REGISTER_MODE_CREATE, chunk: int = 4096,
           **options: Any) -> Iterator[apb.RegisterAdapterRequest]:
    yield apb.RegisterAdapterRequest(options=apb.RegistrationOptions(name=name, mode=mode, **options))
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        data = path.read_bytes()
        for start in range(0, len(data), chunk):
            yield apb.RegisterAdapterRequest(chunk=apb.FileChunk(file_name=path.name, data=data[start:start + chunk]))


def register(stub: Any, directory: Path, name: str, **kw: Any) -> apb.AdapterInfo:
    response: apb.RegisterAdapterResponse = stub.RegisterAdapter(upload(directory, name, **kw), metadata=AUTH)
    return response.adapter


def store_snapshot(store: Path) -> dict[str, int]:
    """Every stored file and its size, ignoring the lock file and the staging area."""
    return {
        str(p.relative_to(store)): p.stat().st_size
        for p in store.rglob("*")
        if p.is_file() and not p.relative_to(store).parts[0].startswith(".")
    }


def make_kinds(base_dir: Path, out: Path) -> dict[str, Path]:
    return {
        "lora": make_lora(base_dir, out / "lora", r=4, target_modules="all-linear"),
        "prompt": make_prompt_tuning(base_dir, out / "prompt", num_virtual_tokens=5),
        "prefix": make_prefix_tuning(base_dir, out / "prefix", num_virtual_tokens=3, prefix_projection=True),
    }


def test_register_each_kind_list_get_and_find_after_restart(
    server: ServerThread, stub: Any, loaded: Any, base_dir: Path, store: Path, tmp_path: Path
):
    adapters = make_kinds(base_dir, tmp_path / "made")
    infos = {name: register(stub, path, name, description=f"{name} adapter") for name, path in adapters.items()}
    assert infos["lora"].kind == apb.ADAPTER_KIND_LORA and infos["lora"].rank == 4
    assert set(infos["lora"].target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                 "up_proj", "down_proj"}
    assert infos["prompt"].kind == apb.ADAPTER_KIND_PROMPT_TUNING and infos["prompt"].num_virtual_tokens == 5
    assert infos["prefix"].kind == apb.ADAPTER_KIND_PREFIX_TUNING and infos["prefix"].num_virtual_tokens == 3
    for info in infos.values():
        assert info.version == 1
        assert info.base_fingerprint == loaded.info.fingerprint
    listed = stub.ListAdapters(apb.ListAdaptersRequest(page_size=2))
    assert [a.name for a in listed.adapters] == ["lora", "prefix"] and listed.next_page_token
    rest = stub.ListAdapters(apb.ListAdaptersRequest(page_size=2, page_token=listed.next_page_token))
    assert [a.name for a in rest.adapters] == ["prompt"] and not rest.next_page_token

    server.close()
    again = ServerThread(loaded, store, adapter_config=adapter_config(store))
    try:
        with grpc.insecure_channel(again.target) as channel:
            fresh = apb_grpc.AdapterServiceStub(channel)
            for name, info in infos.items():
                assert fresh.GetAdapter(apb.GetAdapterRequest(adapter=name)).adapter == info
    finally:
        again.close()
        server.close = lambda: None  # type: ignore[method-assign]  # already closed


def test_versions_and_delete(stub: Any, base_dir: Path, tmp_path: Path):
    lora = make_lora(base_dir, tmp_path / "lora", r=2)
    register(stub, lora, "summarize")
    with pytest.raises(grpc.RpcError) as err:
        register(stub, lora, "summarize")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert register(stub, lora, "summarize", mode=apb.REGISTER_MODE_NEW_VERSION).version == 2
    got = stub.GetAdapter(apb.GetAdapterRequest(adapter="summarize@1"))
    assert got.adapter.version == 1 and list(got.versions) == [1, 2]
    deleted = stub.DeleteAdapter(apb.DeleteAdapterRequest(adapter="summarize@2"), metadata=AUTH).deleted
    assert [(d.name, d.version) for d in deleted] == [("summarize", 2)]
    assert stub.GetAdapter(apb.GetAdapterRequest(adapter="summarize")).adapter.version == 1
    stub.DeleteAdapter(apb.DeleteAdapterRequest(adapter="summarize"), metadata=AUTH)
    with pytest.raises(grpc.RpcError) as err:
        stub.GetAdapter(apb.GetAdapterRequest(adapter="summarize"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_generation_fails_closed_for_unknown_adapters(server: ServerThread, stub: Any, loaded: Any, base_dir: Path,
                                                      tmp_path: Path):
    # Alpha 64: a weaker LoRA leaves this tiny model's greedy tokens as the base's, so ignoring it would not show.
    lora = make_lora(base_dir, tmp_path / "lora", r=2, lora_alpha=64)
    register(stub, lora, "known")
    prompt_ids = list(loaded.tokenizer("w1 w2", add_special_tokens=False)["input_ids"])
    reference = greedy(load_peft_model(base_dir, lora), prompt_ids, 8, sorted(loaded.eos_token_ids))
    assert reference != greedy(load_base(base_dir), prompt_ids, 8, sorted(loaded.eos_token_ids))
    with grpc.insecure_channel(server.target) as channel:
        gen = gpb_grpc.GenerationServiceStub(channel)
        request = gpb.GenerateRequest(adapter="known", text="w1 w2", stopping=gpb.StoppingCriteria(max_new_tokens=8))
        assert list(gen.Generate(request).token_ids) == reference
        for adapter, code in (("unknown", grpc.StatusCode.NOT_FOUND), ("known@2", grpc.StatusCode.NOT_FOUND),
                              ("../etc", grpc.StatusCode.INVALID_ARGUMENT)):
            with pytest.raises(grpc.RpcError) as err:
                gen.Generate(gpb.GenerateRequest(adapter=adapter, text="w1 w2"))
            assert err.value.code() == code, adapter


def test_admin_token_required_for_changes(stub: Any, base_dir: Path, tmp_path: Path):
    lora = make_lora(base_dir, tmp_path / "lora", r=2)
    for metadata, problem in (((), "missing"), ((("authorization", "Bearer nope"),), "wrong")):
        with pytest.raises(grpc.RpcError) as err:
            stub.RegisterAdapter(upload(lora, "x"), metadata=metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and problem in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.DeleteAdapter(apb.DeleteAdapterRequest(adapter="x"), metadata=metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert not stub.ListAdapters(apb.ListAdaptersRequest()).adapters  # reading needs no token


def test_import_only_from_allowed_roots(stub: Any, base_dir: Path, tmp_path: Path):
    inside = make_lora(base_dir, tmp_path / "imports" / "lora", r=2)
    outside = make_lora(base_dir, tmp_path / "elsewhere" / "lora", r=2)
    options = apb.RegistrationOptions(name="imported")
    info = stub.ImportAdapter(apb.ImportAdapterRequest(path=str(inside), options=options), metadata=AUTH).adapter
    assert info.name == "imported" and info.rank == 2
    for path in (str(outside), str(tmp_path / "imports" / ".." / "elsewhere" / "lora"), "relative/lora"):
        with pytest.raises(grpc.RpcError) as err:
            stub.ImportAdapter(apb.ImportAdapterRequest(path=path, options=options), metadata=AUTH)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, path


# -- refused adapters: each gets its code and leaves the store unchanged ---------------------------------


def _rewrite_weights(adapter: Path, change: Any) -> Path:
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    change(tensors)
    save_file(tensors, str(weights))
    return adapter


def _nan(tensors: dict[str, torch.Tensor]) -> None:
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")


def _wrong_shape(tensors: dict[str, torch.Tensor]) -> None:
    key = next(k for k in sorted(tensors) if "lora_A" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 3)


def _unknown_module(tensors: dict[str, torch.Tensor]) -> None:
    for key in [k for k in tensors if "q_proj" in k]:
        tensors[key.replace("q_proj", "qq_proj")] = tensors.pop(key)


def _duplicate_keys(adapter: Path) -> Path:
    weights = adapter / "adapter_model.safetensors"
    raw = weights.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + n].decode()
    first_key = next(k for k in json.loads(header) if k != "__metadata__")
    entry = json.dumps(json.loads(header)[first_key])
    doubled = header.rstrip()[:-1] + f', "{first_key}": {entry}}}'
    doubled_bytes = doubled.encode()
    doubled_bytes += b" " * (-len(doubled_bytes) % 8)
    weights.write_bytes(struct.pack("<Q", len(doubled_bytes)) + doubled_bytes + raw[8 + n:])
    return adapter


def _bad_adapters(base_dir: Path, out: Path) -> dict[str, tuple[Path, str, grpc.StatusCode]]:
    lora = lambda name, **kw: make_lora(base_dir, out / name, r=kw.pop("r", 4), **kw)  # noqa: E731
    pickle_dir = lora("pickle")
    (pickle_dir / "adapter_model.safetensors").unlink()
    (pickle_dir / "adapter_model.bin").write_bytes(b"\x80\x04\x95 not really a pickle")
    oversized = lora("oversized")
    (oversized / "padding.txt").write_bytes(b"x" * (MAX_BYTES + 1))
    other_base = write_tiny_checkpoint(out / "other-base", hidden_size=32, intermediate_size=64)
    inv, pre = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
    res = grpc.StatusCode.RESOURCE_EXHAUSTED
    return {
        "pickle": (pickle_dir, "adapter_model.bin", inv),
        "nan": (_rewrite_weights(lora("nan"), _nan), "finite", inv),
        "wrong-shape": (_rewrite_weights(lora("shape"), _wrong_shape), "shape", pre),
        "unknown-module": (_rewrite_weights(lora("unknown"), _unknown_module), "qq_proj", pre),
        "rank-over-cap": (lora("rank", r=300), "300", pre),
        "oversized": (oversized, "bytes", res),
        "duplicate-keys": (_duplicate_keys(lora("dup")), "duplicate", inv),
        "other-base": (make_lora(other_base, out / "foreign", r=4), "expected (4, 64)", pre),  # this base: hidden 64
    }


def test_bad_adapters_are_refused_and_store_unchanged(stub: Any, base_dir: Path, store: Path, tmp_path: Path):
    register(stub, make_lora(base_dir, tmp_path / "good", r=2), "good")
    before = store_snapshot(store)
    for case, (directory, needle, code) in _bad_adapters(base_dir, tmp_path / "bad").items():
        with pytest.raises(grpc.RpcError) as err:
            register(stub, directory, f"bad-{case}")
        assert err.value.code() == code, (case, err.value.details())
        assert needle in err.value.details(), (case, err.value.details())
        assert store_snapshot(store) == before, case
    assert [a.name for a in stub.ListAdapters(apb.ListAdaptersRequest()).adapters] == ["good"]


@pytest.mark.parametrize("name", ["../escape", "/abs", "a/b", "UPPER", "x\x00y", "\uff46\uff55\uff4c\uff4c", "a@1", ""])
def test_bad_names_are_invalid_argument(stub: Any, base_dir: Path, store: Path, tmp_path: Path, name: str):
    lora = make_lora(base_dir, tmp_path / "lora", r=2)
    with pytest.raises(grpc.RpcError) as err:
        register(stub, lora, name)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert store_snapshot(store) == {}


def test_malformed_uploads(stub: Any, base_dir: Path, tmp_path: Path):
    lora = make_lora(base_dir, tmp_path / "lora", r=2)
    chunk = lambda name, data=b"{}": apb.RegisterAdapterRequest(chunk=apb.FileChunk(file_name=name, data=data))  # noqa: E731
    options = apb.RegisterAdapterRequest(options=apb.RegistrationOptions(name="x"))
    cases = {
        "no options first": [chunk("adapter_config.json")],
        "traversal file name": [options, chunk("../adapter_config.json")],
        "hidden file name": [options, chunk(".adapter_config.json")],
        "non-consecutive chunks": [options, chunk("a.json"), chunk("b.json"), chunk("a.json")],
        "options twice": [options, options],
        "missing files": [options],
    }
    for case, messages in cases.items():
        with pytest.raises(grpc.RpcError) as err:
            stub.RegisterAdapter(iter(messages), metadata=AUTH)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, err.value.details())
    assert register(stub, lora, "x").version == 1  # the server still takes good uploads


def test_adapter_of_another_base_in_a_shared_store_is_refused(server: ServerThread, store: Path, tmp_path: Path):
    from quiver.adapters.base_spec import base_spec_from_checkpoint
    from quiver.adapters.registry import AdapterRegistry, RegistrationOptions
    from quiver.adapters.store import LocalAdapterStore
    from quiver.adapters.validation import ValidationLimits

    # Same architecture and shapes, so only the fingerprint tells the bases apart.
    other = write_tiny_checkpoint(tmp_path / "other", num_attention_heads=8, num_key_value_heads=4)
    offline = AdapterRegistry(LocalAdapterStore(store), base_spec_from_checkpoint(other), ValidationLimits())
    offline.register(make_lora(other, tmp_path / "lora", r=2), RegistrationOptions(name="elsewhere"))
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as err:
        gpb_grpc.GenerationServiceStub(channel).Generate(gpb.GenerateRequest(adapter="elsewhere", text="w1"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "registered for base" in err.value.details()


def test_tiny_temperature_decodes_greedily(server: ServerThread):
    with grpc.insecure_channel(server.target) as channel:
        gen = gpb_grpc.GenerationServiceStub(channel)
        stopping = gpb.StoppingCriteria(max_new_tokens=5)
        greedy = gen.Generate(gpb.GenerateRequest(text="w1 w2 w3", stopping=stopping))
        tiny = gen.Generate(gpb.GenerateRequest(text="w1 w2 w3", stopping=stopping,
                                                sampling=gpb.SamplingParameters(temperature=1e-38)))
    assert list(tiny.token_ids) == list(greedy.token_ids)


@pytest.mark.parametrize("taken_port", ["metrics_port", "http_port"])
def test_a_server_that_fails_to_start_gives_the_model_back(loaded: Any, store: Path, taken_port: str):
    import asyncio
    import socket

    from quiver.server.app import start_server
    from quiver.server.config import EngineConfig, ServerConfig
    from quiver.server.engine.engine import Engine

    with socket.socket() as taken, socket.socket() as free:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        free.bind(("127.0.0.1", 0))
        ports = {"metrics_port": free.getsockname()[1], "http_port": free.getsockname()[1]}
        free.close()
        config = ServerConfig(host="127.0.0.1", port=0, **{**ports, taken_port: taken.getsockname()[1]})
        with pytest.raises(OSError):
            asyncio.run(start_server(loaded, EngineConfig(), config, adapter_config(store)))
    engine = Engine(loaded.model, loaded.tokenizer, loaded.eos_token_ids, EngineConfig())  # not "in use"
    engine.stop()


def test_async_clients_get_the_servers_status_for_uploads_refused_early(server: ServerThread, base_dir: Path,
                                                                         tmp_path: Path):
    """grpc.aio clients often turn a write that races the server's early answer into `INTERNAL: Internal error
    from Core` (grpc/grpc#36066); the server waits for the rest of a refused upload, so they see its status."""
    import asyncio

    from quiver.clients.aio import AsyncQuiverClient
    from quiver.clients.errors import QuiverRpcError

    lora = make_lora(base_dir, tmp_path / "lora", r=2, target_modules=["q_proj"], seed=1)
    big = make_lora(base_dir, tmp_path / "big", r=2, target_modules=["q_proj"], seed=2)
    (big / "padding.txt").write_bytes(b"x" * (MAX_BYTES + 1))

    async def codes() -> list[grpc.StatusCode]:
        out = []
        async with AsyncQuiverClient(server.target, admin_token=TOKEN, timeout=30) as client:
            for i in range(120):
                directory, name = (lora, "Bad Name!") if i % 4 else (big, "too-big")
                try:
                    await client.register_adapter(directory, name, chunk_size=1024 if i % 4 else 1 << 16)
                except QuiverRpcError as e:
                    out.append(e.code)
        return out

    seen = asyncio.run(codes())
    assert seen.count(grpc.StatusCode.INVALID_ARGUMENT) == 90, seen
    assert seen.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 30, seen
