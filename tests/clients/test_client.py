"""QuiverClient and AsyncQuiverClient against the fake in-process GenerationService."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import grpc
import pytest

from quiver.clients import AsyncQuiverClient, Generation, ModelInfo, QuiverClient, QuiverRpcError
from quiver.v1 import generation_pb2 as pb

from .fake_server import (
    ENDLESS_ADAPTER,
    MISSING_ADAPTER,
    SLOW_ADAPTER,
    STREAM_CHUNK_CHARS,
    FakeServer,
)

T = TypeVar("T")


@pytest.fixture(scope="module")
def server() -> Iterator[FakeServer]:
    with FakeServer() as srv:
        yield srv


@pytest.fixture
def fake(server: FakeServer) -> FakeServer:
    server.servicer.reset()
    return server


@pytest.fixture
def client(fake: FakeServer) -> Iterator[QuiverClient]:
    with QuiverClient(fake.target, timeout=10) as c:
        yield c


def run_async(target: str, body: Callable[[AsyncQuiverClient], Coroutine[Any, Any, T]]) -> T:
    """Runs `body` with an AsyncQuiverClient made (and closed) inside a fresh event loop."""

    async def main() -> T:
        async with AsyncQuiverClient(target, timeout=10) as c:
            return await body(c)

    return asyncio.run(main())


def unused_target() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def last_request(fake: FakeServer) -> Any:
    return fake.servicer.calls[-1].request


def send(client: QuiverClient, method: str, *args: Any, **kwargs: Any) -> None:
    """Calls `generate`, or runs `generate_stream` to its end."""
    if method == "generate":
        client.generate(*args, **kwargs)
    else:
        list(client.generate_stream(*args, **kwargs))


HELLO = Generation(
    text="olleh",
    token_ids=[ord(c) for c in "olleh"],
    finish_reason="eos_token",
    prompt_tokens=5,
    completion_tokens=5,
    logprobs=[],
)


# --- results ------------------------------------------------------------------------------------------


def test_generate_returns_the_whole_completion(client: QuiverClient, fake: FakeServer) -> None:
    assert client.generate("hello") == HELLO
    assert fake.servicer.calls[-1].method == "Generate"


def test_generate_stream_chunks_add_up_to_generate(client: QuiverClient, fake: FakeServer) -> None:
    prompt = "a longer prompt than one chunk"
    chunks = list(client.generate_stream(prompt))
    whole = client.generate(prompt)
    assert fake.servicer.calls[0].method == "GenerateStream"
    assert len(chunks) == -(-len(prompt) // STREAM_CHUNK_CHARS) + 1
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids
    *body, last = chunks
    assert all(c.finish_reason is None and c.prompt_tokens is None for c in body)
    assert all(c.completion_tokens is None for c in body)
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == (
        whole.finish_reason,
        whole.prompt_tokens,
        whole.completion_tokens,
    )


@pytest.mark.parametrize(
    ("kwargs", "text", "finish_reason"),
    [
        ({"max_new_tokens": 3}, "fed", "length"),
        ({"stop": ["c"]}, "fed", "stop_sequence"),
        ({"stop": ["zz", "d", "b"]}, "fe", "stop_sequence"),
        ({"max_new_tokens": 10}, "fedcba", "eos_token"),
    ],
)
def test_finish_reasons(client: QuiverClient, kwargs: dict[str, Any], text: str, finish_reason: str) -> None:
    generation = client.generate("abcdef", **kwargs)
    assert (generation.text, generation.finish_reason) == (text, finish_reason)
    last = list(client.generate_stream("abcdef", **kwargs))[-1]
    assert last.finish_reason == finish_reason


def test_model_info(client: QuiverClient, fake: FakeServer) -> None:
    info = client.model_info()
    assert info == ModelInfo(
        model_name="fake-model",
        fingerprint="f1ngerpr1nt",
        quantization="none",
        device="cpu",
        context_length=2048,
        resident_bytes=123_456_789,
        dtype="float32",
        architecture="FakeForCausalLM",
        max_new_tokens_limit=512,
        has_chat_template=True,
    )
    assert fake.servicer.calls[-1].method == "ModelInfo"


def test_model_info_mirrors_the_proto_field_for_field() -> None:
    proto_fields = [f.name for f in pb.ModelInfoResponse.DESCRIPTOR.fields]
    assert [f.name for f in dataclasses.fields(ModelInfo)] == proto_fields


def test_results_are_frozen(client: QuiverClient) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        client.generate("hi").text = "changed"  # type: ignore[misc]


# --- what goes on the wire ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["generate", "generate_stream"])
def test_unset_options_stay_unset_on_the_wire(client: QuiverClient, fake: FakeServer, method: str) -> None:
    send(client, method, "hi")
    request = last_request(fake)
    assert request.WhichOneof("input") == "text"
    assert request.text == "hi"
    assert request.adapter == ""
    assert not request.HasField("sampling")
    assert not request.HasField("stopping")
    assert not request.HasField("logprobs")


@pytest.mark.parametrize("method", ["generate", "generate_stream"])
def test_set_options_arrive(client: QuiverClient, fake: FakeServer, method: str) -> None:
    options: dict[str, Any] = {
        "adapter": "summarize@2",
        "max_new_tokens": 7,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "repetition_penalty": 1.1,
        "stop": ["\n", "END"],
        "seed": 2**63 + 5,
        "logprobs": 0,  # zero still crosses the wire: "only the chosen token's"
    }
    send(client, method, "hi", **options)
    request = last_request(fake)
    assert request.adapter == "summarize@2"
    s = request.sampling
    assert (s.temperature, s.top_p, s.repetition_penalty) == pytest.approx((0.5, 0.9, 1.1))
    assert (s.top_k, s.seed) == (40, 2**63 + 5)
    assert request.stopping.max_new_tokens == 7
    assert list(request.stopping.stop_sequences) == ["\n", "END"]
    assert request.HasField("logprobs") and request.logprobs == 0


@pytest.mark.parametrize("field", ["temperature", "top_p", "top_k", "repetition_penalty", "seed"])
def test_zero_is_sent_not_dropped(client: QuiverClient, fake: FakeServer, field: str) -> None:
    client.generate("hi", **{field: 0})
    sampling = last_request(fake).sampling
    # Zero is proto3's default value, yet with `optional` presence it still crosses the wire.
    assert [f.name for f, _ in sampling.ListFields()] == [field]


def test_generate_stream_starts_the_call_on_first_next(client: QuiverClient, fake: FakeServer) -> None:
    stream = client.generate_stream("hi")
    assert fake.servicer.calls == []
    assert next(stream).text == "ih"
    assert [c.method for c in fake.servicer.calls] == ["GenerateStream"]
    stream.close()


def test_chat_messages_arrive_as_chat_messages(client: QuiverClient, fake: FakeServer) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    generation = client.generate(messages=messages)
    request = last_request(fake)
    assert request.WhichOneof("input") == "chat"
    assert [(m.role, m.content) for m in request.chat.messages] == [("system", "be brief"), ("user", "hi")]
    assert generation.text == "system:be brief|user:hi"[::-1]


def test_timeout_and_metadata_arrive(fake: FakeServer) -> None:
    with QuiverClient(fake.target, timeout=30, metadata=[("x-api-key", "k1")]) as c:
        c.generate("hi")
        c.model_info()
    for call in fake.servicer.calls:
        assert call.metadata["x-api-key"] == "k1"
        assert call.time_remaining == pytest.approx(30, abs=1)


def test_no_timeout_sends_no_deadline(fake: FakeServer) -> None:
    with QuiverClient(fake.target) as c:
        c.generate("hi")
    assert fake.servicer.calls[-1].time_remaining is None


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((), {}, "exactly one of prompt and messages"),
        (("hi",), {"messages": [{"role": "user", "content": "hi"}]}, "exactly one of prompt and messages"),
        (("hi",), {"stop": "END"}, "stop:"),
        ((), {"messages": [{"role": "user"}]}, "messages[0]"),
        ((), {"messages": [{"role": "user", "content": "a", "name": "x"}]}, "messages[0]"),
        (("hi",), {"max_new_tokens": -1}, "stopping.max_new_tokens"),
        (("hi",), {"seed": -1}, "sampling.seed"),
        (("hi",), {"temperature": "hot"}, "sampling.temperature"),
    ],
)
@pytest.mark.parametrize("method", ["generate", "generate_stream"])
def test_requests_the_wire_cannot_carry_raise_before_sending(
    client: QuiverClient, fake: FakeServer, method: str, args: tuple[Any, ...], kwargs: Any, message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        getattr(client, method)(*args, **kwargs)
    assert fake.servicer.calls == []


# --- errors -------------------------------------------------------------------------------------------

ERROR_CASES = [
    ({"adapter": MISSING_ADAPTER}, grpc.StatusCode.NOT_FOUND, "adapter 'missing' not found"),
    ({"max_new_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "stopping.max_new_tokens: must be >= 1"),
]


@pytest.mark.parametrize(("kwargs", "code", "details"), ERROR_CASES)
def test_generate_errors_become_quiver_rpc_errors(
    client: QuiverClient, kwargs: dict[str, Any], code: grpc.StatusCode, details: str
) -> None:
    with pytest.raises(QuiverRpcError) as error:
        client.generate("hi", **kwargs)
    assert (error.value.code, error.value.details) == (code, details)
    assert str(error.value) == f"{code.name}: {details}"
    assert isinstance(error.value.__cause__, grpc.RpcError)


@pytest.mark.parametrize(("kwargs", "code", "details"), ERROR_CASES)
def test_generate_stream_errors_become_quiver_rpc_errors(
    client: QuiverClient, kwargs: dict[str, Any], code: grpc.StatusCode, details: str
) -> None:
    with pytest.raises(QuiverRpcError) as error:
        list(client.generate_stream("hi", **kwargs))
    assert (error.value.code, error.value.details) == (code, details)
    assert isinstance(error.value.__cause__, grpc.RpcError)


def test_deadline_exceeded(fake: FakeServer) -> None:
    with QuiverClient(fake.target, timeout=0.2) as c, pytest.raises(QuiverRpcError) as error:
        c.generate("hi", adapter=SLOW_ADAPTER)
    assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.mark.parametrize("method", ["generate", "model_info"])
def test_unreachable_server_is_unavailable(method: str) -> None:
    with QuiverClient(unused_target(), timeout=10) as c, pytest.raises(QuiverRpcError) as error:
        c.generate("hi") if method == "generate" else c.model_info()
    assert error.value.code == grpc.StatusCode.UNAVAILABLE


# --- cancellation -------------------------------------------------------------------------------------


def test_closing_a_stream_cancels_the_call(client: QuiverClient, fake: FakeServer) -> None:
    stream = client.generate_stream("hi", adapter=ENDLESS_ADAPTER)
    assert next(stream).text == "x"
    stream.close()
    assert fake.servicer.cancelled.wait(timeout=5)


def test_leaving_a_stream_loop_early_cancels_the_call(client: QuiverClient, fake: FakeServer) -> None:
    for chunk in client.generate_stream("hi", adapter=ENDLESS_ADAPTER):
        assert chunk.text == "x"
        break
    assert fake.servicer.cancelled.wait(timeout=5)


def test_a_finished_stream_is_not_cancelled(client: QuiverClient, fake: FakeServer) -> None:
    stream = client.generate_stream("hello")
    assert "".join(c.text for c in stream) == "olleh"
    stream.close()
    assert not fake.servicer.cancelled.wait(timeout=0.2)


# --- asyncio client -----------------------------------------------------------------------------------


def test_async_generate_stream_and_model_info(fake: FakeServer) -> None:
    async def body(c: AsyncQuiverClient) -> tuple[Generation, list[Any], ModelInfo]:
        whole = await c.generate("hello")
        chunks = [chunk async for chunk in c.generate_stream("hello")]
        return whole, chunks, await c.model_info()

    whole, chunks, info = run_async(fake.target, body)
    assert whole == HELLO
    assert "".join(c.text for c in chunks) == "olleh"
    assert chunks[-1].finish_reason == "eos_token" and chunks[-1].completion_tokens == 5
    assert info.model_name == "fake-model"
    assert [c.method for c in fake.servicer.calls] == ["Generate", "GenerateStream", "ModelInfo"]


def test_async_requests_match_sync_requests(client: QuiverClient, fake: FakeServer) -> None:
    options: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "top_k": 3, "stop": ["a"]}

    async def body(c: AsyncQuiverClient) -> None:
        await c.generate(**options)
        [_ async for _ in c.generate_stream(**options)]

    run_async(fake.target, body)
    client.generate(**options)
    list(client.generate_stream(**options))
    async_generate, async_stream, sync_generate, sync_stream = (c.request for c in fake.servicer.calls)
    assert async_generate == sync_generate
    assert async_stream == sync_stream


@pytest.mark.parametrize(("kwargs", "code", "details"), ERROR_CASES)
@pytest.mark.parametrize("method", ["generate", "generate_stream"])
def test_async_errors_become_quiver_rpc_errors(
    fake: FakeServer, method: str, kwargs: dict[str, Any], code: grpc.StatusCode, details: str
) -> None:
    async def body(c: AsyncQuiverClient) -> None:
        if method == "generate":
            await c.generate("hi", **kwargs)
        else:
            [_ async for _ in c.generate_stream("hi", **kwargs)]

    with pytest.raises(QuiverRpcError) as error:
        run_async(fake.target, body)
    assert (error.value.code, error.value.details) == (code, details)
    assert isinstance(error.value.__cause__, grpc.aio.AioRpcError)


def test_async_deadline_exceeded(fake: FakeServer) -> None:
    async def body() -> None:
        async with AsyncQuiverClient(fake.target, timeout=0.2) as c:
            await c.generate("hi", adapter=SLOW_ADAPTER)

    with pytest.raises(QuiverRpcError) as error:
        asyncio.run(body())
    assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_async_aclose_cancels_the_call(fake: FakeServer) -> None:
    async def body(c: AsyncQuiverClient) -> bool:
        stream = c.generate_stream("hi", adapter=ENDLESS_ADAPTER)
        assert (await anext(stream)).text == "x"
        await stream.aclose()
        return await asyncio.to_thread(fake.servicer.cancelled.wait, 5)

    assert run_async(fake.target, body)


@pytest.mark.parametrize("method", ["generate", "generate_stream"])
def test_async_task_cancellation_cancels_the_call(fake: FakeServer, method: str) -> None:
    async def consume(c: AsyncQuiverClient) -> None:
        if method == "generate":
            await c.generate("hi", adapter=SLOW_ADAPTER)
        else:
            [_ async for _ in c.generate_stream("hi", adapter=ENDLESS_ADAPTER)]

    async def body(c: AsyncQuiverClient) -> bool:
        task = asyncio.create_task(consume(c))
        while not fake.servicer.calls:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await asyncio.to_thread(fake.servicer.cancelled.wait, 5)

    assert run_async(fake.target, body)


@pytest.mark.parametrize("value", [-1, 21, 2**32, 2.5])
def test_bad_logprobs_raise_before_sending(client: QuiverClient, value: Any) -> None:
    with pytest.raises(ValueError, match=r"^logprobs:"):
        client.generate("hi", logprobs=value)


def test_logprobs_are_converted_per_token() -> None:
    from quiver.clients.types import TokenLogprob, chunk_from_response, generation_from_response

    entries = [pb.TokenLogprob(token_id=5, logprob=-0.25, top=[pb.TopLogprob(token_id=5, logprob=-0.25),
                                                               pb.TopLogprob(token_id=9, logprob=-2.0)])]
    expected = [TokenLogprob(5, -0.25, [(5, -0.25), (9, -2.0)])]
    whole = pb.GenerateResponse(token_ids=[5], finish_reason=pb.FINISH_REASON_LENGTH, logprobs=entries)
    assert generation_from_response(whole).logprobs == expected
    assert chunk_from_response(pb.GenerateStreamResponse(token_ids=[5], logprobs=entries)).logprobs == expected
