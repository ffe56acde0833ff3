"""Every limit answers at once under a full queue, with its precise status, on both fronts: the queue
(RESOURCE_EXHAUSTED / 429), the prompt length (INVALID_ARGUMENT / 400), the body and message sizes (413 /
RESOURCE_EXHAUSTED) and the calls per connection (RESOURCE_EXHAUSTED). Latencies are medians of a few tries.

A message over `--max-message-bytes` is refused by Quiver before it is decoded, at once; past grpc core's own cap
(TRANSPORT_CEILING times larger) the transport refuses it before any handler runs, and grpc answers that in
about 0.15 s (measured with a bare grpc server: independent of Quiver and of the message's size), so that case has
its own bound."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from quiver.server.config import TRANSPORT_CEILING
from quiver.v1 import generation_pb2 as pb
from quiver.v1 import generation_pb2_grpc as pb_grpc

from ...server_thread import ServerThread, wait_for
from .conftest import start

LIMIT_S = 0.05
TRANSPORT_LIMIT_S = 0.5  # grpc core's message-size refusal (module doc)
LONG = pb.StoppingCriteria(max_new_tokens=3000, ignore_eos=True)
# Channels of one process share connections unless told otherwise; each of these has its own.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


@pytest.fixture(scope="module")
def full(loaded: Any, adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[ServerThread, grpc.Channel]]:
    """A server whose one running row and two queue places are taken by long generations, all three on one
    connection, which is thereby at its cap of calls in flight."""
    srv = start(loaded, tmp_path_factory.mktemp("store"), adapter_dirs, register=False,
                engine={"max_running": 1, "max_queued": 2, "max_input_tokens": 40, "max_new_tokens_limit": 4000},
                max_request_bytes=64 * 1024, max_message_bytes=64 * 1024, max_streams_per_connection=3)
    busy = grpc.insecure_channel(srv.target, options=OWN_CONNECTION)
    stub = pb_grpc.GenerationServiceStub(busy)
    streams = [stub.GenerateStream(pb.GenerateStreamRequest(text="w1 w2", stopping=LONG), timeout=120)
               for _ in range(3)]
    try:
        engine = srv.running.engine
        # 60 s bounds a failure only: on a loaded machine the decoding first stream can delay the others' arrival.
        admitted = wait_for(lambda: engine.num_running == 1 and engine.num_waiting == 2, timeout=60)
        assert admitted, (engine.num_running, engine.num_waiting, [s.code() if s.done() else None for s in streams])
        yield srv, busy
    finally:
        for stream in streams:
            stream.cancel()
        busy.close()
        srv.close()


def timed(attempt: Callable[[], Any], tries: int = 5) -> tuple[list[Any], float]:
    """Each try's outcome and the median latency."""
    outcomes, seconds = [], []
    for _ in range(tries):
        start = time.perf_counter()
        outcomes.append(attempt())
        seconds.append(time.perf_counter() - start)
    return outcomes, statistics.median(seconds)


def grpc_code(stub: Any, request: pb.GenerateRequest) -> grpc.StatusCode:
    try:
        stub.Generate(request, timeout=10)
    except grpc.RpcError as e:
        return e.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_grpc_limits_answer_at_once_under_a_full_queue(full: tuple[ServerThread, grpc.Channel]):
    srv, _ = full
    with grpc.insecure_channel(srv.target, options=OWN_CONNECTION) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        stub.ModelInfo(pb.ModelInfoRequest(), timeout=10)  # connected
        cases = {
            "queue full": (pb.GenerateRequest(text="w1", stopping=pb.StoppingCriteria(max_new_tokens=1)),
                           grpc.StatusCode.RESOURCE_EXHAUSTED),
            "prompt tokens": (pb.GenerateRequest(text=" ".join(["w1"] * 100)), grpc.StatusCode.INVALID_ARGUMENT),
            "prompt characters": (pb.GenerateRequest(text="w1 " * 20_000), grpc.StatusCode.INVALID_ARGUMENT),
            "token ids": (pb.GenerateRequest(tokens=pb.TokenIds(ids=[5] * 1000)), grpc.StatusCode.INVALID_ARGUMENT),
            "message size": (pb.GenerateRequest(text="w" * 70_000), grpc.StatusCode.RESOURCE_EXHAUSTED),
            "message size past the transport's cap": (pb.GenerateRequest(text="w" * (TRANSPORT_CEILING * 65_536)),
                                                      grpc.StatusCode.RESOURCE_EXHAUSTED),
        }
        for name, (request, expected) in cases.items():
            codes, median = timed(functools.partial(grpc_code, stub, request))
            assert set(codes) == {expected}, (name, codes)
            assert median < (TRANSPORT_LIMIT_S if "transport" in name else LIMIT_S), (name, median)


def test_a_connection_at_its_call_cap_is_refused_at_once(full: tuple[ServerThread, grpc.Channel]):
    srv, busy = full
    stub = pb_grpc.GenerationServiceStub(busy)

    def model_info() -> tuple[grpc.StatusCode, str]:
        try:
            stub.ModelInfo(pb.ModelInfoRequest(), timeout=10)
        except grpc.RpcError as e:
            return e.code(), e.details()
        return grpc.StatusCode.OK, ""

    outcomes, median = timed(model_info)
    assert {code for code, _ in outcomes} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert all("--max-streams-per-connection" in details for _, details in outcomes)
    assert median < LIMIT_S, median
    with grpc.insecure_channel(srv.target, options=OWN_CONNECTION) as other:  # the cap is per connection
        assert pb_grpc.GenerationServiceStub(other).ModelInfo(pb.ModelInfoRequest(), timeout=10).model_name


def http_status(client: httpx.Client, body: Any = None, content: bytes | None = None) -> int:
    if content is not None:
        return client.post("/v1/completions", content=content, headers={"content-type": "application/json"}).status_code
    return client.post("/v1/completions", json=body).status_code


def test_http_limits_answer_at_once_under_a_full_queue(full: tuple[ServerThread, grpc.Channel]):
    with httpx.Client(base_url=full[0].http, timeout=10) as client:
        client.get("/ready")  # connect
        cases: dict[str, tuple[Callable[[], int], int]] = {
            "queue full": (lambda: http_status(client, {"model": "tiny", "prompt": "w1", "max_tokens": 1}), 429),
            "prompt tokens": (lambda: http_status(client, {"model": "tiny", "prompt": " ".join(["w1"] * 100)}), 400),
            "body size": (lambda: http_status(client, content=b'{"prompt": "' + b"w" * 70_000 + b'"}'), 413),
        }
        for name, (attempt, expected) in cases.items():
            statuses, median = timed(attempt)
            assert set(statuses) == {expected}, (name, statuses)
            assert median < LIMIT_S, (name, median)
