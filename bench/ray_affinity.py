"""Quiver on a local Ray cluster: do requests reach the replica that holds their adapter, and what does losing a
replica cost? Two engine replicas of the default model (CPU, fp32, one thread each) serve 20 LoRAs (rank 8 on
q/v) from one store; this process is the client.

    python -m bench.ray_affinity --store /tmp/quiver-ray-store          # a shared directory
    AWS_ENDPOINT_URL=http://127.0.0.1:5000 python -m bench.ray_affinity --store s3://bucket/prefix

Phases: every adapter used once (each is then held by one replica); `--requests` requests drawn uniformly over the
20 adapters, `--concurrency` at a time (the share whose adapter was already in the serving replica's host memory,
from the replicas' own counters in Ray's metrics); then `--streams` long streams, one replica killed mid-way
(how many fail, how many finish), the time until Ray runs two replicas again, and whether traffic reaches it.
Writes bench/results/ray-cpu.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.adapter_maker import AdapterMaker
from bench.workload import PROMPTS, cache_dir, load_bench_model
from quiver.adapters.registry import RegistrationOptions, open_registry
from quiver.server.config import AdapterConfig, EngineConfig, ModelConfig

RESULTS = Path(__file__).resolve().parent / "results" / "ray-cpu.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_adapters(store: str, count: int, work: Path, cache: Path) -> tuple[list[str], Path]:
    """`count` rank-8 q/v LoRAs of the default model, registered into `store`; returns names and the checkpoint."""
    bm = load_bench_model("smollm2-135m", cache, "cpu", "none", "float32")
    made = AdapterMaker(bm, work).make("lora8-qv", count, "task").adapters
    registry = open_registry(store, str(bm.checkpoint_dir))
    for adapter in made:
        registry.register(adapter.peft_dir, RegistrationOptions(adapter.stored.metadata.name))
    return [a.stored.metadata.name for a in made], bm.checkpoint_dir


def replica_counts(metrics_url: str, metric: str) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{metrics_url}/metrics", timeout=10).text):
        for s in family.samples:
            if s.name == f"ray_{metric}_total":
                key = (s.labels["replica"], s.labels.get("adapter_held", s.labels.get("tier", "")))
                out[key] = out.get(key, 0) + s.value
    return out


def _held(metrics_url: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    for (_, label), value in replica_counts(metrics_url, "quiver_replica_requests").items():
        counts[label] += int(value)
    return counts


def _settle(metrics_url: str, total: int) -> Counter[str]:
    """The replicas' counters once they account for `total` requests (Ray exports them about every second)."""
    deadline = time.monotonic() + 60
    while sum((counts := _held(metrics_url)).values()) < total and time.monotonic() < deadline:
        time.sleep(0.5)
    return counts


async def _burst(url: str, models: list[str], concurrency: int, tokens: int) -> tuple[list[int], int, float]:
    limit = asyncio.Semaphore(concurrency)
    generated = 0
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(i: int, model: str) -> int:
            nonlocal generated
            async with limit:
                body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": tokens,
                        "temperature": 0, "ignore_eos": True}
                response = await client.post(f"{url}/v1/completions", json=body)
                if response.status_code == 200:
                    generated += response.json()["usage"]["completion_tokens"]
                return response.status_code
        statuses = list(await asyncio.gather(*(one(i, m) for i, m in enumerate(models))))
    return statuses, generated, time.perf_counter() - start


def _engine_replicas() -> dict[str, Any]:
    import ray

    return {a["name"].rsplit("#", 1)[-1]: ray.get_actor(a["name"], namespace=a["namespace"])
            for a in ray.util.list_named_actors(all_namespaces=True) if "QuiverEngine" in a["name"]}


def _running() -> int:
    from ray import serve

    states = serve.status().applications["quiver"].deployments["QuiverEngine"].replica_states
    return sum(n for state, n in states.items() if str(getattr(state, "value", state)) == "RUNNING")


async def _streams(url: str, models: list[str], tokens: int, started: asyncio.Event) -> list[str]:
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(model: str) -> str:
            body = {"model": model, "prompt": PROMPTS[0], "max_tokens": tokens, "stream": True, "ignore_eos": True}
            try:
                async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data: {"):
                            started.set()
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                return str(chunk["error"]["code"])
                            if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                                return str(chunk["choices"][0]["finish_reason"])
            except httpx.HTTPError as e:
                return type(e).__name__
            return "no finish"
        return list(await asyncio.gather(*(one(m) for m in models)))


def kill_phase(url: str, metrics_url: str, adapters: list[str], streams: int, tokens: int) -> dict[str, Any]:
    import ray

    replicas = _engine_replicas()
    victim = sorted(replicas)[0]

    async def run() -> list[str]:
        started = asyncio.Event()
        task = asyncio.ensure_future(_streams(url, [adapters[i % len(adapters)] for i in range(streams)], tokens,
                                              started))
        await started.wait()
        await asyncio.sleep(1.0)
        ray.kill(replicas[victim], no_restart=True)
        return await task

    killed_at = time.monotonic()
    ends = asyncio.run(run())
    while not (_running() == 2 and victim not in _engine_replicas()):
        time.sleep(0.5)
    back_s = time.monotonic() - killed_at
    newcomer = next(r for r in _engine_replicas() if r not in replicas)
    base = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    statuses, _, _ = asyncio.run(_burst(url, [base] * 32, 8, 4))
    time.sleep(3)
    reached = sum(v for (r, _), v in replica_counts(metrics_url, "quiver_replica_requests").items() if r == newcomer)
    return {"streams": streams, "ends": dict(Counter(ends)), "back_after_s": round(back_s, 1),
            "base_burst_statuses": dict(Counter(statuses)), "requests_reaching_the_new_replica": int(reached)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions

    from quiver.server.ray_serve.app import APP_NAME, RayServeConfig, application

    cache = cache_dir(args.cache_dir)
    with tempfile.TemporaryDirectory(prefix="quiver-ray-bench-") as tmp:
        adapters, checkpoint = make_adapters(args.store, args.adapters, Path(tmp), cache)
        http_port, metrics_port = _free_port(), _free_port()
        ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
                 _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 1000})
        try:
            serve.start(http_options=HTTPOptions(host="127.0.0.1", port=http_port))
            model = ModelConfig(model=str(checkpoint), device="cpu", quantize="none", cache_dir=str(cache))
            engine = EngineConfig(threads=1, max_lora_rank=8)
            store = AdapterConfig(store=args.store, store_cache_dir=str(Path(tmp) / "cache"),
                                  s3_endpoint_url=args.s3_endpoint_url)
            started = time.monotonic()
            serve.run(application(model, engine, store, RayServeConfig(engine_replicas=2, engine_cpus=1)),
                      name=APP_NAME, route_prefix="/")
            url, metrics_url = f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{metrics_port}"
            result: dict[str, Any] = {"startup_s": round(time.monotonic() - started, 1)}
            asyncio.run(_burst(url, adapters, 1, 2))  # each adapter once: now held by one replica
            before = _settle(metrics_url, len(adapters))
            rng = random.Random(0)
            traffic = [rng.choice(adapters) for _ in range(args.requests)]
            statuses, tokens, wall = asyncio.run(_burst(url, traffic, args.concurrency, args.max_tokens))
            after = _settle(metrics_url, len(adapters) + len(traffic))
            yes, no = after["yes"] - before["yes"], after["no"] - before["no"]
            per_replica = Counter({r: v for (r, lbl), v in replica_counts(metrics_url, "quiver_replica_requests")
                                   .items() if lbl != "none"})
            result["affinity"] = {"requests": len(traffic), "statuses": dict(Counter(statuses)),
                                  "adapter_already_held": yes, "adapter_not_held": no,
                                  "held_share": round(yes / max(1, yes + no), 4),
                                  "requests_per_replica": dict(per_replica), "tokens_per_s": round(tokens / wall, 1)}
            result["kill"] = kill_phase(url, metrics_url, adapters, args.streams, args.stream_tokens)
        finally:
            serve.shutdown()
            ray.shutdown()
    return {"environment": environment_light(), "options": vars(args), **result}


def environment_light() -> dict[str, Any]:
    import platform

    import ray

    return {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "python": platform.python_version(),
            "ray": ray.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="a directory or s3://bucket/prefix both replicas read")
    parser.add_argument("--s3-endpoint-url", default=None)
    parser.add_argument("--adapters", type=int, default=20)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--stream-tokens", type=int, default=256)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = run(args)
    print(json.dumps({k: v for k, v in result.items() if k != "options"}, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**result, "options": {**result["options"], "out": str(args.out)}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
