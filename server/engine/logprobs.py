"""Per-token log-probabilities for the requests that ask for them (vLLM's `logprobs`).

They are taken from the model's raw next-token distribution, log_softmax of the logits, before temperature,
top-k, top-p and the repetition penalty: those shape how a token is drawn, not what the model predicts. Only
rows that asked pay for the log_softmax and the top-k.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from quiver.server.platform.uploads import select_rows

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the `top` most likely tokens at its position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-probability), most likely first


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, requested: Sequence[int | None]
) -> list[TokenLogprob | None]:
    """For rows whose `requested` count is not None: the chosen token's log-probability and that many top ones.

    `logits` (B, V) raw next-token logits, `tokens` (B,) the tokens drawn from them."""
    rows = [i for i, n in enumerate(requested) if n is not None]
    out: list[TokenLogprob | None] = [None] * len(requested)
    if not rows:
        return out
    logprobs = torch.log_softmax(select_rows(logits, rows).float(), dim=-1)  # (R, V)
    chosen = logprobs.gather(1, select_rows(tokens.to(logits.device), rows)[:, None])[:, 0].tolist()  # (R,)
    k = min(max(requested[i] or 0 for i in rows), logprobs.shape[-1])
    top_values, top_ids = logprobs.topk(k, dim=-1)  # (R, k)
    ids, values, drawn = top_ids.tolist(), top_values.tolist(), tokens.tolist()  # one device sync each
    for j, i in enumerate(rows):
        n = requested[i] or 0
        out[i] = TokenLogprob(drawn[i], chosen[j], tuple(zip(ids[j][:n], values[j][:n], strict=True)))
    return out


# Positions whose log_softmax is taken at once: bounds the float32 temporaries to this many rows of the vocabulary.
_PROMPT_CHUNK = 256


def prompt_token_logprobs(logits: torch.Tensor, targets: torch.Tensor, top: int) -> list[TokenLogprob]:
    """Each target token's log-probability and the `top` most likely tokens (vLLM's `prompt_logprobs`).

    `logits` (N, V): row j is the model's prediction for `targets[j]` (N,), the token that followed."""
    out: list[TokenLogprob] = []
    k = min(top, logits.shape[-1])
    for start in range(0, targets.numel(), _PROMPT_CHUNK):
        rows = torch.log_softmax(logits[start : start + _PROMPT_CHUNK].float(), dim=-1)  # (C, V)
        chunk = targets[start : start + _PROMPT_CHUNK].to(rows.device)
        chosen = rows.gather(1, chunk[:, None])[:, 0].tolist()  # (C,)
        values, ids = rows.topk(k, dim=-1) if k else (rows[:, :0], rows[:, :0].long())  # (C, k)
        for token, logprob, top_ids, top_values in zip(
            chunk.tolist(), chosen, ids.tolist(), values.tolist(), strict=True
        ):
            out.append(TokenLogprob(token, logprob, tuple(zip(top_ids, top_values, strict=True))))
    return out
