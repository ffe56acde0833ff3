"""The model runner: turns a step's plan into forwards over the running batch. The only code that runs the model.

Per step, in this order: one decode forward (the plan's decode rows, each fed the token sampled for it at the
previous step; every other row leaves the batch), then one prefill forward (a group, or the next chunk of a
long prompt), whose rows join the batch. Every forward maps its rows' adapters once (ModelForward). Each row
then holds its next-token logits, for the engine to sample. Failures never raise: a failed prefill group is
retried row by row at once, so only the row at fault fails; a failed decode forward or join fails the batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from quiver.server.config import EngineConfig
from quiver.server.engine.batch import DecodeBatch
from quiver.server.engine.chunked_prefill import ChunkedPrefill
from quiver.server.engine.decode_step import decode_step_for
from quiver.server.engine.lora.slots import LoraSlots
from quiver.server.engine.model_forward import ModelForward
from quiver.server.engine.observer import EngineObserver, Phase
from quiver.server.engine.pooling import PooledPart
from quiver.server.engine.prefill import Prefilled, PrefillRow, prefill, select_prefilled
from quiver.server.engine.sequence import RequestState
from quiver.server.engine.step_scheduler import StepPlan
from quiver.server.platform.base import Platform
from quiver.server.platform.uploads import select_rows

log = logging.getLogger(__name__)
_T = TypeVar("_T")


@dataclass
class StepOutcome:
    """What running a plan did besides setting the rows' logits."""

    failed: list[tuple[RequestState, BaseException]] = field(default_factory=list)
    """Rows whose forward failed, with the error (the engine fails their requests)."""
    chunk_ended: bool = False
    """The chunked row joined the batch or failed: the scheduler may start the next long prompt."""


class ModelRunner:
    """Owns the running batch (its rows in batch order, their cache) and a long prompt's chunked prefill."""

    def __init__(self, model: Any, lora: LoraSlots, config: EngineConfig, device: torch.device,
                 platform: Platform, observer: EngineObserver | None = None) -> None:
        self.forward = ModelForward(model, lora)
        self._device = device
        self._platform = platform
        self._observer = observer or EngineObserver()
        self._budget = config.max_prefill_tokens
        self._batch = DecodeBatch(device, config.cache_block_tokens,
                                  decode_step_for(model, plain=config.plain_decode_step))
        self._rows: list[RequestState] = []  # replaced, never mutated: other threads read it
        self._chunk: tuple[RequestState, ChunkedPrefill] | None = None
        self.embedded: list[tuple[RequestState, PooledPart]] = []
        """Embedding rows prefilled this step, with their hidden states: never in the batch; the engine answers."""

    @property
    def rows(self) -> Sequence[RequestState]:
        """The running rows, in batch order."""
        return self._rows

    @property
    def lengths(self) -> Sequence[int]:
        """Each running row's cache entries, in batch order."""
        return self._batch.lengths

    def run(self, plan: StepPlan, tokens: torch.Tensor | None) -> StepOutcome:
        """The plan's forwards; `tokens` (B,) were sampled for the batch's rows at the previous step."""
        outcome = StepOutcome()
        if self._chunk is not None and self._chunk[0].done:  # cancelled mid-prompt: its partial cache goes
            self._chunk = None
        if self._rows:
            assert tokens is not None and tokens.shape[0] == len(self._rows)
            rows = len(plan.decode)
            outcome.failed += self._timed(Phase.DECODE, rows, rows, lambda: self._decode(plan.decode, tokens))
        if plan.prefill:
            group = list(plan.prefill)
            positions = sum(row.prefill_length for row in group)
            outcome.failed += self._timed(Phase.PREFILL, len(group), positions, lambda: self._prefill(group))
        elif plan.chunk is not None:
            chunk = plan.chunk
            before = self._chunk[1].positions if self._chunk is not None and self._chunk[0] is chunk else 0
            outcome.chunk_ended, failed = self._timed(Phase.PREFILL, 1, lambda: self._chunk_positions(chunk) - before,
                                                      lambda: self._advance_chunk(chunk))
            outcome.failed += failed
        return outcome

    def _timed(self, phase: Phase, rows: int, tokens: int | Callable[[], int], forward: Callable[[], _T]) -> _T:
        """Run `forward`, reporting its duration (device work included) with its rows and positions (`tokens`, or
        a function that counts them once it ran)."""
        start = time.perf_counter()
        result = forward()
        if rows:
            self._platform.synchronize(self._device)
            seconds = time.perf_counter() - start
            self._observer.forward(phase, seconds, rows, tokens if isinstance(tokens, int) else tokens())
        return result

    def _chunk_positions(self, row: RequestState) -> int:
        """Positions the chunked prefill of `row` has computed; its whole prefill once it joined the batch."""
        if self._chunk is not None and self._chunk[0] is row:
            return self._chunk[1].positions
        return row.prefill_length if any(r is row for r in self._rows) else 0


    def clear(self) -> list[RequestState]:
        """Drop every running row (after a failure that leaves the batch unusable); returns them."""
        rows, self._rows = self._rows, []
        self._batch.keep([])
        return rows

    def _decode(self, rows: Sequence[RequestState], tokens: torch.Tensor) -> list[tuple[RequestState, BaseException]]:
        """Keep only `rows` in the batch and decode them in one forward."""
        wanted = {id(row) for row in rows}
        keep = [i for i, row in enumerate(self._rows) if id(row) in wanted]
        self._rows = [self._rows[i] for i in keep]
        self._batch.keep(keep)
        if not keep:
            return []
        try:
            self.forward.map([row.adapter for row in self._rows], 1, transient=False)
            logits = self._batch.forward(self.forward.model, select_rows(tokens, keep).to(self._device))  # (B, V)
        except Exception as e:  # a model failure fails the batch, not the server
            log.exception("decode step failed")
            return [(row, e) for row in self.clear()]
        for row, next_logits in zip(self._rows, logits, strict=True):
            row.logits = next_logits
        return []

    def _prefill(self, rows: list[RequestState]) -> list[tuple[RequestState, BaseException]]:
        """Prefill `rows` in one forward and add them to the batch."""
        try:
            out = prefill(self.forward, [self._prefill_row(row) for row in rows])
        except Exception as e:  # the group fails, the running batch goes on
            if len(rows) > 1:  # find the row at fault: each alone, so only it fails
                log.warning("prefill of %d rows failed; retrying each alone", len(rows), exc_info=True)
                return [failure for row in rows for failure in self._prefill([row])]
            log.exception("prefill failed")
            return [(rows[0], e)]
        return self._join(rows, out)

    def _advance_chunk(self, row: RequestState) -> tuple[bool, list[tuple[RequestState, BaseException]]]:
        """Feed the long prompt of `row` its next chunk; after the last, it joins the batch. Returns whether the
        chunked prefill ended (joined or failed) and the failures."""
        try:
            if self._chunk is None or self._chunk[0] is not row:  # a new long prompt (a cancelled one is dropped)
                soft = row.prefill_length - row.n_seen  # a soft prompt's positions, computed in the first chunk
                self._chunk = (row, ChunkedPrefill(self._prefill_row(row), self._budget, soft))
            out = self._chunk[1].advance(self.forward)
        except Exception as e:
            log.exception("prefill failed")
            self._chunk = None
            return True, [(row, e)]
        if out is None:
            return False, []
        self._chunk = None
        return True, self._join([row], out)

    def _prefill_row(self, row: RequestState) -> PrefillRow:
        """`row` as its prefill forward (about to run) takes it; a first prefill ends the row's queue wait."""
        if row.queue_seconds is None:
            row.queue_seconds = time.monotonic() - row.submitted
            self._observer.queued(row.queue_seconds)
        # The prompt, and for a preempted row the tokens it generated before (their cache was dropped).
        scored = row.request.prompt_logprobs if row.scores_prompt else None
        return PrefillRow(row.seen[: row.n_seen].to(self._device, copy=True), row.adapter, scored,
                          pooled=row.request.embed is not None)

    def _join(self, rows: list[RequestState], out: Prefilled) -> list[tuple[RequestState, BaseException]]:
        """Add prefilled `rows` to the running batch; embedding rows, done, are kept aside for the engine to answer."""
        if out.pooled is not None:
            embedded = [i for i, part in enumerate(out.pooled) if part is not None]
            self.embedded += [(rows[i], part) for i, part in enumerate(out.pooled) if part is not None]
            keep = [i for i in range(len(rows)) if i not in embedded]
            if not keep:
                return []
            rows = [rows[i] for i in keep]
            try:
                out = select_prefilled(out, keep)
            except Exception as e:  # their cache could not be copied (out of memory): they fail, the batch goes on
                log.exception("selecting the generation rows of a prefill failed")
                return [(row, e) for row in rows]
        for i, (row, logits) in enumerate(zip(rows, out.logits, strict=True)):
            row.logits = logits
            if out.prompt_logprobs is not None:
                row.prompt_logprobs = out.prompt_logprobs[i] or ()
        self._rows = [*self._rows, *rows]
        try:
            self._batch.add(out.cache, out.mask, out.lengths)
        except Exception as e:  # the batch's cache may be half changed: nothing in it can go on
            log.exception("joining the running batch failed")
            return [(row, e) for row in self.clear()]
        return []
