"""A request as the engine runs it: validated and tokenized by the API layer (server/api/request_builder.py),
with the adapter version it names resolved, and how many cache positions its adapter adds."""

from __future__ import annotations

from dataclasses import dataclass

from quiver.adapters.store import StoredAdapter
from quiver.server.engine.kinds import KINDS
from quiver.server.engine.pooling import EmbedSpec
from quiver.server.engine.sampling import SamplingParams


@dataclass(frozen=True)
class GenerationRequest:
    """A request the engine can run as is."""

    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    max_new_tokens: int
    stop_sequences: tuple[str, ...]
    adapter: StoredAdapter | None = None  # the adapter version to apply, resolved when the request arrived
    logprobs: int | None = None  # None: no log-probabilities; n: each token's and the n most likely ones
    prompt_logprobs: int | None = None  # None: none; n: each prompt token's (after the first) and n most likely
    ignore_eos: bool = False  # end only at max_new_tokens or a stop sequence
    embed: EmbedSpec | None = None  # an embedding row (max_new_tokens 0): prefilled, pooled, never decoded


def virtual_tokens(adapter: StoredAdapter | None) -> int:
    """Positions an adapter adds before the prompt (soft prompt or prefix entries; its kind says); 0 for none."""
    return KINDS[adapter.metadata.kind].virtual_tokens(adapter.metadata) if adapter is not None else 0


def prefill_positions(adapter: StoredAdapter | None) -> int:
    """Of `virtual_tokens`, the positions a row's prefill forward computes (a soft prompt's); 0 for none."""
    return KINDS[adapter.metadata.kind].prefill_positions(adapter.metadata) if adapter is not None else 0
