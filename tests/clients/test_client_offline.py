"""What the clients do without a server: requests built and refused before anything is sent, replies a real server
never sends (decoded as INTERNAL), and the upload's message stream. A call refused with ValueError is made against
an address nothing listens on, so sending anything would have failed UNAVAILABLE instead."""

from __future__ import annotations

import asyncio
import dataclasses
import typing
from pathlib import Path
from typing import Any

import grpc
import pytest

from quiver.clients import (
    AdapterInfo,
    AdapterKind,
    AsyncQuiverClient,
    ModelInfo,
    QuiverClient,
    QuiverRpcError,
    RegisterMode,
    adapters_types,
)
from quiver.clients.adapters_types import adapter_info_from_proto
from quiver.clients.types import TokenLogprob, build_request, chunk_from_response, generation_from_response
from quiver.clients.upload import Upload
from quiver.v1 import adapters_pb2 as apb
from quiver.v1 import generation_pb2 as pb

from .conftest import unused_target

BAD_GENERATE_ARGUMENTS = [
    ((), {}, "exactly one of prompt and messages"),
    (("hi",), {"messages": [{"role": "user", "content": "hi"}]}, "exactly one of prompt and messages"),
    (("hi",), {"stop": "END"}, "stop:"),
    ((), {"messages": [{"role": "user"}]}, r"messages\[0\]"),
    ((), {"messages": [{"role": "user", "content": "a", "name": "x"}]}, r"messages\[0\]"),
    (("hi",), {"max_new_tokens": -1}, "stopping.max_new_tokens"),
    (("hi",), {"seed": -1}, "sampling.seed"),
    (("hi",), {"temperature": "hot"}, "sampling.temperature"),
    *((("hi",), {"logprobs": value}, "^logprobs:") for value in (-1, 21, 2**32, 2.5)),
]


@pytest.mark.parametrize(("args", "kwargs", "message"), BAD_GENERATE_ARGUMENTS)
@pytest.mark.parametrize("method", ["generate", "generate_stream"])
def test_generate_arguments_the_wire_cannot_carry_raise_before_sending(
        method: str, args: tuple[Any, ...], kwargs: Any, message: str) -> None:
    with QuiverClient(unused_target(), timeout=10) as client, pytest.raises(ValueError, match=message):
        result = getattr(client, method)(*args, **kwargs)
        if method == "generate_stream":
            next(result)


@pytest.mark.parametrize(("args", "kwargs", "message"), BAD_GENERATE_ARGUMENTS[:3])
def test_async_generate_arguments_the_wire_cannot_carry_raise_before_sending(
        args: tuple[Any, ...], kwargs: Any, message: str) -> None:
    async def body() -> None:
        async with AsyncQuiverClient(unused_target(), timeout=10) as client:
            await client.generate(*args, **kwargs)

    with pytest.raises(ValueError, match=message):
        asyncio.run(body())


@pytest.mark.parametrize(("call", "message"), [
    (lambda c, d: c.register_adapter(d, "x", mode="upsert"), "mode: expected one of create, new_version, replace"),
    (lambda c, d: c.register_adapter(d, "x", chunk_size=0), "chunk_size"),
    (lambda c, d: c.import_adapter("/x", "x", mode="upsert"), "mode: expected one of"),
    (lambda c, d: c.list_adapters(page_size=-1), "page_size"),
    (lambda c, d: c.embed("w1", pooling="max"), "pooling"),
    (lambda c, d: c.embed([[1, -2]]), "inputs"),
    (lambda c, d: c.classify("w1", adapter=""), "adapter"),
])
def test_other_arguments_the_wire_cannot_carry_raise_before_sending(call: Any, message: str, tmp_path: Path) -> None:
    with QuiverClient(unused_target(), timeout=10) as client, pytest.raises(ValueError, match=message):
        call(client, tmp_path)


@pytest.mark.parametrize(("make", "error"), [(False, FileNotFoundError), (True, NotADirectoryError)])
def test_register_a_path_that_is_no_directory_raises_before_sending(tmp_path: Path, make: bool,
                                                                   error: type[OSError]) -> None:
    path = tmp_path / "adapter"
    if make:
        path.write_text("a file")
    with QuiverClient(unused_target(), timeout=10) as client, pytest.raises(error, match="adapter"):
        client.register_adapter(path, "x")


@pytest.mark.parametrize("cls", [pb.GenerateRequest, pb.GenerateStreamRequest])
def test_unset_options_stay_unset_and_zero_is_sent(cls: Any) -> None:
    """Unset options leave the server's defaults; zero (proto3's default value) still crosses the wire."""
    none: dict[str, Any] = dict.fromkeys(["messages", "max_new_tokens", "temperature", "top_p", "top_k",
                                          "repetition_penalty", "seed"])
    plain = build_request(cls, prompt="hi", adapter="", stop=(), **none)
    assert [f.name for f, _ in plain.ListFields()] == ["text"]
    for field in ("temperature", "top_p", "top_k", "repetition_penalty", "seed"):
        request = build_request(cls, prompt="hi", adapter="", stop=(), **{**none, field: 0})
        assert [f.name for f, _ in request.sampling.ListFields()] == [field]
    assert build_request(cls, prompt="hi", adapter="", stop=(), logprobs=0, **none).HasField("logprobs")


def test_results_mirror_the_protos_field_for_field() -> None:
    assert [f.name for f in dataclasses.fields(ModelInfo)] == [f.name for f in pb.ModelInfoResponse.DESCRIPTOR.fields]
    assert [f.name for f in dataclasses.fields(AdapterInfo)] == [f.name for f in apb.AdapterInfo.DESCRIPTOR.fields]


def test_every_kind_and_mode_has_a_wire_value() -> None:
    assert set(adapters_types._KINDS.values()) == set(typing.get_args(AdapterKind))
    assert set(adapters_types._MODES) == set(typing.get_args(RegisterMode))
    assert len(adapters_types._KINDS) == len(apb.AdapterKind.values()) - 1  # All but UNSPECIFIED.
    assert len(adapters_types._MODES) == len(apb.RegisterMode.values())


def test_logprobs_are_converted_per_token() -> None:
    entries = [pb.TokenLogprob(token_id=5, logprob=-0.25, top=[pb.TopLogprob(token_id=5, logprob=-0.25),
                                                               pb.TopLogprob(token_id=9, logprob=-2.0)])]
    expected = [TokenLogprob(5, -0.25, [(5, -0.25), (9, -2.0)])]
    whole = pb.GenerateResponse(token_ids=[5], finish_reason=pb.FINISH_REASON_LENGTH, logprobs=entries)
    assert generation_from_response(whole).logprobs == expected
    assert chunk_from_response(pb.GenerateStreamResponse(token_ids=[5], logprobs=entries)).logprobs == expected


def test_replies_a_server_never_sends_are_internal_errors() -> None:
    """A reply without a finish reason or an adapter kind is a broken call, not a result."""
    for decode in (lambda: generation_from_response(pb.GenerateResponse(text="x")),
                   lambda: adapter_info_from_proto(apb.AdapterInfo(name="odd"))):
        with pytest.raises(QuiverRpcError) as error:
            decode()
        assert error.value.code == grpc.StatusCode.INTERNAL


# --- the upload ---------------------------------------------------------------------------------------


def test_upload_sends_options_then_each_plain_file_in_chunks(tmp_path: Path) -> None:
    (tmp_path / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 9)  # 2304 bytes: 3 chunks
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "README.md").write_bytes(b"")
    (tmp_path / ".hidden").write_text("not sent")
    (tmp_path / "checkpoint-1").mkdir()
    (tmp_path / "checkpoint-1" / "adapter_model.safetensors").write_text("not sent")
    options = apb.RegistrationOptions(name="x")
    first, *chunks = Upload(tmp_path, options, chunk_size=1000)
    assert first.options == options
    # Sorted by name; the empty file arrives as one empty chunk; hidden files and subdirectories stay home.
    assert [(m.chunk.file_name, len(m.chunk.data)) for m in chunks] == [
        ("README.md", 0), ("adapter_config.json", 2), *(("adapter_model.safetensors", n) for n in (1000, 1000, 304))]


def test_upload_reads_each_chunk_only_when_it_is_sent(tmp_path: Path) -> None:
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(b"a" * 25)
    requests = iter(Upload(tmp_path, apb.RegistrationOptions(name="x"), chunk_size=10))
    assert next(requests).WhichOneof("part") == "options"
    assert next(requests).chunk.data == b"a" * 10
    path.write_bytes(b"b" * 25)  # Rewritten in place after the first chunk went out.
    assert [r.chunk.data for r in requests] == [b"b" * 10, b"b" * 5]
