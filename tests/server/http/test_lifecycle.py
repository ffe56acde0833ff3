"""Health that tells the truth, on a real server: NOT_SERVING while the model loads (the ports answer early),
while the engine is stalled, and once its thread died, when every call fails with UNAVAILABLE at once and
`serve` ends with status 1."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from quiver.server.app import attach, open_ports, serve_until_signal
from quiver.server.config import AdapterConfig, EngineConfig, ModelConfig, ServerConfig
from quiver.server.lifecycle import HealthMonitor
from quiver.v1 import generation_pb2 as pb
from quiver.v1 import generation_pb2_grpc as pb_grpc

from ...server_thread import ServerThread, _free_port, wait_for
from .conftest import start

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        status: int = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        return status


def generate(target: str, max_new_tokens: int = 2) -> pb.GenerateResponse:
    with grpc.insecure_channel(target) as channel:
        request = pb.GenerateRequest(text="w1 w2", stopping=pb.StoppingCriteria(max_new_tokens=max_new_tokens))
        response: pb.GenerateResponse = pb_grpc.GenerationServiceStub(channel).Generate(request, timeout=30)
        return response


def metric(http: str, name: str) -> float:
    line = next(line for line in httpx.get(http + "/metrics").text.splitlines() if line.startswith(name + " "))
    return float(line.split()[-1])


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)


def test_ports_answer_not_serving_until_the_model_is_attached(loop: asyncio.AbstractEventLoop, loaded: Any,
                                                              tmp_path: Path):
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=0, http_port=_free_port())
    adapters = AdapterConfig(store=str(tmp_path / "store"))
    ports = asyncio.run_coroutine_threadsafe(open_ports(config, adapters), loop).result(30)
    target, http = f"127.0.0.1:{ports.port}", f"http://127.0.0.1:{config.http_port}"
    try:
        assert health(target) == NOT_SERVING
        with pytest.raises(grpc.RpcError) as refused:
            generate(target)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in refused.value.details()
        assert httpx.get(http + "/health").json() == {"status": "loading"}  # alive: no restart while loading
        assert httpx.get(http + "/ready").status_code == 503
        completion = httpx.post(http + "/v1/completions", json={"model": "tiny", "prompt": "w1"})
        assert completion.status_code == 503 and completion.json()["error"]["code"] == "unavailable"
        assert metric(http, "quiver_ready") == 0
        running = asyncio.run_coroutine_threadsafe(attach(ports, loaded, EngineConfig(), config, adapters), loop)
        server = running.result(60)
        assert health(target) == SERVING
        assert httpx.get(http + "/ready").json() == {"status": "serving"}
        assert generate(target).usage.completion_tokens == 2
        assert metric(http, "quiver_ready") == 1
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(30)
    finally:
        asyncio.run_coroutine_threadsafe(ports.close(), loop).result(30)


def monitored(srv: ServerThread, stall_seconds: float) -> HealthMonitor:
    """A health monitor over `srv`'s engine, running on its loop (as `serve` runs one)."""
    running = srv.running
    monitor = HealthMonitor(running.engine, running.state, running.ports.health, stall_seconds)
    asyncio.run_coroutine_threadsafe(monitor.run(), srv.loop)
    return monitor


def test_a_stalled_engine_is_not_serving_until_steps_resume(loaded: Any, adapter_dirs: dict[str, Path],
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    srv = start(loaded, tmp_path / "store", adapter_dirs, register=False)
    try:
        monitored(srv, stall_seconds=0.5)
        release = threading.Event()
        engine = srv.running.engine
        run = engine._runner.run

        def stuck(*args: Any) -> Any:
            release.wait(timeout=30)
            return run(*args)

        monkeypatch.setattr(engine._runner, "run", stuck)
        done: list[pb.GenerateResponse] = []
        caller = threading.Thread(target=lambda: done.append(generate(srv.target)))
        caller.start()
        assert wait_for(lambda: health(srv.target) == NOT_SERVING)
        assert httpx.get(srv.http + "/health").status_code == 503  # a stall is what a restart cures
        assert httpx.get(srv.http + "/ready").json() == {"status": "stalled"}
        release.set()
        caller.join(timeout=30)
        assert done and done[0].usage.completion_tokens == 2
        assert wait_for(lambda: health(srv.target) == SERVING)
        assert httpx.get(srv.http + "/health").status_code == 200
    finally:
        srv.close()


def test_a_dead_engine_fails_every_call_at_once(loaded: Any, adapter_dirs: dict[str, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch):
    srv = start(loaded, tmp_path / "store", adapter_dirs, register=False,
                engine={"max_running": 1, "max_new_tokens_limit": 4000})
    monitor = monitored(srv, stall_seconds=60)
    engine = srv.running.engine
    with grpc.insecure_channel(srv.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        long = pb.GenerateStreamRequest(text="w1 w2", stopping=pb.StoppingCriteria(max_new_tokens=3000,
                                                                                    ignore_eos=True))
        stream = stub.GenerateStream(long, timeout=60)
        next(stream)  # it runs
        waiting = stub.Generate.future(pb.GenerateRequest(text="w3", stopping=pb.StoppingCriteria(max_new_tokens=2)))

        def broken(*args: Any) -> Any:
            raise RuntimeError("scheduler bug")

        monkeypatch.setattr(engine._scheduler, "plan", broken)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as ended:
            for _ in stream:
                pass
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as failed:
            waiting.result(timeout=10)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 5  # none hangs
    assert wait_for(monitor.died.is_set)
    assert health(srv.target) == NOT_SERVING
    assert httpx.get(srv.http + "/health").status_code == 503
    with pytest.raises(grpc.RpcError) as refused:
        generate(srv.target)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    srv.close()


def test_serve_exits_with_status_1_when_the_engine_dies(base_dir: Path, tmp_path: Path):
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=0, http_port=0, engine_stall_seconds=60)
    model = ModelConfig(model=str(base_dir), device="cpu", quantize="none", cache_dir=str(tmp_path / "cache"))

    def kill_engine(running: Any) -> None:  # a bug in the engine loop, once it serves
        def broken(*args: Any) -> Any:
            raise RuntimeError("scheduler bug")

        running.engine._scheduler.plan = broken
        running.engine._wake.set()

    status = asyncio.run(serve_until_signal(model, EngineConfig(), config, AdapterConfig(store=str(tmp_path / "s")),
                                            on_serving=kill_engine))
    assert status == 1
