"""A connection lost mid-call (fake_transport.CuttableProxy between the client and a real server): each client
raises QuiverRpcError UNAVAILABLE rather than a raw gRPC error or a silently short result, `quiver generate
--stream` exits 1 after the text it got, and the real server notices and frees the request."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import grpc
import pytest

from quiver.clients import AsyncQuiverClient, QuiverClient, QuiverRpcError
from quiver.clients.cli import main

from ..server_thread import ServerThread, wait_for
from .conftest import LONG, busy
from .fake_transport import CuttableProxy

PROMPT = "w1 w2 w3"


@pytest.fixture
def proxy(server: ServerThread) -> Iterator[CuttableProxy]:
    with CuttableProxy(server.target) as p:
        yield p
    assert wait_for(lambda: busy(server) == 0, timeout=5)  # the server noticed the lost client


def cut_once_busy(server: ServerThread, proxy: CuttableProxy) -> threading.Thread:
    """Cuts the connection from another thread as soon as the server is generating."""

    def cut() -> None:
        assert wait_for(lambda: busy(server) > 0, timeout=30)
        proxy.cut()

    thread = threading.Thread(target=cut)
    thread.start()
    return thread


def test_a_stream_cut_mid_way_raises_unavailable(server: ServerThread, proxy: CuttableProxy) -> None:
    with QuiverClient(proxy.target, timeout=60) as client:
        stream = client.generate_stream(PROMPT, max_new_tokens=LONG, ignore_eos=True)
        assert next(stream).token_ids
        proxy.cut()
        with pytest.raises(QuiverRpcError) as error:
            list(stream)
    assert error.value.code == grpc.StatusCode.UNAVAILABLE
    assert isinstance(error.value.__cause__, grpc.RpcError)


def test_a_unary_call_cut_mid_way_raises_unavailable(server: ServerThread, proxy: CuttableProxy) -> None:
    cutter = cut_once_busy(server, proxy)
    with QuiverClient(proxy.target, timeout=60) as client, pytest.raises(QuiverRpcError) as error:
        client.generate(PROMPT, max_new_tokens=LONG, ignore_eos=True)
    cutter.join()
    assert error.value.code == grpc.StatusCode.UNAVAILABLE


def test_an_async_stream_cut_mid_way_raises_unavailable(server: ServerThread, proxy: CuttableProxy) -> None:
    async def body() -> None:
        async with AsyncQuiverClient(proxy.target, timeout=60) as client:
            stream = client.generate_stream(PROMPT, max_new_tokens=LONG, ignore_eos=True)
            assert (await anext(stream)).token_ids
            proxy.cut()
            [_ async for _ in stream]

    with pytest.raises(QuiverRpcError) as error:
        asyncio.run(body())
    assert error.value.code == grpc.StatusCode.UNAVAILABLE
    assert isinstance(error.value.__cause__, grpc.aio.AioRpcError)


def test_cli_stream_cut_mid_way_exits_1(server: ServerThread, proxy: CuttableProxy,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    cutter = cut_once_busy(server, proxy)
    code = main(["generate", "--server", proxy.target, "--stream", "--max-new-tokens", str(LONG), PROMPT])
    cutter.join()
    out, err = capsys.readouterr()
    assert code == 1 and err.startswith("error: UNAVAILABLE: ") and err.count("\n") == 1
    assert not out.endswith("\n")  # the text so far, without the newline a finished stream ends with
