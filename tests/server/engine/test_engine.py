"""Engine tests on a tiny random Llama: reference equality, scheduling, cancellation, stop sequences."""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
import time
from typing import Any

import pytest
import torch

from quiver.common.errors import ResourceExhausted
from quiver.server.config import EngineConfig
from quiver.server.engine.engine import Engine
from quiver.server.engine.generation_events import FinishReason, GenerationEvent, RequestHandle
from quiver.server.engine.request import GenerationRequest
from quiver.server.engine.sampling import SamplingParams
from quiver.server.platform.cpu_threads import openmp_runtime

PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away,", "def fibonacci(n):", "1, 2, 3,"]


class Collector:
    """A sink that records events in arrival order, with a global sequence number."""

    counter = iter(range(1_000_000))
    lock = threading.Lock()

    def __init__(self) -> None:
        self.events: queue.Queue[tuple[int, GenerationEvent]] = queue.Queue()

    def __call__(self, event: GenerationEvent) -> None:
        with self.lock:
            self.events.put((next(self.counter), event))

    def wait(self, timeout: float = 60) -> tuple[int, list[GenerationEvent]]:
        """Events up to the final one, and the order number of the final one."""
        out = []
        while True:
            order, event = self.events.get(timeout=timeout)
            out.append(event)
            if event.finish_reason is not None or event.error is not None:
                return order, out


def request(tokenizer: Any, prompt: str, max_new_tokens: int = 16, **sampling: Any) -> GenerationRequest:
    stops = tuple(sampling.pop("stop", ()))
    return GenerationRequest(
        prompt_ids=tuple(tokenizer(prompt, add_special_tokens=False)["input_ids"]),
        sampling=SamplingParams(**sampling),
        max_new_tokens=max_new_tokens,
        stop_sequences=stops,
    )


def run(engine: Engine, req: GenerationRequest) -> list[GenerationEvent]:
    sink = Collector()
    engine.submit(req, sink)
    return sink.wait()[1]


def tokens_of(events: list[GenerationEvent]) -> list[int]:
    return [t for e in events for t in e.token_ids]


def reference_greedy(model: Any, req: GenerationRequest, eos: int) -> list[int]:
    ids = torch.tensor([req.prompt_ids])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=req.max_new_tokens, do_sample=False,
        eos_token_id=eos, pad_token_id=eos,
    )
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_transformers_generate(engine: Engine, tiny_model: Any, text_tokenizer: Any, prompt: str):
    req = request(text_tokenizer, prompt, max_new_tokens=24)
    events = run(engine, req)
    assert tokens_of(events) == reference_greedy(tiny_model, req, text_tokenizer.eos_token_id)
    text = "".join(e.text for e in events)
    assert text == text_tokenizer.decode(tokens_of(events), skip_special_tokens=True)
    assert events[-1].completion_tokens == len(tokens_of(events))
    assert events[-1].prompt_tokens == len(req.prompt_ids)


def test_concurrent_requests_match_solo_runs(engine: Engine, text_tokenizer: Any):
    reqs = [request(text_tokenizer, p, max_new_tokens=12 + 3 * i) for i, p in enumerate(PROMPTS)]
    solo = [tokens_of(run(engine, r)) for r in reqs]
    sinks = [Collector() for _ in reqs]
    for r, s in zip(reqs, sinks, strict=True):
        engine.submit(r, s)
    together = [tokens_of(s.wait()[1]) for s in sinks]
    assert together == solo


def test_late_short_request_finishes_first(engine: Engine, text_tokenizer: Any):
    long_sink, short_sink = Collector(), Collector()
    engine.submit(request(text_tokenizer, PROMPTS[0], max_new_tokens=200), long_sink)
    long_sink.events.get(timeout=30)  # the long request is decoding
    engine.submit(request(text_tokenizer, PROMPTS[1], max_new_tokens=3), short_sink)
    short_order, short_events = short_sink.wait()
    long_order, _ = long_sink.wait()
    assert short_events[-1].finish_reason is FinishReason.LENGTH
    assert short_order < long_order


def test_cancel_frees_the_sequence(engine: Engine, text_tokenizer: Any):
    sink = Collector()
    handle = engine.submit(request(text_tokenizer, PROMPTS[0], max_new_tokens=200), sink)
    sink.events.get(timeout=30)
    handle.cancel()
    deadline = time.monotonic() + 10
    while engine.num_running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.num_running == 0
    produced = sink.events.qsize()
    time.sleep(0.2)
    assert sink.events.qsize() == produced  # nothing more arrives after the sequence left
    assert produced < 199


def test_stop_sequence_truncates_text(engine: Engine, text_tokenizer: Any):
    free = run(engine, request(text_tokenizer, PROMPTS[2], max_new_tokens=24))
    text = "".join(e.text for e in free)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), "the free run should produce text to cut"
    stopped = run(engine, request(text_tokenizer, PROMPTS[2], max_new_tokens=24, stop=[stop]))
    assert stopped[-1].finish_reason is FinishReason.STOP_SEQUENCE
    assert "".join(e.text for e in stopped) == text[: text.index(stop)]


def test_seeded_sampling_is_reproducible(engine: Engine, text_tokenizer: Any):
    def sample(seed: int) -> list[int]:
        return tokens_of(run(engine, request(text_tokenizer, PROMPTS[3], 16, temperature=5.0, seed=seed)))

    first, again, other = sample(7), sample(7), sample(8)
    assert first == again
    assert first != other


@pytest.mark.parametrize("max_running", [1, 3])
def test_a_burst_fills_the_free_batch_places_then_the_queue(tiny_model: Any, text_tokenizer: Any, max_running: int):
    """The queue counts requests that will wait for a place: a burst into an idle engine is refused only past
    `max_running + max_queued`, whichever order the engine thread would take it in."""
    eng = Engine(tiny_model, text_tokenizer, frozenset(), EngineConfig(max_running=max_running, max_queued=2))
    try:
        # Not started: nothing leaves the inbox, so every request of the burst is still there.
        for i in range(max_running + 2):
            eng.submit(request(text_tokenizer, f"w{i}"), Collector())
        with pytest.raises(ResourceExhausted, match="2 requests are already waiting"):
            eng.submit(request(text_tokenizer, "c"), Collector())
    finally:
        eng.stop()


@pytest.mark.skipif(openmp_runtime() is None, reason="needs torch's OpenMP runtime (Linux)")
def test_the_engine_thread_claims_its_torch_threads_and_later_threads_get_one(tiny_model: Any, text_tokenizer: Any):
    before = torch.get_num_threads()
    seen: list[int] = []
    eng = Engine(tiny_model, text_tokenizer, frozenset(), EngineConfig(threads=2))
    eng.start()
    try:
        eng.submit(request(text_tokenizer, "a", max_new_tokens=1), lambda event: seen.append(torch.get_num_threads()))
        deadline = time.monotonic() + 30
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        elsewhere: list[int] = []
        other = threading.Thread(target=lambda: elsewhere.append(torch.get_num_threads()))
        other.start()
        other.join()
    finally:
        eng.stop()
        torch.set_num_threads(before)
    assert seen == [2]  # sinks run on the engine thread
    assert elsewhere == [1]
    with pytest.raises(ValueError, match="--threads"):
        EngineConfig(threads=-1)


def _unstarted(tiny_model: Any, text_tokenizer: Any, **config: Any) -> Engine:
    """An engine whose thread has not started: requests submitted now are all admitted at its first step."""
    return Engine(tiny_model, text_tokenizer, frozenset(), EngineConfig(**config))


def test_a_burst_of_arrivals_prefills_one_group_per_decode_step(
    tiny_model: Any, text_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
):
    """Running sequences are stalled by at most one prefill forward between two decode steps."""
    calls = _record_forwards(monkeypatch, "P", "P")
    # Prompts of 7, 11, 8 and 9 tokens and an 11-token budget: none is chunked, and no two fit one group, so each
    # prompt is a prefill group of its own.
    text = request(text_tokenizer, " ".join(PROMPTS * 2), max_new_tokens=6)
    starts = itertools.accumulate((7, 11, 8, 9), initial=0)
    prompts = [dataclasses.replace(text, prompt_ids=text.prompt_ids[a:b]) for a, b in itertools.pairwise(starts)]
    eng = _unstarted(tiny_model, text_tokenizer, max_prefill_tokens=11)
    sinks = [Collector() for _ in prompts]
    for prompt, sink in zip(prompts, sinks, strict=True):
        eng.submit(prompt, sink)
    eng.start()
    try:
        results = [sink.wait() for sink in sinks]
    finally:
        eng.stop()
    assert all(events[-1].finish_reason is FinishReason.LENGTH for _, events in results)
    assert calls.count("P") == len(prompts)
    assert "PP" not in "".join(calls), calls
    # Groups go oldest first: with equal lengths, requests finish in the order they were submitted.
    finished = [order for order, _ in results]
    assert finished == sorted(finished)


def _record_forwards(monkeypatch: pytest.MonkeyPatch, group: str, chunk: str) -> list[str]:
    """Record, in order, every prefill forward (a group's as `group`, a chunk's as `chunk`) and decode step ("D")."""
    from quiver.server.engine import chunked_prefill
    from quiver.server.engine import model_runner as runner_module
    from quiver.server.engine.batch import DecodeBatch

    calls: list[str] = []

    def recording(name: str, real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(runner_module, "prefill", recording(group, runner_module.prefill))
    monkeypatch.setattr(chunked_prefill, "prefill", recording(chunk, chunked_prefill.prefill))
    monkeypatch.setattr(chunked_prefill, "extend", recording(chunk, chunked_prefill.extend))
    monkeypatch.setattr(DecodeBatch, "forward", recording("D", DecodeBatch.forward))
    return calls


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(
    tiny_model: Any, text_tokenizer: Any, engine: Engine, monkeypatch: pytest.MonkeyPatch
):
    long_prompt = " ".join(PROMPTS * 3)
    reference = tokens_of(run(engine, request(text_tokenizer, long_prompt, max_new_tokens=8)))
    engine.stop()  # one engine per model at a time
    calls = _record_forwards(monkeypatch, "P", "P")
    eng = _unstarted(tiny_model, text_tokenizer, max_prefill_tokens=8)
    short, long = Collector(), Collector()
    eng.submit(request(text_tokenizer, PROMPTS[2], max_new_tokens=30), short)  # decoding while the long one fills
    eng.submit(request(text_tokenizer, long_prompt, max_new_tokens=8), long)
    eng.start()
    try:
        long_events, short_events = long.wait()[1], short.wait()[1]
    finally:
        eng.stop()
    prompt_tokens = len(text_tokenizer(long_prompt, add_special_tokens=False)["input_ids"])
    assert tokens_of(long_events) == reference  # chunked or not, the same tokens
    assert short_events[-1].finish_reason is FinishReason.LENGTH
    assert calls.count("P") == 1 + -(-prompt_tokens // 8)  # the short prompt, then the long one's chunks
    assert "PP" not in "".join(calls), calls


def test_cancelling_a_prompt_between_its_chunks_drops_it(
    tiny_model: Any, text_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
):
    from quiver.server.engine import chunked_prefill

    chunks: list[str] = []
    real_prefill, real_extend = chunked_prefill.prefill, chunked_prefill.extend

    def first_chunk(*args: Any, **kwargs: Any) -> Any:
        chunks.append("first")
        return real_prefill(*args, **kwargs)

    def next_chunk(*args: Any, **kwargs: Any) -> Any:
        chunks.append("next")
        return real_extend(*args, **kwargs)

    monkeypatch.setattr(chunked_prefill, "prefill", first_chunk)
    monkeypatch.setattr(chunked_prefill, "extend", next_chunk)
    short = request(text_tokenizer, PROMPTS[0], max_new_tokens=5)
    two_chunks = request(text_tokenizer, PROMPTS[3], max_new_tokens=3)
    budget = len(short.prompt_ids)  # the short prompt is one ordinary group; the check request takes two chunks
    assert budget < len(two_chunks.prompt_ids) <= 2 * budget
    eng = _unstarted(tiny_model, text_tokenizer, max_prefill_tokens=budget)
    handles: list[RequestHandle] = []
    seen = 0

    def cancel_on_second_token(event: GenerationEvent) -> None:
        nonlocal seen
        seen += 1
        if seen == 2:  # the long prompt has had its first chunk, not yet its second
            handles[0].cancel()
        driver(event)

    driver, victim = Collector(), Collector()
    eng.submit(short, cancel_on_second_token)
    handles.append(eng.submit(request(text_tokenizer, " ".join(PROMPTS), max_new_tokens=5), victim))
    eng.start()
    try:
        assert driver.wait()[1][-1].finish_reason is FinishReason.LENGTH
        assert tokens_of(run(eng, two_chunks))  # still serving
        assert chunks == ["first", "first", "next"]  # the victim: its first chunk only; then the check request
        assert victim.events.empty() and eng.num_running == 0
    finally:
        eng.stop()


def test_a_short_request_is_prefilled_between_a_long_prompts_chunks(
    tiny_model: Any, text_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
):
    calls = _record_forwards(monkeypatch, "G", "C")
    eng = _unstarted(tiny_model, text_tokenizer, max_prefill_tokens=8)
    long, short = Collector(), Collector()
    eng.submit(request(text_tokenizer, " ".join(PROMPTS * 3), max_new_tokens=4), long)  # the oldest: chunked
    eng.submit(request(text_tokenizer, PROMPTS[0], max_new_tokens=4), short)
    eng.start()
    try:
        short_events, long_events = short.wait()[1], long.wait()[1]
    finally:
        eng.stop()
    assert short_events[-1].finish_reason is long_events[-1].finish_reason is FinishReason.LENGTH
    # The long prompt's first chunk, then the short request's group, then its 3 decode steps interleaved with
    # chunks; once nothing decodes, the remaining chunks follow each other.
    assert "".join(calls).startswith("CGDCDCDC"), calls


def test_requests_waiting_only_for_their_prefill_are_not_queued(tiny_model: Any, text_tokenizer: Any):
    """Admitted requests hold a batch place: they do not count against --max-queued."""
    eng = _unstarted(tiny_model, text_tokenizer, max_prefill_tokens=11, max_queued=2)
    seen: list[int] = []
    first = Collector()

    def record(event: GenerationEvent) -> None:
        seen.append(eng.num_waiting)  # the second request is admitted, its prefill due at the next step
        first(event)

    eng.submit(request(text_tokenizer, PROMPTS[0], max_new_tokens=2), record)
    second = Collector()
    eng.submit(request(text_tokenizer, PROMPTS[1], max_new_tokens=2), second)
    eng.start()
    try:
        first.wait()
        second.wait()
    finally:
        eng.stop()
    assert seen[0] == 0


