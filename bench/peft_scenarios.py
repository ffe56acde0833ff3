"""The PEFT baselines on the same base model and the same N LoRA adapters as scenario b.

(c) naive: one `PeftModel` holding all N adapters (`load_adapter`); per request `set_adapter(name)` then a
    greedy `generate`, one request after another.
(d) PEFT's mixed-batch inference: one `generate` over the left-padded batch with `adapter_names=[...]`, which
    splits every LoRA layer's input into per-adapter sub-batches.
Both generate exactly max_new_tokens per request (`min_new_tokens` = `max_new_tokens`), as the engine does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import GenerationConfig

from bench.adapter_maker import restore_base
from bench.context import Context, ScenarioResult
from bench.quiver_scenarios import LORA
from quiver.server.platform.cpu_threads import default_threads

Scenario = Callable[[Context], list[ScenarioResult]]


def on_own_thread(scenario: Scenario) -> Scenario:
    """Run PEFT on a thread of its own with `peft_threads` torch threads: its OpenMP team ends with the thread.

    A team left on the main thread would keep the engine's team from spin-waiting (server/platform/cpu_threads.py).
    """

    def run(ctx: Context) -> list[ScenarioResult]:
        out: list[list[ScenarioResult]] = []
        errors: list[BaseException] = []

        def body() -> None:
            torch.set_num_threads(ctx.options.peft_threads or default_threads())  # MKL's count too: PEFT's matmuls
            try:
                out.append(scenario(ctx))
            except BaseException as e:  # re-raised on the caller's thread
                errors.append(e)
            finally:
                torch.set_num_threads(1)  # the process default again, for threads started later

        thread = threading.Thread(target=body, name=f"peft-{scenario.__name__}")
        thread.start()
        thread.join()
        if errors:
            raise errors[0]
        return out[0]

    run.__name__ = scenario.__name__
    return run


@contextmanager
def _peft_model(ctx: Context, sources: Sequence[Path]) -> Iterator[tuple[Any, list[str]]]:
    """All adapters loaded into one PeftModel over the shared base; the base is restored afterwards."""
    names = [f"a{i}" for i in range(len(sources))]
    model: Any = PeftModel.from_pretrained(ctx.bm.model, sources[0], adapter_name=names[0])
    for name, source in zip(names[1:], sources[1:], strict=True):
        model.load_adapter(source, adapter_name=name)
    model.eval()
    try:
        yield model, names
    finally:
        model.unload()  # removes the LoRA layers without merging them
        restore_base(ctx.bm.model)


def _greedy(ctx: Context, max_new_tokens: int) -> GenerationConfig:
    pad = ctx.bm.tokenizer.pad_token_id
    eos = sorted(ctx.bm.loaded.eos_token_ids)
    return GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=pad, eos_token_id=eos,
    )


def _generate(model: Any, ids: torch.Tensor, mask: torch.Tensor, config: GenerationConfig, **kwargs: Any) -> int:
    """Run one `generate`; returns the new tokens over all rows (checked to be exactly max_new_tokens each)."""
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, **kwargs)  # (B, T + M)
    new = out.shape[1] - ids.shape[1]
    if new != config.max_new_tokens:
        raise RuntimeError(f"generate returned {new} new tokens, expected {config.max_new_tokens}")
    return int(out.shape[0] * new)


def _left_padded(
    prompts: Sequence[tuple[int, ...]], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask (B, T_max), padded on the left as decoder-only batching needs."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def one_at_a_time(ctx: Context, sources: Sequence[Path], prompts: Sequence[tuple[int, ...]]) -> tuple[int, float]:
    """PEFT's naive serving: all adapters in one PeftModel, `set_adapter` then a greedy `generate` per request,
    one after another (request i under sources[i]); returns (tokens, wall seconds)."""
    rows = [_left_padded([p], ctx.bm.tokenizer.pad_token_id, ctx.bm.device) for p in prompts]
    with _peft_model(ctx, sources) as (model, names):
        model.set_adapter(names[0])
        _generate(model, *rows[0], _greedy(ctx, 2))  # warm-up
        config = _greedy(ctx, ctx.options.max_new_tokens)
        start = time.perf_counter()
        tokens = 0
        for name, (ids, mask) in zip(names, rows, strict=True):
            model.set_adapter(name)
            tokens += _generate(model, ids, mask, config)
        ctx.bm.sync()
        return tokens, time.perf_counter() - start


@on_own_thread
def scenario_c(ctx: Context) -> list[ScenarioResult]:
    n = ctx.options.n
    tokens, wall = one_at_a_time(ctx, [a.peft_dir for a in ctx.adapters(LORA, n)], ctx.prompts(n))
    return [ScenarioResult("c", "PEFT, one request at a time, set_adapter", n, tokens, wall)]


@on_own_thread
def scenario_d(ctx: Context) -> list[ScenarioResult]:
    n, max_new = ctx.options.n, ctx.options.max_new_tokens
    sources = [a.peft_dir for a in ctx.adapters(LORA, n)]
    ids, mask = _left_padded(ctx.prompts(n), ctx.bm.tokenizer.pad_token_id, ctx.bm.device)
    with _peft_model(ctx, sources) as (model, names):
        _generate(model, ids, mask, _greedy(ctx, 2), adapter_names=names)  # warm-up
        start = time.perf_counter()
        tokens = _generate(model, ids, mask, _greedy(ctx, max_new), adapter_names=names)
        ctx.bm.sync()
        wall = time.perf_counter() - start
    return [ScenarioResult("d", "PEFT, one mixed batch, adapter_names", n, tokens, wall)]
