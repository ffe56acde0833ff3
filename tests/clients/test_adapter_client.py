"""The adapter methods of QuiverClient and AsyncQuiverClient against the fake in-process AdapterService."""

from __future__ import annotations

import asyncio
import dataclasses
import typing
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from quiver.clients import (
    AdapterDetails,
    AdapterInfo,
    AdapterKind,
    AdapterPage,
    AsyncQuiverClient,
    QuiverClient,
    QuiverRpcError,
    RegisterMode,
    adapters_types,
    upload,
)
from quiver.clients.upload import Upload
from quiver.v1 import adapters_pb2 as apb

from .fake_adapter_server import CREATED_AT, FakeAdapterServer, lora_info

T = TypeVar("T")

TOKEN = "s3cret"
CHUNK = 1000


@pytest.fixture(scope="module")
def server() -> Iterator[FakeAdapterServer]:
    with FakeAdapterServer() as srv:
        yield srv


@pytest.fixture
def fake(server: FakeAdapterServer) -> FakeAdapterServer:
    server.reset()
    return server


@pytest.fixture
def client(fake: FakeAdapterServer) -> Iterator[QuiverClient]:
    with QuiverClient(fake.target, timeout=10) as c:
        yield c


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    """Two files of a few chunks each, an empty one, and what an upload must skip."""
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 9)  # 2304 bytes: 3 chunks
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (d / "README.md").write_bytes(b"")
    (d / ".hidden").write_text("not sent")
    (d / "checkpoint-1").mkdir()
    (d / "checkpoint-1" / "adapter_model.safetensors").write_text("not sent")
    return d


def run_async(target: str, body: Callable[[AsyncQuiverClient], Coroutine[Any, Any, T]], **kwargs: Any) -> T:
    """Runs `body` with an AsyncQuiverClient made (and closed) inside a fresh event loop."""

    async def main() -> T:
        async with AsyncQuiverClient(target, timeout=10, **kwargs) as c:
            return await body(c)

    return asyncio.run(main())


def register_messages(fake: FakeAdapterServer) -> list[apb.RegisterAdapterRequest]:
    [call] = [c for c in fake.adapters.calls if c.method == "RegisterAdapter"]
    messages: list[apb.RegisterAdapterRequest] = call.request
    return messages


def chunk_sizes(messages: list[apb.RegisterAdapterRequest]) -> list[tuple[str, int]]:
    return [(m.chunk.file_name, len(m.chunk.data)) for m in messages[1:]]


def seed(fake: FakeAdapterServer, *names: str) -> None:
    for name in names:
        fake.adapters.add(lora_info(name))


# --- register -----------------------------------------------------------------------------------------


def test_register_streams_options_then_each_file_in_chunks(
    client: QuiverClient, fake: FakeAdapterServer, adapter_dir: Path
) -> None:
    info = client.register_adapter(
        adapter_dir, "summarize", description="d", prompt_template="S: {input}", chunk_size=CHUNK
    )
    messages = register_messages(fake)
    assert [m.WhichOneof("part") for m in messages] == ["options"] + ["chunk"] * 5
    options = messages[0].options
    assert (options.name, options.mode, options.description) == ("summarize", apb.REGISTER_MODE_CREATE, "d")
    assert options.HasField("prompt_template") and options.prompt_template == "S: {input}"
    # Sorted by name; the empty file arrives as one empty chunk; hidden files and subdirectories stay home.
    assert chunk_sizes(messages) == [
        ("README.md", 0),
        ("adapter_config.json", len((adapter_dir / "adapter_config.json").read_bytes())),
        ("adapter_model.safetensors", 1000),
        ("adapter_model.safetensors", 1000),
        ("adapter_model.safetensors", 304),
    ]
    sent = {p.name: p.read_bytes() for p in adapter_dir.iterdir() if p.is_file() and p.name != ".hidden"}
    assert fake.adapters.uploads["summarize@1"] == sent
    assert info.ref == "summarize@1"
    assert info.size_bytes == sum(len(data) for data in sent.values())
    assert info.prompt_template == "S: {input}" and info.description == "d"


def test_register_a_big_file_in_chunks_of_at_most_chunk_size(
    client: QuiverClient, fake: FakeAdapterServer, tmp_path: Path
) -> None:
    data = bytes(range(256)) * (3 * 4096 + 1)  # 3 MiB and 256 bytes
    (tmp_path / "adapter_model.safetensors").write_bytes(data)
    client.register_adapter(tmp_path, "big")
    assert [size for _, size in chunk_sizes(register_messages(fake))] == [1 << 20] * 3 + [256]
    assert fake.adapters.uploads["big@1"]["adapter_model.safetensors"] == data


def test_upload_reads_each_chunk_only_when_it_is_sent(tmp_path: Path) -> None:
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(b"a" * 25)
    requests = iter(Upload(tmp_path, apb.RegistrationOptions(name="x"), chunk_size=10))
    assert next(requests).WhichOneof("part") == "options"
    assert next(requests).chunk.data == b"a" * 10
    path.write_bytes(b"b" * 25)  # Rewritten in place after the first chunk went out.
    assert [r.chunk.data for r in requests] == [b"b" * 10, b"b" * 5]


@pytest.mark.parametrize(
    ("mode", "wire"),
    [
        ("create", apb.REGISTER_MODE_CREATE),
        ("new_version", apb.REGISTER_MODE_NEW_VERSION),
        ("replace", apb.REGISTER_MODE_REPLACE),
    ],
)
def test_register_modes(
    client: QuiverClient, fake: FakeAdapterServer, adapter_dir: Path, mode: RegisterMode, wire: int
) -> None:
    seed(fake, "summarize")
    if mode == "create":
        with pytest.raises(QuiverRpcError) as error:
            client.register_adapter(adapter_dir, "summarize", mode=mode)
        assert error.value.code == grpc.StatusCode.ALREADY_EXISTS
    else:
        assert client.register_adapter(adapter_dir, "summarize", mode=mode).version == 2
        assert sorted(fake.adapters.adapters["summarize"]) == ([1, 2] if mode == "new_version" else [2])
    assert register_messages(fake)[0].options.mode == wire


def test_register_sends_no_prompt_template_unless_given(
    client: QuiverClient, fake: FakeAdapterServer, adapter_dir: Path
) -> None:
    info = client.register_adapter(adapter_dir, "summarize")
    assert not register_messages(fake)[0].options.HasField("prompt_template")
    assert info.prompt_template is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"mode": "upsert"}, "mode: expected one of create, new_version, replace"), ({"chunk_size": 0}, "chunk_size")],
)
def test_register_arguments_the_wire_cannot_carry_raise_before_sending(
    client: QuiverClient, fake: FakeAdapterServer, adapter_dir: Path, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        client.register_adapter(adapter_dir, "summarize", **kwargs)
    assert fake.adapters.calls == []


@pytest.mark.parametrize(("make", "error"), [(False, FileNotFoundError), (True, NotADirectoryError)])
def test_register_a_path_that_is_no_directory_raises_before_sending(
    client: QuiverClient, fake: FakeAdapterServer, tmp_path: Path, make: bool, error: type[OSError]
) -> None:
    path = tmp_path / "adapter"
    if make:
        path.write_text("a file")
    with pytest.raises(error, match="adapter"):
        client.register_adapter(path, "summarize")
    assert fake.adapters.calls == []


def vanishing_file(monkeypatch: pytest.MonkeyPatch, adapter_dir: Path) -> None:
    """Makes uploads list one more file than exists, as if it were deleted while uploading."""
    listed = [*upload.adapter_files(adapter_dir), adapter_dir / "zz_gone.bin"]
    monkeypatch.setattr(upload, "adapter_files", lambda directory: listed)


def test_register_raises_a_read_error_rather_than_a_cancelled_call(
    adapter_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vanishing_file(monkeypatch, adapter_dir)
    # A server of its own: the cancelled upload may reach it after this test ends and must not show up
    # in another test's record of calls.
    with (
        FakeAdapterServer() as own,
        QuiverClient(own.target) as client,
        pytest.raises(FileNotFoundError, match="zz_gone"),
    ):
        client.register_adapter(adapter_dir, "summarize")


# --- import, list, get, delete ------------------------------------------------------------------------


def test_import(client: QuiverClient, fake: FakeAdapterServer) -> None:
    info = client.import_adapter("/imports/summarize", "summarize", mode="new_version", description="d")
    [call] = fake.adapters.calls
    assert call.request == apb.ImportAdapterRequest(
        path="/imports/summarize",
        options=apb.RegistrationOptions(name="summarize", mode=apb.REGISTER_MODE_NEW_VERSION, description="d"),
    )
    assert (info.ref, info.description) == ("summarize@1", "d")


def test_info_maps_unset_wire_values_to_none(client: QuiverClient, fake: FakeAdapterServer) -> None:
    fake.adapters.add(
        lora_info(
            "soft",
            kind=apb.ADAPTER_KIND_PROMPT_TUNING,
            peft_type="PROMPT_TUNING",
            rank=0,
            num_virtual_tokens=20,
            target_modules=[],
        )
    )
    fake.adapters.add(lora_info("tmpl", prompt_template="Q: {input}\nA:", description="qa"))
    soft, tmpl = client.list_adapters().adapters
    assert soft == AdapterInfo(
        name="soft",
        version=1,
        kind="prompt_tuning",
        peft_type="PROMPT_TUNING",
        base_fingerprint="f1ngerpr1nt",
        base_architecture="FakeForCausalLM",
        size_bytes=4096,
        num_parameters=1024,
        rank=None,
        num_virtual_tokens=20,
        target_modules=(),
        sha256="ab" * 32,
        created_at=CREATED_AT,
        description="",
        prompt_template=None,
    )
    assert (tmpl.kind, tmpl.rank, tmpl.num_virtual_tokens) == ("lora", 8, None)
    assert tmpl.target_modules == ("q_proj", "v_proj")
    assert tmpl.prompt_template == "Q: {input}\nA:"


def test_a_reply_without_a_kind_is_an_internal_error(client: QuiverClient, fake: FakeAdapterServer) -> None:
    fake.adapters.add(lora_info("odd", kind=apb.ADAPTER_KIND_UNSPECIFIED))
    with pytest.raises(QuiverRpcError) as error:
        client.get_adapter("odd")
    assert error.value.code == grpc.StatusCode.INTERNAL


def test_adapter_info_mirrors_the_proto_field_for_field() -> None:
    proto_fields = [f.name for f in apb.AdapterInfo.DESCRIPTOR.fields]
    assert [f.name for f in dataclasses.fields(AdapterInfo)] == proto_fields


def test_every_kind_and_mode_has_a_wire_value() -> None:
    assert set(adapters_types._KINDS.values()) == set(typing.get_args(AdapterKind))
    assert set(adapters_types._MODES) == set(typing.get_args(RegisterMode))
    assert len(adapters_types._KINDS) == len(apb.AdapterKind.values()) - 1  # All but UNSPECIFIED.
    assert len(adapters_types._MODES) == len(apb.RegisterMode.values())


def test_list_pages(client: QuiverClient, fake: FakeAdapterServer) -> None:
    seed(fake, "e", "d", "c", "b", "a")
    first = client.list_adapters(page_size=2)
    assert [a.name for a in first.adapters] == ["a", "b"]
    second = client.list_adapters(page_size=2, page_token=first.next_page_token)
    last = client.list_adapters(page_size=2, page_token=second.next_page_token)
    assert [a.name for a in second.adapters + last.adapters] == ["c", "d", "e"]
    assert last.next_page_token == ""
    assert [(c.request.page_size, c.request.page_token) for c in fake.adapters.calls] == [(2, ""), (2, "b"), (2, "d")]


def test_list_empty(client: QuiverClient) -> None:
    assert client.list_adapters() == AdapterPage([], "")
    assert list(client.iter_adapters()) == []


def test_iter_adapters_walks_every_page_lazily(client: QuiverClient, fake: FakeAdapterServer) -> None:
    seed(fake, "e", "d", "c", "b", "a")
    adapters = client.iter_adapters(page_size=2)
    assert fake.adapters.calls == []
    assert next(adapters).name == "a"
    assert len(fake.adapters.calls) == 1
    assert [a.name for a in adapters] == ["b", "c", "d", "e"]
    assert len(fake.adapters.calls) == 3


def test_list_page_size_the_wire_cannot_carry(client: QuiverClient, fake: FakeAdapterServer) -> None:
    with pytest.raises(ValueError, match="page_size"):
        client.list_adapters(page_size=-1)
    assert fake.adapters.calls == []


def test_get(client: QuiverClient, fake: FakeAdapterServer) -> None:
    for version in (1, 2, 3):
        fake.adapters.add(lora_info("summarize", version))
    details = client.get_adapter("summarize")
    assert (details.adapter.ref, details.versions) == ("summarize@3", [1, 2, 3])
    assert client.get_adapter("summarize@2") == AdapterDetails(
        AdapterInfo(**{**dataclasses.asdict(details.adapter), "version": 2, "target_modules": ("q_proj", "v_proj")}),
        [1, 2, 3],
    )
    assert fake.adapters.calls[-1].request.adapter == "summarize@2"


def test_delete(client: QuiverClient, fake: FakeAdapterServer) -> None:
    for version in (1, 2, 3):
        fake.adapters.add(lora_info("summarize", version))
    assert [a.ref for a in client.delete_adapter("summarize@2")] == ["summarize@2"]
    assert [a.ref for a in client.delete_adapter("summarize")] == ["summarize@1", "summarize@3"]
    assert fake.adapters.adapters == {}


# --- admin token and errors ---------------------------------------------------------------------------


def call_every_adapter_method(client: QuiverClient, adapter_dir: Path) -> None:
    client.register_adapter(adapter_dir, "summarize")
    client.import_adapter("/imports/x", "x")
    client.list_adapters()
    client.get_adapter("summarize")
    client.delete_adapter("x")


def test_the_admin_token_goes_with_every_adapter_call(fake: FakeAdapterServer, adapter_dir: Path) -> None:
    fake.adapters.admin_token = TOKEN
    with QuiverClient(fake.target, timeout=10, metadata=[("x-api-key", "k1")], admin_token=TOKEN) as c:
        call_every_adapter_method(c, adapter_dir)
        c.generate("hi")
    assert len(fake.adapters.calls) == 5
    for call in fake.adapters.calls:
        assert call.metadata["authorization"] == f"Bearer {TOKEN}"
        assert call.metadata["x-api-key"] == "k1"
    [generate] = fake.servicer.calls
    assert "authorization" not in generate.metadata and generate.metadata["x-api-key"] == "k1"


def test_no_admin_token_sends_no_authorization(
    client: QuiverClient, fake: FakeAdapterServer, adapter_dir: Path
) -> None:
    call_every_adapter_method(client, adapter_dir)
    assert all("authorization" not in call.metadata for call in fake.adapters.calls)


@pytest.mark.parametrize("token", [None, "wrong"])
def test_missing_or_wrong_token_is_unauthenticated(
    fake: FakeAdapterServer, adapter_dir: Path, token: str | None
) -> None:
    fake.adapters.admin_token = TOKEN
    with QuiverClient(fake.target, timeout=10, admin_token=token) as c:
        for call in (lambda: c.register_adapter(adapter_dir, "s"), lambda: c.delete_adapter("s")):
            with pytest.raises(QuiverRpcError) as error:
                call()
            assert (error.value.code, error.value.details) == (
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong admin token",
            )
            assert isinstance(error.value.__cause__, grpc.RpcError)


@pytest.mark.parametrize(
    ("method", "args", "code", "details"),
    [
        ("get_adapter", ("nope",), grpc.StatusCode.NOT_FOUND, "adapter 'nope' not found"),
        ("get_adapter", ("summarize@9",), grpc.StatusCode.NOT_FOUND, "adapter 'summarize@9' not found"),
        ("delete_adapter", ("nope",), grpc.StatusCode.NOT_FOUND, "adapter 'nope' not found"),
        (
            "import_adapter",
            ("/etc", "summarize"),
            grpc.StatusCode.PERMISSION_DENIED,
            "path: not under an import root: /etc",
        ),
    ],
)
def test_errors_become_quiver_rpc_errors(
    client: QuiverClient,
    fake: FakeAdapterServer,
    method: str,
    args: tuple[str, ...],
    code: grpc.StatusCode,
    details: str,
) -> None:
    seed(fake, "summarize")
    with pytest.raises(QuiverRpcError) as error:
        getattr(client, method)(*args)
    assert (error.value.code, error.value.details) == (code, details)
    assert isinstance(error.value.__cause__, grpc.RpcError)


# --- asyncio client -----------------------------------------------------------------------------------


def test_async_register_matches_sync(fake: FakeAdapterServer, adapter_dir: Path, client: QuiverClient) -> None:
    async def body(c: AsyncQuiverClient) -> AdapterInfo:
        return await c.register_adapter(adapter_dir, "a", prompt_template="", chunk_size=CHUNK)

    info = run_async(fake.target, body, admin_token=TOKEN)
    client.register_adapter(adapter_dir, "b", prompt_template="", chunk_size=CHUNK)
    async_call, sync_call = fake.adapters.calls
    assert async_call.metadata["authorization"] == f"Bearer {TOKEN}"
    assert chunk_sizes(async_call.request) == chunk_sizes(sync_call.request)
    assert fake.adapters.uploads["a@1"] == fake.adapters.uploads["b@1"]
    assert async_call.request[0].options.HasField("prompt_template")
    assert info.ref == "a@1"


def test_async_list_get_delete(fake: FakeAdapterServer) -> None:
    seed(fake, "e", "d", "c", "b", "a")

    async def body(c: AsyncQuiverClient) -> tuple[AdapterPage, list[str], AdapterDetails, list[AdapterInfo]]:
        page = await c.list_adapters(page_size=3)
        names = [a.name async for a in c.iter_adapters(page_size=2)]
        return page, names, await c.get_adapter("c"), await c.delete_adapter("c@1")

    page, names, details, deleted = run_async(fake.target, body)
    assert ([a.name for a in page.adapters], page.next_page_token) == (["a", "b", "c"], "c")
    assert names == ["a", "b", "c", "d", "e"]
    assert (details.adapter.ref, details.versions) == ("c@1", [1])
    assert [a.ref for a in deleted] == ["c@1"]


@pytest.mark.parametrize(
    ("method", "code"),
    [
        ("register", grpc.StatusCode.ALREADY_EXISTS),
        ("get", grpc.StatusCode.NOT_FOUND),
        ("delete", grpc.StatusCode.UNAUTHENTICATED),
    ],
)
def test_async_errors_become_quiver_rpc_errors(
    fake: FakeAdapterServer, adapter_dir: Path, method: str, code: grpc.StatusCode
) -> None:
    seed(fake, "summarize")
    fake.adapters.admin_token = TOKEN if method == "delete" else None

    async def body(c: AsyncQuiverClient) -> object:
        if method == "register":
            return await c.register_adapter(adapter_dir, "summarize")
        return await (c.get_adapter("nope") if method == "get" else c.delete_adapter("summarize"))

    with pytest.raises(QuiverRpcError) as error:
        run_async(fake.target, body)
    assert error.value.code == code
    assert isinstance(error.value.__cause__, grpc.aio.AioRpcError)


def test_async_register_raises_a_read_error_rather_than_a_cancelled_call(
    adapter_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vanishing_file(monkeypatch, adapter_dir)

    async def body(c: AsyncQuiverClient) -> AdapterInfo:
        return await c.register_adapter(adapter_dir, "summarize")

    with FakeAdapterServer() as own, pytest.raises(FileNotFoundError, match="zz_gone"):
        run_async(own.target, body)
