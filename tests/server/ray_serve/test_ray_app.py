"""Quiver on a local Ray cluster (two engine replicas): requests reach the replica that holds their adapter, an
adapter registered through the ingress is served everywhere, gRPC and HTTP answer alike, and killing a replica
fails only what it was running while Ray brings it back."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from typing import Any

import grpc
import httpx
import pytest

from quiver.clients.client import QuiverClient
from quiver.clients.errors import QuiverRpcError

from ...adapters.adapter_factory import make_lora
from .conftest import ADAPTERS, ADMIN, Cluster, replica_counts, wait_for

pytestmark = pytest.mark.ray


def complete(cluster: Cluster, model: str, tokens: int = 2) -> dict[str, Any]:
    response = httpx.post(f"{cluster.http}/v1/completions", timeout=120,
                          json={"model": model, "prompt": "w1 w2 w3", "max_tokens": tokens, "temperature": 0})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def _burst(cluster: Cluster, models: list[str], concurrency: int) -> list[int]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120) as client:
        async def one(model: str) -> int:
            async with limit:
                body = {"model": model, "prompt": "w1 w2 w3", "max_tokens": 2, "temperature": 0}
                return (await client.post(f"{cluster.http}/v1/completions", json=body)).status_code
        return list(await asyncio.gather(*(one(m) for m in models)))


def held(cluster: Cluster) -> Counter[str]:
    """Requests the engine replicas ran, by whether their adapter was already in that replica's host memory."""
    counts: Counter[str] = Counter()
    for (_, label), value in replica_counts(cluster, "quiver_replica_requests").items():
        counts[label] += int(value)
    return counts


def test_requests_reach_the_replica_that_holds_their_adapter(cluster: Cluster):
    for name in ADAPTERS:  # each adapter used once: now held by one replica
        complete(cluster, name)
    assert wait_for(lambda: sum(held(cluster).values()) >= len(ADAPTERS))
    before = held(cluster)
    rng = random.Random(0)
    traffic = [rng.choice(ADAPTERS) for _ in range(200)]
    assert set(asyncio.run(_burst(cluster, traffic, concurrency=8))) == {200}
    assert wait_for(lambda: sum(held(cluster).values()) - sum(before.values()) >= len(traffic))
    after = held(cluster)
    yes, no = after["yes"] - before["yes"], after["no"] - before["no"]
    assert yes + no == len(traffic)
    assert yes / len(traffic) >= 0.95, (yes, no)
    per_replica = Counter({r: v for (r, label), v in replica_counts(cluster, "quiver_replica_requests").items()
                           if label != "none"})
    assert len(per_replica) == 2 and min(per_replica.values()) > 0.2 * sum(per_replica.values())  # both work


def test_grpc_through_ray_answers_as_http(cluster: Cluster):
    http = complete(cluster, ADAPTERS[3], tokens=6)["choices"][0]["text"]
    with QuiverClient(cluster.grpc, timeout=60) as client:
        assert client.generate("w1 w2 w3", adapter=ADAPTERS[3], max_new_tokens=6).text == http
        assert "".join(c.text for c in client.generate_stream("w1 w2 w3", adapter=ADAPTERS[3],
                                                                max_new_tokens=6)) == http
        with pytest.raises(QuiverRpcError) as err:
            client.generate("w1 w2 w3", adapter="no-such-adapter", max_new_tokens=2)
        assert err.value.code == grpc.StatusCode.NOT_FOUND


def _replica_actors() -> dict[str, Any]:
    """{replica id: actor handle} of the live engine replicas."""
    import ray

    named = ray.util.list_named_actors(all_namespaces=True)  # a killed actor's name is released
    return {a["name"].rsplit("#", 1)[-1]: ray.get_actor(a["name"], namespace=a["namespace"])
            for a in named if "QuiverEngine" in a["name"]}


def _running_replicas() -> int:
    from ray import serve

    from quiver.server.ray_serve.app import APP_NAME, ENGINE_DEPLOYMENT

    states = serve.status().applications[APP_NAME].deployments[ENGINE_DEPLOYMENT].replica_states
    return sum(count for state, count in states.items() if str(getattr(state, "value", state)) == "RUNNING")


def _host_loads(cluster: Cluster) -> dict[str, float]:
    return {r: v for (r, tier), v in replica_counts(cluster, "quiver_replica_adapter_loads").items() if tier == "host"}


async def _streams(cluster: Cluster, models: list[str], started: asyncio.Event) -> list[str]:
    """Long streams; returns how each ended: "length", or the error code an error event carried."""
    async with httpx.AsyncClient(timeout=120) as client:
        async def one(model: str) -> str:
            body = {"model": model, "prompt": "w1 w2", "max_tokens": 1500, "stream": True, "ignore_eos": True}
            try:
                async with client.stream("POST", f"{cluster.http}/v1/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        started.set()
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            return str(chunk["error"]["code"])
                        if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                            return str(chunk["choices"][0]["finish_reason"])
            except httpx.HTTPError as e:
                return type(e).__name__
            return "ended without a finish"
        return list(await asyncio.gather(*(one(m) for m in models)))


def test_killing_a_replica_fails_only_its_requests_and_ray_restarts_it(cluster: Cluster):
    import ray

    # A new adapter, registered through the ingress (vLLM's route): it is in the shared store for every replica.
    make_lora(cluster.base_dir, cluster.imports / "fresh", r=2, seed=999)
    loaded = httpx.post(f"{cluster.http}/v1/load_lora_adapter", headers={"Authorization": f"Bearer {ADMIN}"},
                        json={"lora_name": "fresh", "lora_path": str(cluster.imports / "fresh")})
    assert loaded.status_code == 200, loaded.text
    loads = _host_loads(cluster)
    first = complete(cluster, "fresh", tokens=4)["choices"][0]["text"]
    assert wait_for(lambda: sum(_host_loads(cluster).values()) > sum(loads.values()))
    holder = next(r for r, v in _host_loads(cluster).items() if v > loads.get(r, 0))
    replicas = _replica_actors()
    assert holder in replicas and len(replicas) == 2

    async def kill_during_streams() -> list[str]:
        started = asyncio.Event()
        streams = asyncio.ensure_future(_streams(cluster, [ADAPTERS[i] for i in range(8)] + ["fresh"], started))
        await started.wait()
        await asyncio.sleep(0.5)
        ray.kill(replicas[holder], no_restart=True)
        return await streams

    ends = asyncio.run(kill_during_streams())
    failed = [e for e in ends if e != "length"]
    assert 1 <= len(failed) < len(ends), ends  # the killed replica's requests fail, the survivor's finish
    assert all(e in ("unavailable", "RemoteProtocolError") for e in failed), ends
    # The survivor never loaded "fresh": it serves it from the shared store, with the same answer.
    assert complete(cluster, "fresh", tokens=4)["choices"][0]["text"] == first
    assert wait_for(lambda: len(_replica_actors()) == 2 and holder not in _replica_actors(), timeout=120)
    newcomer = next(r for r in _replica_actors() if r not in replicas)
    assert wait_for(lambda: _running_replicas() == 2, timeout=120)
    # Traffic returns to it: base-model requests (no adapter to be near) spread over both replicas; adapters the
    # survivor now holds stay there (that is the affinity) until its load spills them over.
    base = json.loads(httpx.get(f"{cluster.http}/v1/models").text)["data"][0]["id"]
    assert set(asyncio.run(_burst(cluster, [base] * 24 + ADAPTERS, concurrency=8))) == {200}
    assert wait_for(lambda: any(r == newcomer and v > 0 for (r, _), v in
                                replica_counts(cluster, "quiver_replica_requests").items()))
