"""Scenario h: what `--preempt` buys when clients ask for far more tokens than the answers take.

N chat requests (the default model's chat template; answers end at its end-of-sequence token, here after
tens of tokens) each allow `h_max_new_tokens` new tokens. The key/value cache budget holds `h_worst_case_rows`
rows at that worst case. Without preemption, admission reserves every row's worst case, so that many run at
once; with it, admission counts rows at their length now, so all N can run, and a row is taken out (and later
resumes by recomputing) only if the batch really outgrows the budget. Both run the same greedy requests on the
same engine configuration otherwise; the JSON records each side's tokens, wall time and preemptions.
"""

from __future__ import annotations

import dataclasses

from bench.context import Context, ScenarioResult
from bench.engine_runner import UNLIMITED_DEVICE_BYTES, run_batch
from bench.workload import PROMPTS
from quiver.server.config import EngineConfig
from quiver.server.engine.cache_budget import CacheBudget, position_bytes
from quiver.server.engine.request import GenerationRequest
from quiver.server.engine.sampling import SamplingParams


def _chat_requests(ctx: Context) -> list[GenerationRequest]:
    tokenizer, cap = ctx.bm.tokenizer, ctx.options.h_max_new_tokens
    out = []
    for i in range(ctx.options.h_requests):
        messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
        out.append(GenerationRequest(ids, SamplingParams(), cap, ()))
    return out


def _config(ctx: Context, batch: list[GenerationRequest], preempt: bool) -> EngineConfig:
    dtype = ctx.bm.model.get_input_embeddings().weight.dtype
    block = EngineConfig().cache_block_tokens
    budget = CacheBudget(0, position_bytes(ctx.bm.model.config, dtype), block)
    peak = max(len(r.prompt_ids) + r.max_new_tokens for r in batch)
    return EngineConfig(
        max_running=len(batch), max_cache_bytes=budget.batch_bytes([peak] * ctx.options.h_worst_case_rows),
        preempt=preempt, max_device_adapter_bytes=UNLIMITED_DEVICE_BYTES, threads=ctx.options.engine_threads,
    )


def _run(ctx: Context, batch: list[GenerationRequest], preempt: bool) -> ScenarioResult:
    engine = ctx.bm.engine(_config(ctx, batch, preempt), ctx.bm.loaded.eos_token_ids)
    engine.start()
    try:
        run_batch(engine, [dataclasses.replace(r, max_new_tokens=2) for r in batch])  # warm-up
        run = run_batch(engine, batch, exact=False)  # answers end at end-of-sequence, before the cap
        preemptions = engine.preemptions
    finally:
        engine.stop()
    key, title = ("h", "Quiver, chat, --preempt") if preempt else ("h0", "Quiver, chat, worst-case reservation")
    return ScenarioResult(key, title, len(batch), run.tokens, run.wall_s, {
        "preemptions": preemptions, "max_new_tokens": ctx.options.h_max_new_tokens,
        "worst_case_rows_in_budget": ctx.options.h_worst_case_rows,
    })


def scenario_h(ctx: Context) -> list[ScenarioResult]:
    batch = _chat_requests(ctx)
    return [_run(ctx, batch, preempt=False), _run(ctx, batch, preempt=True)]
