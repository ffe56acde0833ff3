"""The generation engine: owns the model on one thread and advances every running sequence step by step.

Iteration-level scheduling as in Orca (Yu et al., OSDI 2022): at every step the engine admits waiting
requests (prefill), decodes one token for each running sequence and retires finished or cancelled ones at
once, so a short request submitted while a long one runs finishes first. Each sequence keeps its own
key/value cache; sampling runs over all running rows together.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from quiver.server.config import EngineConfig
from quiver.server.detokenizer import TextStream
from quiver.server.errors import QuiverError, ResourceExhausted, Unavailable
from quiver.server.request_builder import GenerationRequest
from quiver.server.sampling import RowSampler, sample_next

log = logging.getLogger(__name__)


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


@dataclass(eq=False)
class _Sequence:
    """Engine-thread state of one running request."""

    request: GenerationRequest
    sink: Sink
    handle: RequestHandle
    sampler: RowSampler
    text: TextStream
    seen: torch.Tensor  # (prompt_len + max_new_tokens,) token ids; the first `n_seen` are valid
    n_seen: int
    cache: DynamicCache = field(default_factory=DynamicCache)
    logits: torch.Tensor | None = None  # (V,) next-token logits
    n_generated: int = 0


class Engine:
    """Runs generation requests on a dedicated thread that alone touches the model."""

    def __init__(self, model: Any, tokenizer: Any, eos_token_ids: frozenset[int], config: EngineConfig) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._eos = eos_token_ids
        self._config = config
        self._device = next(model.parameters()).device
        self._waiting: queue.Queue[_Sequence] = queue.Queue()
        self._running: list[_Sequence] = []
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="quiver-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish no more work: running and waiting requests get UNAVAILABLE."""
        self._stopping = True
        self._wake.set()
        self._thread.join()

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return self._waiting.qsize()

    def submit(self, request: GenerationRequest, sink: Sink) -> RequestHandle:
        """Queue `request`; `sink` is called from the engine thread with every event."""
        if self._stopping:
            raise Unavailable("the server is shutting down")
        if self._waiting.qsize() >= self._config.max_queued:
            raise ResourceExhausted(f"{self._config.max_queued} requests are already waiting")
        handle = RequestHandle()
        seen = torch.zeros(len(request.prompt_ids) + request.max_new_tokens, dtype=torch.long)
        seen[: len(request.prompt_ids)] = torch.tensor(request.prompt_ids, dtype=torch.long)
        self._waiting.put(
            _Sequence(
                request=request,
                sink=sink,
                handle=handle,
                sampler=RowSampler(request.sampling),
                text=TextStream(self._tokenizer, request.stop_sequences),
                seen=seen,
                n_seen=len(request.prompt_ids),
            )
        )
        self._wake.set()
        return handle

    # -- engine thread -------------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stopping:
                self._admit()
                if not self._running:
                    self._wake.wait()
                    self._wake.clear()
                    continue
                try:
                    self._step()
                except Exception as e:  # a model failure fails the batch, not the server
                    log.exception("engine step failed")
                    self._fail_all(self._running, e)
                    self._running = []
        self._fail_all(self._running + self._drain_waiting(), Unavailable("the server is shutting down"))

    def _admit(self) -> None:
        """Prefill waiting requests while there is room."""
        while len(self._running) < self._config.max_running:
            try:
                seq = self._waiting.get_nowait()
            except queue.Empty:
                return
            if seq.handle.cancelled:
                continue
            try:
                self._forward(seq, seq.request.prompt_ids)
            except Exception as e:
                log.exception("prefill failed")
                self._fail_all([seq], e)
                continue
            self._running.append(seq)

    def _step(self) -> None:
        """Sample one token for every running sequence, emit it, then run the next forward."""
        self._running = [s for s in self._running if not s.handle.cancelled]
        batch = self._running
        if not batch:
            return
        logits = torch.stack([s.logits for s in batch if s.logits is not None])  # (B, V)
        tokens = sample_next(logits, [s.sampler for s in batch], [s.seen[: s.n_seen] for s in batch])
        still_running = []
        for seq, token in zip(batch, tokens.tolist(), strict=True):
            if self._emit(seq, token):
                still_running.append(seq)
                self._forward(seq, (token,))
        self._running = still_running

    def _forward(self, seq: _Sequence, token_ids: tuple[int, ...]) -> None:
        input_ids = torch.tensor([token_ids], dtype=torch.long, device=self._device)  # (1, T)
        out = self._model(input_ids=input_ids, past_key_values=seq.cache, use_cache=True, logits_to_keep=1)
        seq.logits = out.logits[0, -1].float()  # (V,)

    def _emit(self, seq: _Sequence, token: int) -> bool:
        """Record `token` and send its event; returns whether the sequence goes on."""
        seq.seen[seq.n_seen] = token
        seq.n_seen += 1
        seq.n_generated += 1
        finish: FinishReason | None = None
        if token in self._eos:
            finish = FinishReason.EOS_TOKEN
            text = ""
        else:
            text = seq.text.push(token)
            if seq.text.stopped:
                finish = FinishReason.STOP_SEQUENCE
            elif seq.n_generated >= seq.request.max_new_tokens:
                finish = FinishReason.LENGTH
        if finish is not None and finish is not FinishReason.STOP_SEQUENCE:
            text += seq.text.finish()
        event = GenerationEvent(
            text=text,
            token_ids=(token,),
            prompt_tokens=len(seq.request.prompt_ids),
            completion_tokens=seq.n_generated,
            finish_reason=finish,
        )
        return self._send(seq, event) and finish is None

    def _send(self, seq: _Sequence, event: GenerationEvent) -> bool:
        try:
            seq.sink(event)
        except Exception:  # the receiver is gone (its event loop closed): drop the sequence
            log.warning("dropping a sequence whose receiver is gone", exc_info=True)
            seq.handle.cancel()
            return False
        return True

    def _fail_all(self, seqs: list[_Sequence], error: BaseException) -> None:
        if not isinstance(error, QuiverError):
            error = RuntimeError(f"generation failed: {error}")
        for seq in seqs:
            self._send(seq, GenerationEvent("", (), len(seq.request.prompt_ids), seq.n_generated, error=error))

    def _drain_waiting(self) -> list[_Sequence]:
        drained = []
        while True:
            try:
                drained.append(self._waiting.get_nowait())
            except queue.Empty:
                return drained
