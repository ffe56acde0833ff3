"""Limits and lifecycle over HTTP, each on a server of its own: 413 too large, 429 queue full, 503 while draining
(the requests already running still finish)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from ...server_thread import wait_for
from .conftest import BASE_ID, start
from .test_errors import CHAT, COMPLETION, error_of


def test_too_large_is_413(loaded: Any, adapter_dirs: dict[str, Path], tmp_path: Path):
    srv = start(loaded, tmp_path / "store", adapter_dirs, register=False, max_request_bytes=2048,
                engine={"max_cache_bytes": 64 * 2**10})
    try:
        error = error_of(httpx.post(srv.http + "/v1/completions", json={**COMPLETION, "model": BASE_ID,
                                                                         "prompt": "w1 " * 1000}), 413)
        assert error["code"] == "request_too_large"
        chunked = httpx.post(srv.http + "/v1/completions", content=iter([b"{" + b" " * 4096 + b"}"]))
        assert error_of(chunked, 413)["code"] == "request_too_large"  # no Content-Length: counted as it arrives
        # A generation the key/value cache could never hold, even alone.
        error = error_of(httpx.post(srv.http + "/v1/completions", json={**COMPLETION, "model": BASE_ID,
                                                                         "max_tokens": 2000}), 413)
        assert "--max-cache-bytes" in error["message"]
    finally:
        srv.close()


def test_full_queue_is_429(loaded: Any, adapter_dirs: dict[str, Path], tmp_path: Path):
    srv = start(loaded, tmp_path / "store", adapter_dirs, register=False, engine={"max_running": 1, "max_queued": 1})

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as c:
            body = {"model": BASE_ID, "prompt": "w1 w2", "max_tokens": 1500}
            replies = await asyncio.gather(*(c.post(srv.http + "/v1/completions", json=body) for _ in range(6)))
            for r in replies:
                if r.status_code == 429:
                    assert error_of(r, 429)["type"] == "rate_limit_error"
            return [r.status_code for r in replies]

    try:
        statuses = asyncio.run(burst())
        assert statuses.count(429) >= 1 and set(statuses) <= {200, 429} and 200 in statuses
    finally:
        srv.close()


def test_draining_is_503_while_running_requests_finish(loaded: Any, adapter_dirs: dict[str, Path], tmp_path: Path):
    srv = start(loaded, tmp_path / "store", adapter_dirs)
    body = {"model": "lora", "prompt": "w1 w2", "max_tokens": 300, "stream": True}
    try:
        with httpx.Client(timeout=60) as c, c.stream("POST", srv.http + "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            stopping = asyncio.run_coroutine_threadsafe(srv.running.stop(30), srv.loop)
            assert wait_for(lambda: httpx.get(srv.http + "/ready").status_code == 503)
            assert httpx.get(srv.http + "/health").status_code == 200  # draining is alive: no restart
            refused = httpx.post(srv.http + "/v1/chat/completions", json=CHAT)
            assert error_of(refused, 503)["code"] == "unavailable"
            rest = [line for line in lines if line]  # the running stream still ends normally
        assert rest[-1] == "data: [DONE]" and '"finish_reason":"length"' in rest[-2]
        stopping.result(timeout=30)
    finally:
        srv.close()  # stopping an already stopped server again only ends its loop


def test_http_port_zero_turns_http_off(loaded: Any, adapter_dirs: dict[str, Path], tmp_path: Path):
    srv = start(loaded, tmp_path / "store", adapter_dirs, register=False, http_port=0)
    try:
        assert srv.running.http_port is None and srv.running.http is None
        from quiver.clients.client import QuiverClient

        with QuiverClient(srv.target) as client:  # gRPC serves as ever
            assert client.generate("w1 w2", max_new_tokens=2).completion_tokens == 2
    finally:
        srv.close()
