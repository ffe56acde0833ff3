"""Per-request options of the engine. Prompt log-probabilities (vLLM's `prompt_logprobs`, OpenAI's echo): equal to
one teacher-forced forward, whether the prompt is prefilled in a group with other rows, alone, or in chunks; sent
once, with the first token. `ignore_eos`: generation goes on past end-of-sequence tokens."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

from quiver.server.config import EngineConfig
from quiver.server.engine.engine import Engine
from quiver.server.engine.generation_events import FinishReason, GenerationEvent
from quiver.server.engine.logprobs import prompt_token_logprobs

from .test_engine import Collector, request

PROMPT = "Once upon a time, in a land far away, there lived"


def reference(model: Any, ids: tuple[int, ...]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)  # (T, V)


def run_all(model: Any, tokenizer: Any, requests: list[Any], eos: frozenset[int] = frozenset(), **config: Any
            ) -> list[list[GenerationEvent]]:
    engine = Engine(model, tokenizer, eos, EngineConfig(**config))
    try:
        sinks = [Collector() for _ in requests]
        for req, sink in zip(requests, sinks, strict=True):
            engine.submit(req, sink)
        engine.start()  # after every submission: the first step sees them all, whatever the threads' timing
        return [sink.wait()[1] for sink in sinks]
    finally:
        engine.stop()


@pytest.mark.parametrize("prefill_tokens", [1024, 5])  # one forward, or chunks of 5 tokens
def test_prompt_logprobs_equal_a_teacher_forced_forward(tiny_model: Any, text_tokenizer: Any, prefill_tokens: int):
    scored = replace(request(text_tokenizer, PROMPT, max_new_tokens=3), prompt_logprobs=3)
    other = request(text_tokenizer, "Short one", max_new_tokens=3)  # prefilled in the same group when it fits
    events, plain = run_all(tiny_model, text_tokenizer, [scored, other], max_prefill_tokens=prefill_tokens)
    ids = scored.prompt_ids
    expected = reference(tiny_model, ids)
    first = events[0].prompt_logprobs
    assert len(first) == len(ids) and first[0] is None
    for j in range(1, len(ids)):
        entry = first[j]
        assert entry is not None and entry.token_id == ids[j]
        assert entry.logprob == pytest.approx(expected[j - 1, ids[j]].item(), abs=1e-4)
        top = torch.topk(expected[j - 1], 3)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert [v for _, v in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert all(not e.prompt_logprobs for e in events[1:])  # sent once
    assert all(not e.prompt_logprobs for e in plain)  # only to the request that asked


def test_prompt_token_logprobs_chunks_long_prompts():
    torch.manual_seed(0)
    logits, targets = torch.randn(600, 50), torch.randint(0, 50, (600,))
    out = prompt_token_logprobs(logits, targets, 2)
    expected = torch.log_softmax(logits, dim=-1)
    assert [e.token_id for e in out] == targets.tolist()
    assert [e.logprob for e in out] == pytest.approx(expected.gather(1, targets[:, None])[:, 0].tolist(), abs=1e-6)
    assert all(len(e.top) == 2 for e in out) and prompt_token_logprobs(logits, targets, 0)[5].top == ()


def test_ignore_eos_generates_to_max_new_tokens(tiny_model: Any, text_tokenizer: Any):
    plain = request(text_tokenizer, PROMPT, max_new_tokens=6)
    [free] = run_all(tiny_model, text_tokenizer, [plain])
    tokens = [e.token_ids[0] for e in free]
    eos = frozenset({tokens[2]})  # a token the greedy answer reaches ends the sequence there...
    stopped, ignored = run_all(tiny_model, text_tokenizer, [plain, replace(plain, ignore_eos=True)], eos=eos)
    assert stopped[-1].finish_reason is FinishReason.EOS_TOKEN and len(stopped) == tokens.index(tokens[2]) + 1 < 6
    # ...unless the request ignores it: the same six tokens as without an end-of-sequence set.
    assert ignored[-1].finish_reason is FinishReason.LENGTH
    assert [e.token_ids for e in ignored] == [e.token_ids for e in free]


def test_a_row_that_scores_its_prompt_is_prefilled_alone(tiny_model: Any, text_tokenizer: Any,
                                                         monkeypatch: pytest.MonkeyPatch):
    """Its forward keeps every position's logits: alone, those are its own, not (rows x positions x vocabulary)."""
    import quiver.server.engine.model_runner as runner_module

    forwards: list[list[bool]] = []
    real_prefill = runner_module.prefill

    def spy(forward: Any, rows: Any) -> Any:
        forwards.append([row.prompt_logprobs is not None for row in rows])
        return real_prefill(forward, rows)

    monkeypatch.setattr(runner_module, "prefill", spy)
    plain = [request(text_tokenizer, p, max_new_tokens=2) for p in ("One two", "Three four five")]
    scored = replace(request(text_tokenizer, PROMPT, max_new_tokens=2), prompt_logprobs=0)
    results = run_all(tiny_model, text_tokenizer, [plain[0], scored, plain[1]])
    assert all(events[-1].finish_reason is not None for events in results)
    assert [True] in forwards and all(rows == [True] or not any(rows) for rows in forwards)
    assert any(len(rows) == 2 for rows in forwards)  # the plain ones still share a forward
