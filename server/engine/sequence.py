"""One request as the engine thread holds it: its tokens so far, sampler, text stream and the events it sends."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from quiver.common.errors import FailedPrecondition, QuiverError, ResourceExhausted
from quiver.server.engine.adapter_tiers import DeviceAdapter
from quiver.server.engine.detokenizer import TextStream
from quiver.server.engine.generation_events import FinishReason, GenerationEvent, RequestHandle, Sink
from quiver.server.engine.logprobs import TokenLogprob
from quiver.server.engine.pooling import PooledPart
from quiver.server.engine.request import GenerationRequest, prefill_positions, virtual_tokens
from quiver.server.engine.sampling import RowSampler

log = logging.getLogger(__name__)


@dataclass(eq=False)
class RequestState:
    """Engine-thread state of one request."""

    request: GenerationRequest
    sink: Sink
    handle: RequestHandle
    sampler: RowSampler
    text: TextStream
    seen: torch.Tensor  # (prompt_len + max_new_tokens,) token ids; the first `n_seen` are valid
    n_seen: int
    peak: int  # most cache positions the row can take: prompt + its adapter's virtual tokens + max_new_tokens
    arrival: int = 0  # submission order: preemption takes the newest rows first
    adapter: DeviceAdapter | None = None
    logits: torch.Tensor | None = None  # (V,) next-token logits
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()  # from the prefill, sent with the first token
    n_generated: int = 0
    done: bool = field(default=False)
    submitted: float = field(default_factory=time.monotonic)
    queue_seconds: float | None = None  # from submission to its first prefill forward, set then
    _queue_reported: bool = False  # the first event carries queue_seconds

    @classmethod
    def of(cls, request: GenerationRequest, sink: Sink, tokenizer: Any, arrival: int) -> RequestState:
        """A submitted request's state before it runs: room for every token it may generate."""
        prompt = torch.tensor(request.prompt_ids, dtype=torch.long)
        seen = torch.cat([prompt, torch.zeros(request.max_new_tokens, dtype=torch.long)])
        peak = len(request.prompt_ids) + virtual_tokens(request.adapter) + request.max_new_tokens
        return cls(request, sink, RequestHandle(), RowSampler(request.sampling),
                   TextStream(tokenizer, request.stop_sequences), seen, len(request.prompt_ids), peak, arrival)

    @property
    def joined_length(self) -> int:
        """The row's cache once prefilled: its tokens and its adapter's soft prompt or prefix."""
        return self.n_seen + virtual_tokens(self.request.adapter)

    @property
    def prefill_length(self) -> int:
        """Positions the row's prefill forward computes: its tokens and any soft prompt before them."""
        return self.n_seen + prefill_positions(self.request.adapter)

    @property
    def scores_prompt(self) -> bool:
        """Whether the row's next prefill scores its prompt: asked for, and not yet done (a resumed row has)."""
        return self.request.prompt_logprobs is not None and self.n_generated == 0

    def emit(self, token: int, detail: TokenLogprob | None, eos: frozenset[int]) -> bool:
        """Record `token` and send its event; returns whether the sequence goes on. A negative token (logits
        with a NaN: `sample_next`) fails the request instead."""
        if token < 0:
            adapter = self.request.adapter
            if adapter is not None:  # the adapter's weights or scale make the model's numbers blow up
                self.fail(FailedPrecondition(f"adapter {adapter.metadata.name}@{adapter.metadata.version} makes "
                                             "the model's next-token logits NaN for this request"))
            else:
                self.fail(RuntimeError("the model's next-token logits for this request hold NaN"))
            return False
        self.seen[self.n_seen] = token
        self.n_seen += 1
        self.n_generated += 1
        finish: FinishReason | None = None
        if token in eos and not self.request.ignore_eos:
            finish, text = FinishReason.EOS_TOKEN, ""
        else:
            text = self.text.push(token)
            if self.text.stopped:
                finish = FinishReason.STOP_SEQUENCE
            elif self.n_generated >= self.request.max_new_tokens:
                finish = FinishReason.LENGTH
        if finish is not None and finish is not FinishReason.STOP_SEQUENCE:
            text += self.text.finish()
        event = GenerationEvent(text, (token,), len(self.request.prompt_ids), self.n_generated, finish,
                                logprobs=(detail,) if detail is not None else (), prompt_logprobs=self.prompt_logprobs,
                                queue_seconds=None if self._queue_reported else self.queue_seconds)
        self.prompt_logprobs = ()
        self._queue_reported = True
        return self.send(event) and finish is None

    def emit_embedding(self, part: PooledPart) -> None:
        """An embedding row's one event: its vector (a classification row's: its label probabilities), and the end
        of the request."""
        spec = self.request.embed
        assert spec is not None, "only embedding rows are pooled"
        if not spec.classify:
            vector = part.vector(spec)
        elif self.adapter is not None and self.adapter.head is not None:
            vector = self.adapter.head.probabilities(part.last)
        else:  # the API layer sends classification rows only with a classifier
            self.fail(FailedPrecondition("a classification request needs a classification adapter"))
            return
        self.send(GenerationEvent("", (), len(self.request.prompt_ids), 0, FinishReason.LENGTH,
                                  queue_seconds=self.queue_seconds, embedding=vector))

    def send(self, event: GenerationEvent) -> bool:
        """Hand `event` to the sink; False (and the request cancelled) when its receiver is gone."""
        try:
            self.sink(event)
        except Exception:  # the receiver is gone (its event loop closed): drop the sequence
            log.warning("dropping a sequence whose receiver is gone", exc_info=True)
            self.handle.cancel()
            return False
        return True

    def fail(self, error: BaseException) -> None:
        if isinstance(error, torch.OutOfMemoryError | MemoryError):  # a capacity limit, not a bug: the client may retry
            error = ResourceExhausted(f"the server ran out of memory for this batch: {error}")
        elif not isinstance(error, QuiverError):
            error = RuntimeError(f"generation failed: {error}")
        self.send(GenerationEvent("", (), len(self.request.prompt_ids), self.n_generated, error=error))
