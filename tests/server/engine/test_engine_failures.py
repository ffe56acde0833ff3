"""Engine failures stay with the requests they concern: the engine answers with a precise error and goes on."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from quiver.common.errors import ResourceExhausted
from quiver.server.engine.engine import Engine
from quiver.server.engine.generation_events import FinishReason

from .test_engine import PROMPTS, Collector, _unstarted, request, run, tokens_of


@pytest.mark.parametrize("failing", ["prefill", "join"])
def test_a_failed_prefill_or_join_fails_its_requests_and_the_engine_goes_on(
    engine: Engine, text_tokenizer: Any, monkeypatch: pytest.MonkeyPatch, failing: str
):
    from quiver.server.engine import model_runner as runner_module
    from quiver.server.engine.batch import DecodeBatch

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("simulated failure")

    if failing == "prefill":
        monkeypatch.setattr(runner_module, "prefill", boom)
    else:
        monkeypatch.setattr(DecodeBatch, "add", boom)
    events = run(engine, request(text_tokenizer, PROMPTS[0], max_new_tokens=4))
    assert isinstance(events[-1].error, RuntimeError) and "simulated failure" in str(events[-1].error)
    assert engine.num_running == 0
    monkeypatch.undo()
    assert tokens_of(run(engine, request(text_tokenizer, PROMPTS[1], max_new_tokens=4)))  # still serving


def test_a_prefill_group_with_a_bad_row_fails_only_that_row(
    tiny_model: Any, text_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
):
    from quiver.server.engine import model_runner as runner_module

    real_prefill = runner_module.prefill
    poison = request(text_tokenizer, PROMPTS[2], max_new_tokens=3)
    sizes: list[int] = []

    def failing_on_poison(forward: Any, rows: Any) -> Any:
        sizes.append(len(rows))
        if any(tuple(row.ids.tolist()) == poison.prompt_ids for row in rows):
            raise RuntimeError("simulated bad row")
        return real_prefill(forward, rows)

    monkeypatch.setattr(runner_module, "prefill", failing_on_poison)
    eng = _unstarted(tiny_model, text_tokenizer)
    good, bad = [Collector() for _ in range(3)], Collector()
    for prompt, sink in zip(PROMPTS[:2] + PROMPTS[3:], good, strict=True):
        eng.submit(request(text_tokenizer, prompt, max_new_tokens=3), sink)
    eng.submit(poison, bad)
    eng.start()
    try:
        finals = [sink.wait()[1][-1] for sink in good]
        failed = bad.wait()[1][-1]
    finally:
        eng.stop()
    assert sizes[0] == 4  # all four were prefilled together first
    assert all(event.finish_reason is FinishReason.LENGTH and event.completion_tokens == 3 for event in finals)
    assert isinstance(failed.error, RuntimeError) and "simulated bad row" in str(failed.error)


def test_a_failure_setting_up_chunks_fails_only_that_request(
    tiny_model: Any, text_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
):
    from quiver.server.engine import model_runner as runner_module

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("simulated chunk setup failure")

    monkeypatch.setattr(runner_module, "ChunkedPrefill", boom)
    eng = _unstarted(tiny_model, text_tokenizer, max_prefill_tokens=8)
    eng.start()
    try:
        events = run(eng, request(text_tokenizer, " ".join(PROMPTS), max_new_tokens=3))
        assert isinstance(events[-1].error, RuntimeError) and "chunk setup" in str(events[-1].error)
        assert tokens_of(run(eng, request(text_tokenizer, PROMPTS[0], max_new_tokens=3)))  # still serving
    finally:
        eng.stop()


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory"), MemoryError()], ids=["device", "host"])
def test_running_out_of_memory_fails_the_batch_as_resource_exhausted(
    engine: Engine, text_tokenizer: Any, monkeypatch: pytest.MonkeyPatch, error: BaseException
):
    from quiver.server.engine.batch import DecodeBatch

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(DecodeBatch, "forward", boom)
    events = run(engine, request(text_tokenizer, PROMPTS[0], max_new_tokens=4))
    assert isinstance(events[-1].error, ResourceExhausted) and "out of memory" in str(events[-1].error)
    monkeypatch.undo()
    assert tokens_of(run(engine, request(text_tokenizer, PROMPTS[1], max_new_tokens=4)))  # still serving


def test_a_row_whose_logits_turn_nan_fails_alone(tiny_model: Any, text_tokenizer: Any, monkeypatch: pytest.MonkeyPatch):
    """Fail closed: no token is picked from NaN logits; the request fails and its batch-mates go on unchanged."""
    from quiver.server.engine.batch import DecodeBatch

    greedy, sampled = request(text_tokenizer, PROMPTS[0], max_new_tokens=6), request(
        text_tokenizer, PROMPTS[1], max_new_tokens=6, temperature=0.9, seed=3)
    eng = _unstarted(tiny_model, text_tokenizer)
    eng.start()
    try:
        solo = [tokens_of(run(eng, r)) for r in (greedy, sampled)]
    finally:
        eng.stop()
    forward, calls = DecodeBatch.forward, []

    def poisoned(self: DecodeBatch, model: Any, tokens: torch.Tensor) -> torch.Tensor:
        logits = forward(self, model, tokens)
        calls.append(logits.shape[0])
        if len(calls) == 2:
            logits[0, 5] = float("nan")
        return logits

    monkeypatch.setattr(DecodeBatch, "forward", poisoned)
    eng = _unstarted(tiny_model, text_tokenizer)
    sinks = [Collector(), Collector()]
    for r, sink in zip((greedy, sampled), sinks, strict=True):
        eng.submit(r, sink)
    eng.start()
    try:
        results = [sink.wait()[1] for sink in sinks]
    finally:
        eng.stop()
    failed = [i for i, events in enumerate(results) if events[-1].error is not None]
    assert len(failed) == 1 and calls[:2] == [2, 2], (failed, calls)
    bad, good = failed[0], 1 - failed[0]
    assert "NaN" in str(results[bad][-1].error) and len(tokens_of(results[bad])) == 2
    assert tokens_of(results[good]) == solo[good]
