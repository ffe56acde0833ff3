"""Scenarios served by the Quiver engine: base only (a), distinct LoRAs (b), mixed kinds (e), Zipf traffic over
many adapters with few device slots (f, as in S-LoRA's evaluation), and cold-adapter load latency (g)."""

from __future__ import annotations

import random
import statistics
import time
from collections import Counter

from bench.context import Context, ScenarioResult
from bench.engine_runner import (
    UNLIMITED_DEVICE_BYTES,
    measure,
    requests,
    run_batch,
    running_engine,
    shortened,
    time_to_first_token,
)
from quiver.adapters.store import StoredAdapter
from quiver.server.config import EngineConfig
from quiver.server.engine.adapter_tiers import load_host_adapter

LORA = "lora16-all"
# Row i of scenario e uses MIX[i % len(MIX)]; None = base model.
MIX: tuple[str | None, ...] = (LORA, "prompt", "prefix", LORA, "prompt", "prefix", LORA, None)


def mixed_config(ctx: Context, n: int | None = None) -> EngineConfig:
    """a, b and e (and the scale scenario, with its own n) share one engine configuration: all n requests run at
    once, every adapter resident on the device and in host memory (the default 4 GiB host tier holds only about
    25 rank-16 adapters of an 8B base), and no cache budget holds a request back."""
    n = ctx.options.n if n is None else n
    return EngineConfig(
        max_running=n, max_lora_rank=16, max_lora_slots=n,
        max_device_adapter_bytes=UNLIMITED_DEVICE_BYTES, max_host_adapter_bytes=UNLIMITED_DEVICE_BYTES,
        max_cache_bytes=UNLIMITED_DEVICE_BYTES, threads=ctx.options.engine_threads,
    )


def _result(key: str, title: str, run_tokens: int, wall_s: float, requests_: int, **details: object) -> ScenarioResult:
    return ScenarioResult(key, title, requests_, run_tokens, wall_s, dict(details))


def scenario_a(ctx: Context) -> list[ScenarioResult]:
    n = ctx.options.n
    batch = requests(ctx.prompts(n), ctx.options.max_new_tokens, [None] * n)
    run = measure(ctx.bm, mixed_config(ctx), batch)
    return [_result("a", "Quiver, base model only", run.tokens, run.wall_s, n,
                    ttft_median_s=round(statistics.median(run.ttft_s), 4))]


def scenario_b(ctx: Context) -> list[ScenarioResult]:
    n = ctx.options.n
    stored = [a.stored for a in ctx.adapters(LORA, n)]
    batch = requests(ctx.prompts(n), ctx.options.max_new_tokens, stored)
    run = measure(ctx.bm, mixed_config(ctx), batch)
    return [_result("b", f"Quiver, {n} distinct LoRA r16 all-linear", run.tokens, run.wall_s, n,
                    ttft_median_s=round(statistics.median(run.ttft_s), 4))]


def scenario_e(ctx: Context) -> list[ScenarioResult]:
    n = ctx.options.n
    kinds = [MIX[i % len(MIX)] for i in range(n)]
    counts = Counter(k for k in kinds if k is not None)
    pools = {kind: [a.stored for a in ctx.adapters(kind, count)] for kind, count in counts.items()}
    taken: Counter[str] = Counter()
    adapters: list[StoredAdapter | None] = []
    for kind in kinds:
        if kind is None:
            adapters.append(None)
            continue
        adapters.append(pools[kind][taken[kind]])
        taken[kind] += 1
    batch = requests(ctx.prompts(n), ctx.options.max_new_tokens, adapters)
    run = measure(ctx.bm, mixed_config(ctx), batch)
    mix = {kind or "base": count for kind, count in sorted(Counter(kinds).items(), key=lambda kc: str(kc[0]))}
    return [_result("e", "Quiver, mixed LoRA / prompt / prefix / base", run.tokens, run.wall_s, n, mix=mix,
                    ttft_median_s=round(statistics.median(run.ttft_s), 4))]


def zipf_sample(population: int, count: int, seed: int, exponent: float = 1.0) -> list[int]:
    """`count` adapter indices drawn from Zipf(`exponent`) over `population` ranks (index 0 most popular)."""
    weights = [1.0 / (rank + 1) ** exponent for rank in range(population)]
    return random.Random(seed).choices(range(population), weights=weights, k=count)


def scenario_f(ctx: Context) -> list[ScenarioResult]:
    opts = ctx.options
    made = ctx.maker.make("lora8-qv", opts.f_adapters, "zipf")
    stored = made.stored
    prompts = ctx.prompts(opts.f_requests)
    picks = zipf_sample(len(stored), opts.f_requests, seed=0)
    zipf = requests(prompts, opts.max_new_tokens, [stored[i] for i in picks])
    single = requests(prompts, opts.max_new_tokens, [stored[0]] * opts.f_requests)
    warm = requests(prompts, 2, [stored[i] for i in zipf_sample(len(stored), opts.f_requests, seed=1)])
    config = EngineConfig(
        max_running=opts.f_max_running, max_lora_rank=8, max_lora_slots=opts.f_slots,
        max_device_adapter_bytes=UNLIMITED_DEVICE_BYTES, threads=ctx.options.engine_threads,
    )
    with running_engine(ctx.bm, config) as engine:
        run_batch(engine, warm)  # a server that has been running: hot adapters in host memory
        single_run = run_batch(engine, single)
        zipf_run = run_batch(engine, zipf)
    registration = {
        "adapters_registered": len(stored),
        "write_s": round(made.write_s, 2),
        "register_s": round(made.register_s, 2),
        "registrations_per_s": round(len(stored) / made.register_s, 1),
    }
    shape = {"slots": opts.f_slots, "max_running": opts.f_max_running}
    top = Counter(picks).most_common(1)[0][1]
    return [
        _result("f", f"Quiver, Zipf(1.0) over {len(stored)} LoRA r8 q,v", zipf_run.tokens, zipf_run.wall_s,
                opts.f_requests, distinct_adapters=len(set(picks)), top_adapter_requests=top, **shape,
                registration=registration),
        _result("f1", "Quiver, same requests, one LoRA r8 q,v", single_run.tokens, single_run.wall_s,
                opts.f_requests, **shape),
    ]


def _cold_loads(ctx: Context, stored: list[StoredAdapter]) -> dict[str, float]:
    """Median ms of store -> host (safetensors read) -> device slot, each adapter new to the tiers."""
    config = EngineConfig(max_lora_rank=16, max_lora_slots=4, max_device_adapter_bytes=UNLIMITED_DEVICE_BYTES,
                          threads=ctx.options.engine_threads)
    # Never started: this thread alone uses its tiers, as the engine thread would.
    engine = ctx.bm.engine(config)
    host_ms: list[float] = []
    device_ms: list[float] = []
    try:
        for adapter in stored:
            t0 = time.perf_counter()
            host = load_host_adapter(adapter)
            t1 = time.perf_counter()
            entry = engine.device_adapters.acquire(host)
            ctx.bm.sync()
            t2 = time.perf_counter()
            if entry is None:
                raise RuntimeError("no free LoRA slot for a cold load")
            engine.device_adapters.release(entry)  # 4 slots: later loads evict (zero) an older slot first
            host_ms.append(1000 * (t1 - t0))
            device_ms.append(1000 * (t2 - t1))
    finally:
        engine.stop()
    total = [h + d for h, d in zip(host_ms, device_ms, strict=True)]
    return {
        "loads": len(total),
        "cold_load_median_ms": round(statistics.median(total), 2),
        "cold_load_p90_ms": round(sorted(total)[int(0.9 * (len(total) - 1))], 2),
        "store_to_host_median_ms": round(statistics.median(host_ms), 2),
        "host_to_device_median_ms": round(statistics.median(device_ms), 2),
    }


def _ttfts(ctx: Context, stored: list[StoredAdapter]) -> dict[str, float]:
    """Median time-to-first-token through a running engine: adapter cold (first use), warm (resident), none."""
    prompts = ctx.prompts(len(stored))
    batch = requests(prompts, 1, stored)
    base = requests(prompts, 1, [None] * len(stored))
    config = EngineConfig(max_lora_rank=16, max_lora_slots=8, max_device_adapter_bytes=UNLIMITED_DEVICE_BYTES,
                          threads=ctx.options.engine_threads)
    with running_engine(ctx.bm, config) as engine:
        run_batch(engine, shortened(base[:1], 1))  # warm-up without adapters
        cold, warm = [], []
        for request in batch:
            cold.append(time_to_first_token(engine, request))
            warm.append(time_to_first_token(engine, request))
        none = [time_to_first_token(engine, request) for request in base]
    return {
        "ttft_cold_median_ms": round(1000 * statistics.median(cold), 2),
        "ttft_warm_median_ms": round(1000 * statistics.median(warm), 2),
        "ttft_base_median_ms": round(1000 * statistics.median(none), 2),
    }


def scenario_g(ctx: Context) -> list[ScenarioResult]:
    opts = ctx.options
    made = ctx.maker.make(LORA, opts.g_loads + opts.ttft_loads, "cold")
    loads = _cold_loads(ctx, made.stored[: opts.g_loads])
    ttft = _ttfts(ctx, made.stored[opts.g_loads :])
    return [ScenarioResult("g", "Quiver, cold load of a LoRA r16 all-linear", opts.g_loads, details={**loads, **ttft})]
