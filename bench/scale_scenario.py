"""Scenario s: many distinct adapters in one batch, the shape of S-LoRA's and Punica's benchmarks.

s_requests requests (32), each under its own LoRA (rank 8 on q_proj and v_proj), all at once, against the
same requests on the base model alone (s0) and against PEFT serving them one at a time with `set_adapter`
(sp, over the first s_peft_requests of them: one-at-a-time throughput does not depend on how many there are).
"""

from __future__ import annotations

from bench.context import Context, ScenarioResult
from bench.engine_runner import measure, requests
from bench.peft_scenarios import on_own_thread, one_at_a_time
from bench.quiver_scenarios import mixed_config

SCALE_LORA = "lora8-qv"


def _quiver(ctx: Context) -> list[ScenarioResult]:
    n, max_new = ctx.options.s_requests, ctx.options.max_new_tokens
    prompts = ctx.prompts(n)
    stored = [a.stored for a in ctx.adapters(SCALE_LORA, n)]
    base = measure(ctx.bm, mixed_config(ctx, n), requests(prompts, max_new, [None] * n))
    lora = measure(ctx.bm, mixed_config(ctx, n), requests(prompts, max_new, stored))
    return [
        ScenarioResult("s0", f"Quiver, base model only, batch {n}", n, base.tokens, base.wall_s),
        ScenarioResult("s", f"Quiver, {n} distinct LoRA r8 q/v, batch {n}", n, lora.tokens, lora.wall_s),
    ]


@on_own_thread
def _peft(ctx: Context) -> list[ScenarioResult]:
    n = min(ctx.options.s_peft_requests, ctx.options.s_requests)
    sources = [a.peft_dir for a in ctx.adapters(SCALE_LORA, n)]
    tokens, wall = one_at_a_time(ctx, sources, ctx.prompts(n))
    return [ScenarioResult("sp", "PEFT, LoRA r8 q/v, one request at a time", n, tokens, wall)]


def scenario_s(ctx: Context) -> list[ScenarioResult]:
    return [*_quiver(ctx), *_peft(ctx)]
