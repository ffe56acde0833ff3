"""What the engine reports to whoever submitted a request, and the handle it gives back."""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from quiver.server.engine.logprobs import TokenLogprob


class FinishReason(enum.Enum):
    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"


@dataclass(frozen=True)
class GenerationEvent:
    """What one engine step produced for one request; the last event has `finish_reason` or `error`."""

    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None = None
    error: BaseException | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id, when the request asked for them
    # In the first event, when the request asked: one per prompt token, None for the first (nothing predicts it)
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()
    queue_seconds: float | None = None  # in the first event: from submission to the first prefill
    # An embedding request's only event: (H,) float32 on the CPU; a classification request's: (labels,) probabilities
    embedding: torch.Tensor | None = None


Sink = Callable[[GenerationEvent], None]


class RequestHandle:
    """Lets the submitter cancel; the engine drops the sequence at its next step."""

    def __init__(self) -> None:
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()
