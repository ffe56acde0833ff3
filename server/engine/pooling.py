"""Embeddings as prefill-only rows: the base model's last hidden states, pooled per row.

An embedding row is prefilled with the batch's generation rows, under its own adapter, and leaves right after its
prefill instead of joining the decode batch. Its vector is the decoder's output (`last_hidden_state`: after the
final norm, before the LM head), pooled over the row's own tokens: a soft prompt's or a prefix's virtual positions
shape the representation but are not averaged in. The decoder's output is read by a forward hook, only in forwards
with an embedding row, so generation forwards are untouched.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from quiver.adapters.classifier_head import HEAD_BIAS, HEAD_WEIGHT


class Pooling(enum.Enum):
    MEAN = "mean"  # the mean over the row's tokens
    LAST = "last"  # the last token's (what a causal model has read the whole input at)


@dataclass(frozen=True)
class EmbedSpec:
    """How an embedding request pools its row's hidden states; with `classify`, the last token's go through the
    row's adapter's classification head instead (`pooling` LAST, no normalisation), giving label probabilities."""

    pooling: Pooling = Pooling.MEAN
    normalize: bool = True  # scaled to unit L2 norm (cosine similarity = dot product)
    classify: bool = False

    @classmethod
    def classification(cls) -> EmbedSpec:
        return cls(Pooling.LAST, normalize=False, classify=True)


@dataclass(frozen=True)
class ClassifierHead:
    """A classification adapter's output layer on the device: logits = hidden @ weight.T + bias."""

    weight: torch.Tensor  # (L, H)
    bias: torch.Tensor | None  # (L,)

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor], device: torch.device) -> ClassifierHead:
        """From a host adapter's head tensors (adapters/classifier_head.py), kept in float32: they are tiny."""
        bias = tensors.get(HEAD_BIAS)
        return cls(tensors[HEAD_WEIGHT].to(device, torch.float32),
                   bias.to(device, torch.float32) if bias is not None else None)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.bias) if t is not None)

    def probabilities(self, hidden: torch.Tensor) -> torch.Tensor:
        """(L,) float32 on the CPU: softmax of the head's logits over a row's last hidden state (H,)."""
        logits = torch.nn.functional.linear(hidden.to(self.weight.device, torch.float32), self.weight, self.bias)
        return logits.softmax(dim=-1).cpu()


@dataclass(frozen=True)
class PooledPart:
    """A row's hidden states over some of its tokens (a whole prompt, or one chunk of a long one), float32."""

    total: torch.Tensor  # (H,) sum over the tokens
    last: torch.Tensor  # (H,) the last token's
    count: int  # tokens summed

    def then(self, later: PooledPart) -> PooledPart:
        """This part followed by `later` (the next chunk of the same row)."""
        return PooledPart(self.total + later.total, later.last, self.count + later.count)

    def vector(self, spec: EmbedSpec) -> torch.Tensor:
        """(H,) float32 on the CPU: the embedding `spec` asks for."""
        out = self.total / self.count if spec.pooling is Pooling.MEAN else self.last
        if spec.normalize:
            out = torch.nn.functional.normalize(out, dim=0)
        return out.cpu()


@contextmanager
def last_hidden_states(model: Any, wanted: bool) -> Iterator[list[torch.Tensor]]:
    """While open (and `wanted`), each forward's decoder output (B, T, H) is appended to the yielded list."""
    seen: list[torch.Tensor] = []
    if not wanted:
        yield seen
        return

    def keep(_module: Any, _args: Any, output: Any) -> None:
        seen.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = model.get_decoder().register_forward_hook(keep)
    try:
        yield seen
    finally:
        handle.remove()


def pool_rows(hidden: torch.Tensor, spans: Sequence[tuple[int, int] | None]) -> list[PooledPart | None]:
    """Row i's hidden states (B, T, H) summed over its positions `spans[i]` = [start, end); None where no span."""
    parts: list[PooledPart | None] = []
    for i, span in enumerate(spans):
        if span is None:
            parts.append(None)
            continue
        start, end = span
        states = hidden[i, start:end].float()  # (n, H)
        parts.append(PooledPart(states.sum(dim=0), states[-1], end - start))
    return parts
