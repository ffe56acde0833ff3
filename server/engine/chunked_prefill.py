"""Chunked prefill of one long prompt: a chunk per engine step, so running sequences never stall for a whole
prompt.

As in Sarathi (Agrawal et al., 2023) and vLLM's chunked prefill, a step's prefill work is bounded: a prompt
longer than the prefill budget is fed a budget's worth of tokens per step into a cache of its own, between
the running batch's decode steps; once the whole prompt is in, the row joins the batch like any prefilled
group. The first chunk goes through the batched prefill, so a soft prompt or a prefix enters exactly as there;
later chunks continue the same cache at the next positions.
"""

from __future__ import annotations

from dataclasses import replace

from quiver.server.engine.kv_cache import growing
from quiver.server.engine.logprobs import TokenLogprob
from quiver.server.engine.model_forward import ModelForward
from quiver.server.engine.prefill import Prefilled, PrefillRow, extend, prefill


class ChunkedPrefill:
    """The state of one row's chunked prefill."""

    def __init__(self, row: PrefillRow, budget: int, soft_tokens: int = 0) -> None:
        """`soft_tokens`: positions of the row's soft prompt (prompt tuning), computed in the first chunk."""
        self._row = row
        self._budget = budget  # positions computed per chunk (the first also computes the soft prompt's)
        self._soft = soft_tokens
        self._fed = 0  # prompt tokens in the cache so far
        self._done: Prefilled | None = None
        self._scores: list[TokenLogprob | None] = []  # prompt log-probabilities of the chunks so far

    @property
    def positions(self) -> int:
        """Positions computed so far: the prompt tokens fed, and the soft prompt once the first chunk ran."""
        return self._fed + (self._soft if self._done is not None else 0)

    def advance(self, forward: ModelForward) -> Prefilled | None:
        """Feed the next chunk; returns the prefilled row after the last chunk, None before. A row that asked for
        its prompt's log-probabilities gets them for the whole prompt, gathered over the chunks."""
        ids, adapter, want, pooled = self._row.ids, self._row.adapter, self._row.prompt_logprobs, self._row.pooled
        if self._done is None:
            first = max(1, self._budget - self._soft)  # a soft prompt shares the first chunk
            done = prefill(forward, [PrefillRow(ids[:first], adapter, want, pooled)])
            self._fed = min(first, ids.numel())
            # The next chunk's update makes room for itself plus this block: exactly the rest of the prompt, so
            # no later chunk copies the cache (as torch.cat would) and none reserves more than the prompt needs.
            rest = ids.numel() - self._fed
            self._done = replace(done, cache=growing(done.cache, max(1, rest - self._budget)))
        else:
            chunk = ids[self._fed : self._fed + self._budget]
            earlier = self._done.pooled
            self._done = extend(forward, self._done, PrefillRow(chunk, adapter, want, pooled))
            if earlier is not None and earlier[0] is not None and self._done.pooled is not None:
                later = self._done.pooled[0]
                assert later is not None, "a pooled row's chunks are pooled"
                self._done = replace(self._done, pooled=[earlier[0].then(later)])
            self._fed += chunk.numel()
        if self._done.prompt_logprobs is not None:
            self._scores.extend(self._done.prompt_logprobs[0] or ())
        if self._fed < ids.numel():
            return None
        return replace(self._done, prompt_logprobs=[tuple(self._scores)]) if want is not None else self._done
