"""Batched next-token selection against `transformers`' logits processors and `generate`'s sampling step."""

from __future__ import annotations

from typing import cast

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from quiver.server.engine.sampling import RowSampler, SamplingParams, _top_k, _top_p, sample_next, warp

from ..devices import DEVICES

V = 97


def _logits(batch: int, seed: int, vocab: int = V) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g) * 3  # (B, V)


def _seen(batch: int, seed: int, length: int = 12) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (length,), generator=g) for _ in range(batch)]


def _hf_apply(params: SamplingParams, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Run `generate`'s processors for `params` on `scores` `(1, V)` with history `ids` `(1, S)`."""
    return _hf_processors(params)(cast(torch.LongTensor, ids), scores.clone())


_NO_IDS = torch.zeros(1, 0, dtype=torch.long)  # (1, 0): warpers ignore the history


def _hf_processors(params: SamplingParams) -> LogitsProcessorList:
    """What `generate`'s `_get_logits_processor` builds; temperature 0 means do_sample=False."""
    procs = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.greedy:
        return procs
    if params.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k != 0:
        procs.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        procs.append(TopPLogitsWarper(params.top_p))
    return procs


def test_greedy_is_argmax_of_every_row() -> None:
    logits = _logits(8, seed=0)
    samplers = [RowSampler(SamplingParams()) for _ in range(8)]
    tokens = sample_next(logits, samplers, _seen(8, seed=1))
    assert tokens.dtype == torch.long and tokens.shape == (8,)
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_greedy_ties_break_like_torch_argmax() -> None:
    logits = torch.zeros(3, V)
    logits[0, [5, 9, 40]] = 2.0
    logits[1, [60, 3]] = 1.5
    tokens = sample_next(logits, [RowSampler(SamplingParams()) for _ in range(3)], _seen(3, seed=2))
    assert torch.equal(tokens, logits.argmax(dim=-1))


@pytest.mark.parametrize("penalty", [0.5, 0.9, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty: float) -> None:
    logits = _logits(4, seed=3)
    seen = _seen(4, seed=4, length=30)
    # Put the seen tokens on top, so the penalty decides the winner in at least some rows.
    for i in range(4):
        logits[i, seen[i][:3]] += 6.0
    expected = torch.cat(
        [RepetitionPenaltyLogitsProcessor(penalty)(seen[i][None], logits[i : i + 1].clone()) for i in range(4)]
    ).argmax(dim=-1)
    samplers = [RowSampler(SamplingParams(repetition_penalty=penalty)) for _ in range(4)]
    before = logits.clone()
    assert torch.equal(sample_next(logits, samplers, seen), expected)
    assert torch.equal(logits, before), "the caller's logits must not be modified"


def test_repetition_penalty_is_per_row() -> None:
    logits = torch.zeros(2, V)
    logits[:, 7] = 1.0
    logits[:, 8] = 0.9
    seen = [torch.tensor([7, 7, 3]), torch.tensor([7])]
    penalties = [SamplingParams(repetition_penalty=1.5), SamplingParams()]
    tokens = sample_next(logits, [RowSampler(p) for p in penalties], seen)
    assert tokens.tolist() == [8, 7]


@pytest.mark.parametrize("rows_per_draw", [1, 4])
def test_rows_with_nan_logits_get_no_token(rows_per_draw: int) -> None:
    logits = _logits(4, seed=16)
    params = [SamplingParams(), SamplingParams(), SamplingParams(temperature=0.8, seed=1),
              SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.2, seed=2)]
    clean = sample_next(logits, [RowSampler(p) for p in params], _seen(4, seed=17), rows_per_draw=rows_per_draw)
    poisoned = logits.clone()
    poisoned[1, 3] = poisoned[2, 50] = float("nan")
    tokens = sample_next(poisoned, [RowSampler(p) for p in params], _seen(4, seed=17), rows_per_draw=rows_per_draw)
    assert tokens.tolist() == [clean[0], -1, -1, clean[3]]


def test_bfloat16_logits_are_processed_in_float32() -> None:
    logits = _logits(3, seed=5).bfloat16()
    tokens = sample_next(logits, [RowSampler(SamplingParams()) for _ in range(3)], _seen(3, seed=6))
    assert torch.equal(tokens, logits.float().argmax(dim=-1))


@pytest.mark.parametrize("top_k", [1, 2, 5, 50, V, V + 10])
def test_top_k_mask_matches_transformers(top_k: int) -> None:
    scores = _logits(1, seed=7)
    scores[0, [10, 11, 12]] = scores.max() + 1  # a tie at the top-k edge keeps all tied tokens
    expected = TopKLogitsWarper(top_k)(None, scores.clone())  # type: ignore[arg-type]
    assert torch.equal(_top_k(scores, [SamplingParams(temperature=1.0, top_k=top_k)]), expected)


@pytest.mark.parametrize("top_p", [0.01, 0.3, 0.7, 0.95, 0.999])
def test_top_p_mask_matches_transformers(top_p: float) -> None:
    for seed in range(5):
        scores = _logits(1, seed=seed)
        expected = TopPLogitsWarper(top_p)(None, scores.clone())  # type: ignore[arg-type]
        assert torch.equal(_top_p(scores, [SamplingParams(temperature=1.0, top_p=top_p)]), expected)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.0, top_k=5),
        SamplingParams(temperature=3.0, top_p=0.6),
        SamplingParams(temperature=0.4, top_p=0.9),
        SamplingParams(temperature=2.5, top_k=30, top_p=0.5),
    ],
)
def test_warpers_match_transformers_in_generate_order(params: SamplingParams) -> None:
    for seed in range(5):
        scores = _logits(1, seed=seed)
        expected = _hf_apply(params, _NO_IDS, scores)
        assert torch.equal(warp(scores, [params]), expected)


def test_warpers_of_a_batch_equal_each_row_alone() -> None:
    """One warp over rows with different knobs (some off) gives each row what `generate` gives it alone."""
    params = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.6, top_k=3),
        SamplingParams(temperature=1.0, top_p=0.7),
        SamplingParams(temperature=2.0, top_k=V, top_p=0.95),
        SamplingParams(temperature=1.5, top_k=40, top_p=0.3),
        SamplingParams(temperature=1.0, top_k=1),
    ]
    for seed in range(5):
        scores = _logits(len(params), seed=seed)
        scores[1, [4, 5]] = scores[1].max() + 1  # a tie at row 1's top-k edge
        expected = torch.cat([_hf_apply(p, _NO_IDS, scores[i : i + 1]) for i, p in enumerate(params)])
        assert torch.equal(warp(scores, params), expected)


def test_repetition_penalties_of_a_batch_equal_each_row_alone() -> None:
    """Rows with different penalties and histories (repeated ids, empty) in one batch."""
    penalties = [1.3, 1.0, 0.7, 2.0, 1.1]
    seen = [torch.tensor([3, 3, 9, 50]), torch.tensor([3, 9]), torch.tensor([1, 2, 3, 4, 5, 6, 7, 1]),
            torch.tensor([], dtype=torch.long), torch.arange(V)]
    logits = _logits(len(penalties), seed=15)
    expected = torch.cat([
        _hf_apply(SamplingParams(repetition_penalty=p), seen[i][None], logits[i : i + 1])
        for i, p in enumerate(penalties)
    ]).argmax(dim=-1)
    samplers = [RowSampler(SamplingParams(repetition_penalty=p)) for p in penalties]
    assert torch.equal(sample_next(logits, samplers, seen), expected)


_MIXED = [
    SamplingParams(temperature=0.7, seed=11),
    SamplingParams(temperature=1.0, top_k=5, seed=12),
    SamplingParams(temperature=1.3, top_p=0.8, seed=13),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.2, seed=14),
    SamplingParams(repetition_penalty=1.4),  # a greedy row in the same batch
    SamplingParams(temperature=0.5, repetition_penalty=0.8, seed=2**64 - 1),
]
_SAMPLED = [p for p in _MIXED if not p.greedy]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows_per_draw", [1, 2, 64])  # a row at a time (a CPU) ... all at once (a GPU)
@pytest.mark.parametrize("batch", [_MIXED, _SAMPLED], ids=["with-greedy-rows", "all-sampled"])
def test_sampling_matches_generate_sampling_step(batch: list[SamplingParams], rows_per_draw: int, device: str) -> None:
    """Each row draws what `generate`'s `_sample` step draws under `torch.manual_seed(seed)`, however many rows
    are drawn together."""
    steps = 30
    step_logits = [_logits(len(batch), seed=100 + t).to(device) for t in range(steps)]
    seen = _seen(len(batch), seed=8)  # host tensors, as the engine keeps them
    samplers = [RowSampler(p) for p in batch]
    ours = []
    for t in range(steps):
        tokens = sample_next(step_logits[t], samplers, seen, rows_per_draw=rows_per_draw)
        ours.append(tokens)
        seen = [torch.cat([s, tok[None].cpu()]) for s, tok in zip(seen, tokens, strict=True)]
    ours_by_row = torch.stack(ours, dim=1)  # (B, steps)
    for i, params in enumerate(batch):
        ids = _seen(len(batch), seed=8)[i][None].to(device)  # (1, S)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        for t in range(steps):
            scores = _hf_apply(params, ids, step_logits[t][i : i + 1])  # (1, V)
            if params.greedy:
                token = scores.argmax(dim=-1)
            else:
                token = torch.multinomial(scores.softmax(dim=-1), num_samples=1)[:, 0]
            assert token.item() == ours_by_row[i, t].item(), (i, t)
            ids = torch.cat([ids, token[None]], dim=1)


def _draw(
    params: SamplingParams, logits: torch.Tensor, others: int, steps: int = 20, rows_per_draw: int | None = None
) -> list[int]:
    """Row 0's tokens over `steps` steps, in a batch with `others` unrelated sampled rows."""
    samplers = [RowSampler(params)] + [RowSampler(SamplingParams(temperature=1.0)) for _ in range(others)]
    out: list[int] = []
    for _ in range(steps):
        batch = torch.cat([logits, _logits(others, seed=len(out))]) if others else logits
        out.append(int(sample_next(batch, samplers, _seen(others + 1, seed=9), rows_per_draw=rows_per_draw)[0]))
    return out


def test_seeded_rows_are_reproducible_and_independent_of_the_batch() -> None:
    params = SamplingParams(temperature=1.5, seed=1234)
    logits = torch.zeros(1, V)  # uniform: every draw depends on the generator only
    alone = _draw(params, logits, others=0)
    assert alone == _draw(params, logits, others=0)
    assert alone == _draw(params, logits, others=5)
    assert alone == _draw(params, logits, others=5, rows_per_draw=6)  # drawn together, as on a GPU
    assert len(set(alone)) > 1
    assert alone != _draw(SamplingParams(temperature=1.5, seed=4321), logits, others=0)


def test_unseeded_rows_get_distinct_random_seeds() -> None:
    seeds = {RowSampler(SamplingParams(temperature=1.0)).seed for _ in range(8)}
    assert len(seeds) == 8


def test_very_low_temperature_is_greedy() -> None:
    logits = _logits(16, seed=10)
    samplers = [RowSampler(SamplingParams(temperature=1e-3, seed=i)) for i in range(16)]
    assert torch.equal(sample_next(logits, samplers, _seen(16, seed=11)), logits.argmax(dim=-1))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sampled_frequencies_follow_the_tempered_softmax(temperature: float) -> None:
    n, logits_row = 4000, torch.tensor([[2.0, 1.0, 0.0, -1.0]])  # (1, 4)
    samplers = [RowSampler(SamplingParams(temperature=temperature, seed=s)) for s in range(n)]
    tokens = sample_next(logits_row.expand(n, 4), samplers, [torch.tensor([], dtype=torch.long)] * n)
    freq = torch.bincount(tokens, minlength=4).float() / n
    expected = (logits_row[0] / temperature).softmax(dim=-1)
    assert torch.allclose(freq, expected, atol=0.03), (freq, expected)


def test_top_k_and_top_p_restrict_the_support() -> None:
    logits = _logits(1, seed=12)
    n = 600
    for params in (SamplingParams(temperature=2.0, top_k=3), SamplingParams(temperature=2.0, top_p=0.5)):
        allowed = _hf_apply(params, _NO_IDS, logits).isfinite()[0]
        samplers = [RowSampler(SamplingParams(**{**params.__dict__, "seed": s})) for s in range(n)]
        tokens = sample_next(logits.expand(n, V), samplers, [torch.tensor([], dtype=torch.long)] * n)
        drawn = set(tokens.tolist())
        assert drawn <= set(allowed.nonzero()[:, 0].tolist())
        assert len(drawn) > 1
