"""Deadlines end work in the engine: 100 concurrent streams with a 0.5 s deadline on 2,000-token generations all
end DEADLINE_EXCEEDED at about 0.6 s and leave the running batch empty; 100 HTTP streams whose clients go away
the same. Timings are measured from each call's start."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from quiver.v1 import generation_pb2 as pb
from quiver.v1 import generation_pb2_grpc as pb_grpc

from ...server_thread import ServerThread, wait_for
from .conftest import start

CALLS = 100
DEADLINE_S = 0.5
ENDED_BY_S = 0.75  # "about 0.6 s": the deadline, one engine step and the status's way back, with room for CI


@pytest.fixture(scope="module")
def roomy(loaded: Any, adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[ServerThread]:
    srv = start(loaded, tmp_path_factory.mktemp("store"), adapter_dirs, register=False,
                engine={"max_running": 128, "max_new_tokens_limit": 2000})
    yield srv
    srv.close()


async def _deadline_calls(target: str) -> list[tuple[grpc.StatusCode, float, int]]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        # Connected, and the engine warmed on a batch of this size (a CPU's first forward of a new shape builds its
        # kernels), before the clock starts: the deadlines then cut generations that are running.
        warm = pb.StoppingCriteria(max_new_tokens=2, ignore_eos=True)
        await asyncio.gather(*(stub.Generate(pb.GenerateRequest(text=f"w{i % 50} w2", stopping=warm), timeout=60)
                               for i in range(CALLS)))

        async def one(i: int) -> tuple[grpc.StatusCode, float, int]:
            request = pb.GenerateStreamRequest(text=f"w{i % 50} w2",
                                               stopping=pb.StoppingCriteria(max_new_tokens=2000, ignore_eos=True))
            start, tokens = time.perf_counter(), 0
            try:
                async for message in stub.GenerateStream(request, timeout=DEADLINE_S):
                    tokens += len(message.token_ids)
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as e:
                code = e.code()
            return code, time.perf_counter() - start, tokens

        return await asyncio.gather(*(one(i) for i in range(CALLS)))


def test_grpc_deadlines_end_every_generation_and_free_the_batch(roomy: ServerThread):
    engine = roomy.running.engine
    outcomes = asyncio.run(_deadline_calls(roomy.target))
    ended = time.perf_counter()
    assert {code for code, _, _ in outcomes} == {grpc.StatusCode.DEADLINE_EXCEEDED}
    slowest = max(seconds for _, seconds, _ in outcomes)
    assert slowest < ENDED_BY_S, slowest
    assert all(tokens < 2000 for _, _, tokens in outcomes)  # every one was cut...
    assert sum(tokens > 0 for _, _, tokens in outcomes) > CALLS // 2  # ...most while running
    assert wait_for(lambda: engine.num_running == 0 and engine.num_waiting == 0, timeout=5)
    freed = time.perf_counter() - ended
    median = sorted(seconds for _, seconds, _ in outcomes)[CALLS // 2]
    print(f"\ngRPC: {CALLS} calls ended by {slowest:.3f}s (median {median:.3f}s), batch empty {freed * 1000:.0f} ms "
          "after the last")
    assert freed < 0.25, freed  # right after: the next engine step drops them


async def _disconnecting_clients(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10, limits=httpx.Limits(max_connections=CALLS)) as client:
        await client.get("/ready")

        async def one(i: int) -> None:
            body = {"model": "tiny", "prompt": f"w{i % 50} w2", "max_tokens": 2000, "ignore_eos": True, "stream": True}
            async with client.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                async for _ in response.aiter_lines():
                    if asyncio.get_running_loop().time() > deadline:
                        return  # the client goes away mid-stream

        deadline = asyncio.get_running_loop().time() + DEADLINE_S
        await asyncio.gather(*(one(i) for i in range(CALLS)))


def test_http_clients_that_go_away_free_the_batch(roomy: ServerThread):
    engine = roomy.running.engine
    asyncio.run(_disconnecting_clients(roomy.http))
    gone = time.perf_counter()
    assert wait_for(lambda: engine.num_running == 0 and engine.num_waiting == 0, timeout=5)
    freed = time.perf_counter() - gone
    print(f"\nHTTP: batch empty {freed * 1000:.0f} ms after the last of {CALLS} clients went away")
    assert freed < 0.25, freed
