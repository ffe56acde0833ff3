"""Next-token selection for a continuous batch in which every row brings its own parameters and generator.

Reproduces the decoding of `transformers`' `generate`, in the order its `_get_logits_processor` applies
the processors: the CTRL repetition penalty (Keskar et al., 2019) on every row, then, for sampled rows
only, temperature, top-k and nucleus filtering (top-p, Holtzman et al., 2020) before a multinomial draw.
Greedy rows are the argmax of the penalised logits, so the engine matches `generate(do_sample=False)` token
for token. Each sampled row draws from its own seeded `torch.Generator`, so a seeded request gets the same
tokens whatever else shares its batch.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its next token; the request builder has validated every value."""

    temperature: float = 0.0
    """Softmax temperature; 0 selects greedy decoding (`do_sample=False`)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`; in (0, 1]."""
    top_k: int = 0
    """Keep only the `top_k` most likely tokens (ties with the k-th included); 0 keeps all."""
    repetition_penalty: float = 1.0
    """CTRL penalty (> 0) on every token already seen, prompt included; 1 is off, < 1 rewards repeats."""
    seed: int | None = None
    """Seed of the row's generator (uint64); None draws a random one."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class RowSampler:
    """One row's sampling parameters and its private random generator."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(64)
        self._generator: torch.Generator | None = None

    def generator(self, device: torch.device) -> torch.Generator:
        # Created on first draw: only then is the logits' device known.
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator

    def warp(self, scores: Tensor) -> Tensor:
        """Temperature, top-k and top-p on penalised `scores` `(1, V)`; filtered tokens become -inf."""
        for warper in _WARPERS:
            scores = warper(scores, self.params)  # (1, V)
        return scores

    def sample(self, scores: Tensor) -> Tensor:
        """Draw one token from penalised `scores` `(1, V)`; returns a `(1,)` long tensor."""
        probs = self.warp(scores).softmax(dim=-1)  # (1, V)
        return torch.multinomial(probs, num_samples=1, generator=self.generator(scores.device))[0]  # (1,)


def sample_next(logits: Tensor, samplers: Sequence[RowSampler], seen: Sequence[Tensor]) -> Tensor:
    """Pick the next token of every row.

    `logits` `(B, V)` are the next-token logits, `samplers[i]` row i's sampler and `seen[i]` the 1-D long
    tensor of the ids row i already holds (prompt and generated). Returns `(B,)` long token ids on
    `logits.device`.
    """
    scores = logits.float()  # (B, V); `generate` processes float32 logits too
    scores = _penalise_repetitions(scores, [s.params.repetition_penalty for s in samplers], seen)  # (B, V)
    tokens = scores.argmax(dim=-1)  # (B,) the greedy rows' answer; sampled rows are overwritten below
    for i, sampler in enumerate(samplers):
        if not sampler.params.greedy:
            tokens[i] = sampler.sample(scores[i : i + 1])[0]
    return tokens


def _penalise_repetitions(scores: Tensor, penalties: Sequence[float], seen: Sequence[Tensor]) -> Tensor:
    """`RepetitionPenaltyLogitsProcessor` per row: seen tokens' logits are divided (> 0) or multiplied (< 0)."""
    rows = [i for i, penalty in enumerate(penalties) if penalty != 1.0]
    if not rows:
        return scores
    scores = scores.clone()  # the caller's logits stay untouched
    for i in rows:
        ids = seen[i].to(device=scores.device, dtype=torch.long)  # (S,)
        picked = scores[i].gather(0, ids)  # (S,)
        picked = torch.where(picked < 0, picked * penalties[i], picked / penalties[i])
        # Repeated ids scatter the same value, so duplicates in `seen` are harmless.
        scores[i].scatter_(0, ids, picked)
    return scores


Warper = Callable[[Tensor, SamplingParams], Tensor]
"""Maps a row's scores `(1, V)` to filtered or rescaled scores `(1, V)`; a no-op when its knob is off."""


def _temperature(scores: Tensor, params: SamplingParams) -> Tensor:
    return scores if params.temperature == 1.0 else scores / params.temperature


def _top_k(scores: Tensor, params: SamplingParams) -> Tensor:
    if params.top_k == 0:
        return scores
    k = min(params.top_k, scores.size(-1))
    kth = torch.topk(scores, k).values[..., -1:]  # (1, 1)
    return scores.masked_fill(scores < kth, float("-inf"))


def _top_p(scores: Tensor, params: SamplingParams) -> Tensor:
    if params.top_p >= 1.0:
        return scores
    # Same ops as `TopPLogitsWarper`, so ties at the nucleus edge fall the same way.
    sorted_scores, order = torch.sort(scores, descending=False)  # (1, V) ascending
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)  # (1, V)
    drop_sorted = cumulative <= 1 - params.top_p  # (1, V)
    drop_sorted[..., -1:] = False  # the most likely token always stays
    drop = drop_sorted.scatter(1, order, drop_sorted)  # (1, V) back in vocabulary order
    return scores.masked_fill(drop, float("-inf"))


# The order `generate` applies them in with do_sample=True.
_WARPERS: tuple[Warper, ...] = (_temperature, _top_k, _top_p)
