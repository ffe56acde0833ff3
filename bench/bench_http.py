"""The same 8-adapter streaming workload over gRPC and over the OpenAI-compatible HTTP front, in one run.

A real `quiver serve` runs in a subprocess (default model, CPU, fp32) with 8 distinct LoRAs (rank 16, all linear
layers) registered; this process is the client. Each round sends the 8 requests at once (request i names LoRA i,
64 new tokens, greedy, streamed) over one front, then over the other, alternating which goes first; each round's
ratio compares the two fronts a few seconds apart, and the table reports the median of the rounds.

The batch's time to first token is the prefill of 8 prompts (about half a second on this CPU), which swings by
more between rounds than a front could add; so the front's own share of it is measured apart as well: one
streamed request at a time on an idle server (a resident LoRA, one new token), alternating fronts, many times.

    python -m bench.bench_http                 # -> bench/results/http-cpu.json
    python -m bench.bench_http --rounds 2 --max-new-tokens 16   # smoke run

Targets: HTTP tokens/s at least 0.95 of gRPC's; HTTP's median time to first token within 10 ms of gRPC's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from bench.adapter_maker import AdapterMaker
from bench.front_clients import Timed, over_grpc, over_http
from bench.workload import PROMPTS, cache_dir, environment, load_bench_model
from quiver.clients.aio import AsyncQuiverClient

RESULTS = Path(__file__).resolve().parent / "results" / "http-cpu.json"
TARGET_RATIO = 0.95
TARGET_TTFT_MS = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def serving(checkpoint: Path, store: Path, threads: int) -> Iterator[tuple[str, str]]:
    """`quiver serve` in a subprocess on free loopback ports; yields (gRPC target, HTTP URL) once it is ready."""
    grpc_port, http_port = _free_port(), _free_port()
    command = [sys.executable, "-c", "import sys; from quiver.clients.cli import main; sys.exit(main(sys.argv[1:]))",
               "serve", "--model", str(checkpoint), "--store", str(store),
               "--port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", "0",
               "--threads", str(threads), "--log-level", "WARNING"]
    server = subprocess.Popen(command, env={**os.environ, "QUIVER_ADMIN_TOKEN": ""}, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"quiver serve exited with {server.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:  # /health answers while loading
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("quiver serve did not start")
            time.sleep(0.5)
        yield f"127.0.0.1:{grpc_port}", url
    finally:
        server.terminate()
        server.wait(timeout=60)


async def _round(front: str, target: str, url: str, adapters: list[str], max_tokens: int) -> dict[str, Any]:
    jobs = [(adapters[i], PROMPTS[i % len(PROMPTS)]) for i in range(len(adapters))]
    start = time.perf_counter()
    if front == "grpc":
        async with AsyncQuiverClient(target, timeout=600) as client:
            results = await asyncio.gather(*(over_grpc(client, a, p, max_tokens) for a, p in jobs))
    else:
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
            results = await asyncio.gather(*(over_http(client, url, a, p, max_tokens) for a, p in jobs))
    wall = time.perf_counter() - start
    return _summary(list(results), wall)


def _summary(results: list[Timed], wall: float) -> dict[str, Any]:
    tokens = sum(r.tokens for r in results)
    return {"tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "ttft_median_ms": round(1000 * statistics.median(r.ttft_s for r in results), 1),
            "texts": [r.text for r in results]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    bm = load_bench_model("smollm2-135m", cache_dir(args.cache_dir), "cpu", "none", "float32")
    env = environment(bm, "none")
    with tempfile.TemporaryDirectory(prefix="quiver-bench-http-") as tmp:
        maker = AdapterMaker(bm, Path(tmp))
        adapters = [a.stored.metadata.name for a in maker.make("lora16-all", args.n, "lora").adapters]
        checkpoint = bm.loaded.checkpoint_dir
        del bm, maker  # the server process loads its own copy
        rounds: list[dict[str, Any]] = []
        with serving(checkpoint, Path(tmp) / "store", args.threads) as (target, url):
            for front in ("grpc", "http"):  # warm-up: loads the adapters onto the device, fills caches
                asyncio.run(_round(front, target, url, adapters, 2))
            for r in range(args.rounds):
                order = ("grpc", "http") if r % 2 == 0 else ("http", "grpc")
                rounds.append({front: asyncio.run(_round(front, target, url, adapters, args.max_new_tokens))
                               for front in order})
            alone = asyncio.run(_alone(target, url, adapters[0], args.alone))
    return {"environment": env, "options": vars(args), "adapters": adapters, "rounds": rounds, "alone": alone,
            **_verdict(rounds, alone)}


async def _alone(target: str, url: str, adapter: str, pairs: int) -> dict[str, list[float]]:
    """Time to first token of one request at a time, `pairs` times per front, alternating (ms)."""
    out: dict[str, list[float]] = {"grpc": [], "http": []}
    async with AsyncQuiverClient(target, timeout=600) as grpc_client, httpx.AsyncClient(timeout=600) as http_client:
        for i in range(pairs):
            for front in (("grpc", "http") if i % 2 == 0 else ("http", "grpc")):
                if front == "grpc":
                    timed = await over_grpc(grpc_client, adapter, PROMPTS[0], 1)
                else:
                    timed = await over_http(http_client, url, adapter, PROMPTS[0], 1)
                out[front].append(round(1000 * timed.ttft_s, 2))
    return out


def _verdict(rounds: list[dict[str, Any]], alone: dict[str, list[float]]) -> dict[str, Any]:
    for r in rounds:  # the same greedy requests: the same tokens, whatever the front
        assert r["grpc"]["texts"] == r["http"]["texts"], "the fronts generated different text"
        for front in ("grpc", "http"):
            r[front].pop("texts")
    ratios = [r["http"]["tokens_per_s"] / r["grpc"]["tokens_per_s"] for r in rounds]
    deltas = [r["http"]["ttft_median_ms"] - r["grpc"]["ttft_median_ms"] for r in rounds]
    return {
        "http_over_grpc_tokens_per_s": round(statistics.median(ratios), 3),
        "http_over_grpc_per_round": [round(x, 3) for x in ratios],
        "batch_ttft_delta_ms": round(statistics.median(deltas), 1),
        "batch_ttft_delta_ms_per_round": [round(x, 1) for x in deltas],
        "alone_ttft_ms": {front: round(statistics.median(v), 2) for front, v in alone.items()},
        "ttft_delta_ms": round(statistics.median(alone["http"]) - statistics.median(alone["grpc"]), 2),
    }


def report(result: dict[str, Any]) -> None:
    print(f"{'round':>5} {'front':>5} {'tokens':>7} {'wall s':>7} {'tok/s':>7} {'TTFT ms':>8}")
    for i, r in enumerate(result["rounds"]):
        for front in ("grpc", "http"):
            x = r[front]
            print(f"{i:>5} {front:>5} {x['tokens']:>7} {x['wall_s']:>7} {x['tokens_per_s']:>7} "
                  f"{x['ttft_median_ms']:>8}")
    ratio, delta = result["http_over_grpc_tokens_per_s"], result["ttft_delta_ms"]
    print(f"HTTP / gRPC tokens/s: {ratio} (rounds {result['http_over_grpc_per_round']}) "
          f"goal >= {TARGET_RATIO}: {'PASS' if ratio >= TARGET_RATIO else 'MISS'}")
    print(f"batch TTFT, HTTP - gRPC: {result['batch_ttft_delta_ms']} ms (rounds "
          f"{result['batch_ttft_delta_ms_per_round']}; not a target: prefill noise)")
    alone = result["alone_ttft_ms"]
    print(f"TTFT alone, median of {len(result['alone']['grpc'])}: gRPC {alone['grpc']} ms, HTTP {alone['http']} ms; "
          f"HTTP - gRPC {delta} ms, goal <= {TARGET_TTFT_MS} ms: {'PASS' if delta <= TARGET_TTFT_MS else 'MISS'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8, help="concurrent requests, each on its own LoRA")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per front, alternating which goes first")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--alone", type=int, default=30, help="single-request TTFT pairs (one per front)")
    parser.add_argument("--threads", type=int, default=0, help="the server's --threads")
    parser.add_argument("--cache-dir", default=None, help="model cache (default: as bench_engine)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = run(args)
    report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**result, "options": {**result["options"], "out": str(args.out)}}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
