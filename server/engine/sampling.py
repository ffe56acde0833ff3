"""Next-token selection for a continuous batch in which every row brings its own parameters and generator.

Reproduces the decoding of `transformers`' `generate`, in the order its `_get_logits_processor` applies
the processors: the CTRL repetition penalty (Keskar et al., 2019) on every row, then, for sampled rows
only, temperature, top-k and nucleus filtering (top-p, Holtzman et al., 2020) before a multinomial draw.
Greedy rows are the argmax of the penalised logits, so the engine matches `generate(do_sample=False)` token
for token. Each sampled row draws from its own seeded `torch.Generator`, so a seeded request gets the same
tokens whatever else shares its batch.

Each stage takes many rows at once, every row's knob a column of a small tensor, so on a GPU a step costs
the same few kernels at 1 or 128 sampled rows and reads nothing back. Only the random numbers are made per
row, from each row's own generator. The draw is the one `torch.multinomial` makes for one sample (an
exponential race: the argmax of p / q with q ~ Exp(1)), so the tokens are `generate`'s, without
multinomial's validity checks, which read values back to the host: two GPU synchronisations per row.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from quiver.server.platform.uploads import upload


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


def sample_next(
    logits: Tensor, samplers: Sequence[RowSampler], seen: Sequence[Tensor], *, rows_per_draw: int | None = None
) -> Tensor:
    """Pick the next token of every row.

    `logits` `(B, V)` are the next-token logits, `samplers[i]` row i's sampler and `seen[i]` the 1-D long
    tensor of the ids row i already holds (prompt and generated). `rows_per_draw`: how many sampled rows are
    warped and drawn together (the platform's choice); None: all at once. Returns `(B,)` long token ids on
    `logits.device`; a row whose logits hold a NaN gets -1, never a token picked from them.
    """
    scores = logits.float()  # (B, V); `generate` processes float32 logits too
    scores = _penalise_repetitions(scores, [s.params.repetition_penalty for s in samplers], seen)  # (B, V)
    tokens = scores.argmax(dim=-1)  # (B,) the greedy rows' answer; sampled rows are overwritten below
    # argmax takes a NaN over any number, so a row holds a NaN exactly when its argmax is one: B reads, not B x V.
    broken = scores.gather(1, tokens[:, None])[:, 0].isnan()  # (B,)
    sampled = [i for i, sampler in enumerate(samplers) if not sampler.params.greedy]
    rows_per_draw = rows_per_draw or max(1, len(sampled))
    for start in range(0, len(sampled), rows_per_draw):
        _draw(tokens, scores, sampled[start : start + rows_per_draw], samplers)
    return tokens.masked_fill_(broken, -1)  # (B,)


def _draw(tokens: Tensor, scores: Tensor, rows: Sequence[int], samplers: Sequence[RowSampler]) -> None:
    """Overwrite `tokens[rows]` `(B,)` with draws from those rows of penalised `scores` `(B, V)`."""
    first, n = rows[0], len(rows)
    consecutive = list(rows) == list(range(first, first + n))
    index = None if consecutive else upload(rows, torch.long, scores.device)  # (R,)
    picked = scores[first : first + n] if index is None else scores.index_select(0, index)  # (R, V)
    probs = warp(picked, [samplers[i].params for i in rows]).softmax(dim=-1)  # (R, V)
    noise = torch.empty_like(probs)  # (R, V)
    for j, i in enumerate(rows):
        noise[j].exponential_(generator=samplers[i].generator(probs.device))
    drawn = torch.div(probs, noise, out=noise).argmax(dim=-1)  # (R,) what torch.multinomial(probs, 1) draws
    if index is None:
        tokens[first : first + n] = drawn
    else:
        tokens.index_copy_(0, index, drawn)


def warp(scores: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    """Temperature, top-k and top-p on penalised `scores` `(R, V)`, row j under `params[j]`; filtered tokens
    become -inf."""
    for warper in _WARPERS:
        scores = warper(scores, params)  # (R, V)
    return scores


def _penalise_repetitions(scores: Tensor, penalties: Sequence[float], seen: Sequence[Tensor]) -> Tensor:
    """`RepetitionPenaltyLogitsProcessor` per row: seen tokens' logits are divided (> 0) or multiplied (< 0)."""
    rows = [i for i, penalty in enumerate(penalties) if penalty != 1.0]
    if not rows:
        return scores
    counts = torch.tensor([len(seen[i]) for i in rows])  # (R,)
    owner = torch.tensor(rows).repeat_interleave(counts)  # (S,) the row of each seen id
    ids = torch.cat([seen[i] for i in rows])  # (S,)
    index = upload(torch.stack([owner, ids]), torch.long, scores.device)  # (2, S)
    factor = upload(torch.tensor([penalties[i] for i in rows]).repeat_interleave(counts), scores.dtype, scores.device)
    picked = scores[index[0], index[1]]  # (S,)
    picked = torch.where(picked < 0, picked * factor, _divide(picked, factor))
    # Out of place: the caller's logits stay untouched. A repeated id writes the same value each time.
    return scores.index_put((index[0], index[1]), picked)  # (B, V)


Warper = Callable[[Tensor, Sequence[SamplingParams]], Tensor]
"""Maps sampled rows' scores `(R, V)`, row j under `params[j]`, to filtered or rescaled scores `(R, V)`; rows
whose knob is off come out unchanged."""


def _temperature(scores: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    if all(p.temperature == 1.0 for p in params):
        return scores
    temperature = upload([p.temperature for p in params], scores.dtype, scores.device)  # (R,)
    return _divide(scores, temperature[:, None])  # rows at 1.0 are divided by exactly 1


def _top_k(scores: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    ks = [min(p.top_k, scores.size(-1)) for p in params]  # 0: off
    if not any(ks):
        return scores
    k = upload(ks, torch.long, scores.device)[:, None]  # (R, 1)
    top = torch.topk(scores, max(ks)).values  # (R, k_max) descending
    kth = top.gather(1, (k - 1).clamp_min(0))  # (R, 1) each row's k-th largest score
    kth = kth.masked_fill(k == 0, float("-inf"))  # rows without top-k drop nothing
    return scores.masked_fill(scores < kth, float("-inf"))


def _top_p(scores: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    if all(p.top_p >= 1.0 for p in params):
        return scores
    # `TopPLogitsWarper` drops sorted tokens whose cumulative probability is <= 1 - top_p; a row without top-p
    # gets a limit no cumulative probability reaches, as `generate` gives it no warper at all.
    limit = upload([1 - p.top_p if p.top_p < 1.0 else -1.0 for p in params], scores.dtype, scores.device)  # (R,)
    # Same ops as `TopPLogitsWarper`, so ties at the nucleus edge fall the same way.
    sorted_scores, order = torch.sort(scores, descending=False)  # (R, V) ascending
    cumulative = _cumsum_rows(sorted_scores.softmax(dim=-1))  # (R, V)
    drop_sorted = cumulative <= limit[:, None]  # (R, V)
    drop_sorted[..., -1:] = False  # the most likely token always stays
    drop = drop_sorted.scatter(1, order, drop_sorted)  # (R, V) back in vocabulary order
    return scores.masked_fill(drop, float("-inf"))


def _divide(x: Tensor, divisor: Tensor) -> Tensor:
    """`x / divisor` rounded as transformers' `x / python_float` is on x's device, so draws stay `generate`'s:
    CUDA multiplies by the float32 reciprocal of a host scalar (`div_true_kernel_cuda`), a CPU divides."""
    return x * divisor.reciprocal() if x.is_cuda else x / divisor


def _cumsum_rows(p: Tensor) -> Tensor:
    """Each row's cumulative sum `(R, V)`, summed in the order `generate` sums its one row: on CUDA a single row
    takes another scan kernel than many rows do, which adds in another order."""
    if not p.is_cuda or p.shape[0] == 1:
        return p.cumsum(dim=-1)
    return torch.stack([row.cumsum(dim=-1) for row in p])


# The order `generate` applies them in with do_sample=True.
_WARPERS: tuple[Warper, ...] = (_temperature, _top_k, _top_p)
