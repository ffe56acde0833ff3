"""AsyncQuiverClient against a real Quiver server: each call gives what the blocking client gives (checked against
the real server in test_client.py and test_adapter_client.py), errors carry the server's status, and `aclose()`
or cancelling the task that awaits a call stops the server's work."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from quiver.clients import AdapterInfo, AsyncQuiverClient, QuiverClient, QuiverRpcError, upload

from ..served import ADMIN
from ..server_thread import ServerThread, wait_for
from .conftest import CLASSIFIER, LONG, busy, calls_ended

T = TypeVar("T")
PROMPT = "w1 w2 w3"


def run_async(target: str, body: Callable[[AsyncQuiverClient], Coroutine[Any, Any, T]], **kwargs: Any) -> T:
    """Runs `body` with an AsyncQuiverClient made (and closed) inside a fresh event loop."""

    async def main() -> T:
        async with AsyncQuiverClient(target, **{"timeout": 60, **kwargs}) as c:
            return await body(c)

    return asyncio.run(main())


@pytest.fixture
def client(server: ServerThread) -> Iterator[QuiverClient]:
    with QuiverClient(server.target, timeout=60, admin_token=ADMIN) as c:
        yield c


# --- generation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ["", "prompt"])
def test_async_calls_equal_sync_calls(server: ServerThread, client: QuiverClient, adapter: str) -> None:
    options: dict[str, Any] = {"adapter": adapter, "max_new_tokens": 6, "temperature": 0, "logprobs": 2}

    async def body(c: AsyncQuiverClient) -> tuple[Any, ...]:
        whole = await c.generate(PROMPT, **options)
        chunks = [chunk async for chunk in c.generate_stream(PROMPT, **options)]
        return whole, chunks, await c.model_info(), await c.embed(["w1 w2", "w3"], adapter=adapter)

    whole, chunks, info, embeddings = run_async(server.target, body)
    assert whole == client.generate(PROMPT, **options)
    assert chunks == list(client.generate_stream(PROMPT, **options))
    assert info == client.model_info()
    expected = client.embed(["w1 w2", "w3"], adapter=adapter)
    assert embeddings.prompt_tokens == expected.prompt_tokens
    for got, want in zip(embeddings.vectors, expected.vectors, strict=True):
        assert got == pytest.approx(want, abs=1e-5)


def test_async_classify_equals_sync(server: ServerThread, client: QuiverClient) -> None:
    async def body(c: AsyncQuiverClient) -> Any:
        return await c.classify(["w1 w2", "w4"], adapter=CLASSIFIER)

    got = run_async(server.target, body)
    expected = client.classify(["w1 w2", "w4"], adapter=CLASSIFIER)
    assert [r.label for r in got] == [r.label for r in expected]
    for a, b in zip(got, expected, strict=True):
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-5)


@pytest.mark.parametrize(("kwargs", "code"), [
    ({"adapter": "nope"}, grpc.StatusCode.NOT_FOUND),
    ({"max_new_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT),
])
@pytest.mark.parametrize("method", ["generate", "generate_stream"])
def test_async_errors_become_quiver_rpc_errors(server: ServerThread, method: str, kwargs: dict[str, Any],
                                               code: grpc.StatusCode) -> None:
    async def body(c: AsyncQuiverClient) -> None:
        if method == "generate":
            await c.generate(PROMPT, **kwargs)
        else:
            [_ async for _ in c.generate_stream(PROMPT, **kwargs)]

    with pytest.raises(QuiverRpcError) as error:
        run_async(server.target, body)
    assert error.value.code == code and "request id" in error.value.details
    assert isinstance(error.value.__cause__, grpc.aio.AioRpcError)


def test_async_deadline_exceeded_ends_the_server_work(server: ServerThread) -> None:
    async def body(c: AsyncQuiverClient) -> None:
        await c.generate(PROMPT, max_new_tokens=LONG, ignore_eos=True)

    with pytest.raises(QuiverRpcError) as error:
        run_async(server.target, body, timeout=0.3)
    assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: busy(server) == 0, timeout=5)


def test_async_aclose_cancels_the_call(server: ServerThread) -> None:
    """A 2,000-token generation takes seconds; `aclose()` must free the server's row at once."""
    cancelled = calls_ended(server, "GenerateStream", "CANCELLED")

    async def body(c: AsyncQuiverClient) -> bool:
        stream = c.generate_stream(PROMPT, max_new_tokens=LONG, ignore_eos=True)
        assert (await anext(stream)).token_ids and busy(server) == 1
        await stream.aclose()
        return await asyncio.to_thread(wait_for, lambda: busy(server) == 0, 1)

    assert run_async(server.target, body)
    assert wait_for(lambda: calls_ended(server, "GenerateStream", "CANCELLED") == cancelled + 1, timeout=5)


@pytest.mark.parametrize("method", ["generate", "generate_stream"])
def test_async_task_cancellation_cancels_the_call(server: ServerThread, method: str) -> None:
    async def consume(c: AsyncQuiverClient) -> None:
        if method == "generate":
            await c.generate(PROMPT, max_new_tokens=LONG, ignore_eos=True)
        else:
            [_ async for _ in c.generate_stream(PROMPT, max_new_tokens=LONG, ignore_eos=True)]

    async def body(c: AsyncQuiverClient) -> bool:
        task = asyncio.create_task(consume(c))
        while busy(server) == 0:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await asyncio.to_thread(wait_for, lambda: busy(server) == 0, 1)

    assert run_async(server.target, body)


# --- adapters -----------------------------------------------------------------------------------------


def test_async_adapter_calls(server: ServerThread, client: QuiverClient, served_adapter_dirs: dict[str, Path]
                             ) -> None:
    """Register (uploaded in small chunks), import, list, iterate, get and delete, each as the server stores it."""
    lora, prompt = served_adapter_dirs["lora"], served_adapter_dirs["prompt"]

    async def body(c: AsyncQuiverClient) -> tuple[Any, ...]:
        registered = await c.register_adapter(lora, "aio", description="d", chunk_size=4096)
        imported = await c.import_adapter(str(prompt), "aio", mode="new_version")
        page = await c.list_adapters(page_size=2)
        names = [a.name async for a in c.iter_adapters(page_size=2)]
        details = await c.get_adapter("aio@1")
        return registered, imported, page, names, details, await c.delete_adapter("aio")

    registered, imported, page, names, details, deleted = run_async(server.target, body, admin_token=ADMIN)
    weights = (lora / "adapter_model.safetensors").read_bytes()
    assert (registered.ref, registered.kind, registered.description) == ("aio@1", "lora", "d")
    assert registered.sha256 == hashlib.sha256(weights).hexdigest()
    assert (imported.ref, imported.kind) == ("aio@2", "prompt_tuning")
    assert len(page.adapters) == 2 and page.next_page_token
    assert names == sorted(["aio", CLASSIFIER, "lora", "prefix", "prompt"])
    assert (details.adapter, details.versions) == (registered, [1, 2])
    assert deleted == [registered, imported]
    assert [a.name for a in client.iter_adapters()] == sorted([CLASSIFIER, "lora", "prefix", "prompt"])


@pytest.mark.parametrize(("token", "call", "code"), [
    (ADMIN, lambda c, d: c.register_adapter(d, "lora"), grpc.StatusCode.ALREADY_EXISTS),
    (ADMIN, lambda c, d: c.get_adapter("nope"), grpc.StatusCode.NOT_FOUND),
    (ADMIN, lambda c, d: c.import_adapter("/etc", "x"), grpc.StatusCode.INVALID_ARGUMENT),
    (None, lambda c, d: c.delete_adapter("lora"), grpc.StatusCode.UNAUTHENTICATED),
    ("wrong", lambda c, d: c.register_adapter(d, "x"), grpc.StatusCode.UNAUTHENTICATED),
])
def test_async_adapter_errors(server: ServerThread, served_adapter_dirs: dict[str, Path], token: str | None,
                              call: Any, code: grpc.StatusCode) -> None:
    async def body(c: AsyncQuiverClient) -> object:
        result: object = await call(c, served_adapter_dirs["lora"])
        return result

    with pytest.raises(QuiverRpcError) as error:
        run_async(server.target, body, admin_token=token)
    assert error.value.code == code
    assert isinstance(error.value.__cause__, grpc.aio.AioRpcError)


def test_async_register_raises_a_read_error_rather_than_a_cancelled_call(
        server: ServerThread, client: QuiverClient, served_adapter_dirs: dict[str, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    directory = served_adapter_dirs["lora"]
    listed = [*upload.adapter_files(directory), directory / "zz_gone.bin"]  # as if deleted while uploading
    monkeypatch.setattr(upload, "adapter_files", lambda _: listed)

    async def body(c: AsyncQuiverClient) -> AdapterInfo:
        return await c.register_adapter(directory, "gone")

    with pytest.raises(FileNotFoundError, match="zz_gone"):
        run_async(server.target, body, admin_token=ADMIN)
    with pytest.raises(QuiverRpcError) as error:
        client.get_adapter("gone")  # the cancelled upload registered nothing
    assert error.value.code == grpc.StatusCode.NOT_FOUND
