"""The same streaming request over each front, timed from the client: gRPC (Quiver's asyncio client) and HTTP
(Server-Sent Events from /v1/completions, read with httpx as a load generator would).

Each returns the tokens generated and the time to the first chunk that carries text; both fronts run the same
greedy request with `ignore_eos` (every request generates exactly `max_tokens`, as in bench_engine), so they
generate the same tokens.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import httpx

from quiver.clients.aio import AsyncQuiverClient


@dataclass(frozen=True)
class Timed:
    tokens: int
    ttft_s: float
    text: str


async def over_grpc(client: AsyncQuiverClient, adapter: str, prompt: str, max_tokens: int) -> Timed:
    start = time.perf_counter()
    ttft: float | None = None
    texts: list[str] = []
    tokens = 0
    async for chunk in client.generate_stream(prompt, adapter=adapter, max_new_tokens=max_tokens, ignore_eos=True):
        if ttft is None and chunk.token_ids:
            ttft = time.perf_counter() - start
        tokens += len(chunk.token_ids)
        texts.append(chunk.text)
    assert ttft is not None
    return Timed(tokens, ttft, "".join(texts))


async def over_http(client: httpx.AsyncClient, url: str, adapter: str, prompt: str, max_tokens: int) -> Timed:
    body = {"model": adapter, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    start = time.perf_counter()
    ttft: float | None = None
    texts: list[str] = []
    tokens = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"]:
                if ttft is None:
                    ttft = time.perf_counter() - start
                texts.append(chunk["choices"][0]["text"])
            elif chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    assert ttft is not None
    return Timed(tokens, ttft, "".join(texts))
