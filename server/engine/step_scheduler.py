"""The step scheduler: before every engine step, decides what the step runs and returns it as a plan.

Iteration-level scheduling as in Orca (Yu et al., OSDI 2022). A plan holds:
- the rows decoded (every running row still wanted, fed the token sampled at the previous step);
- the rows preempted (with `preempt`: the newest ones while the key/value cache would outgrow its budget
  after this step's forward; they drop their cache, keep their adapter pinned and resume first, by
  recomputing, before anything new starts);
- the rows admitted (room in the batch, adapter on the device, within the cache budget: admission.py);
- one prefill: the group holding the oldest admitted request (bounded by a token budget, as TGI's
  `max_batch_prefill_tokens`), or the next chunk of a prompt longer than the budget. While a long prompt is
  chunked, ready groups within the budget take every other step, so short requests do not wait for the whole
  long prompt (as Sarathi and vLLM mix chunks with other work).

The scheduler holds the rows that wait (admitted, preempted, chunked); the running rows are the batch's
(`BatchView`, the model runner's). It never touches the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from quiver.server.config import EngineConfig
from quiver.server.engine.adapter_tiers import DeviceAdapters
from quiver.server.engine.admission import AdmissionQueue
from quiver.server.engine.cache_budget import CacheBudget
from quiver.server.engine.prefill import oldest_group
from quiver.server.engine.sequence import RequestState


class BatchView(Protocol):
    """The running batch as the scheduler reads it."""

    @property
    def rows(self) -> Sequence[RequestState]:
        """The running rows, in batch order."""
        ...

    @property
    def lengths(self) -> Sequence[int]:
        """Each running row's cache entries, in batch order."""
        ...


@dataclass(frozen=True)
class StepPlan:
    """What one engine step runs: forwards for `decode`, then for `prefill` or `chunk`."""

    decode: tuple[RequestState, ...] = ()
    """Running rows decoded this step (the batch keeps these, in this order; the others leave it)."""
    prefill: tuple[RequestState, ...] = ()
    """Admitted rows prefilled together in one forward, joining the batch after it."""
    chunk: RequestState | None = None
    """The long prompt fed its next chunk this step (never with `prefill`)."""
    admitted: tuple[RequestState, ...] = ()
    """Rows admitted this step (their adapter is pinned); some may wait for a later step's prefill."""
    preempted: tuple[RequestState, ...] = ()
    """Rows taken out this step: their cache is dropped, they resume before any new request starts."""

    @property
    def idle(self) -> bool:
        return not self.decode and not self.prefill and self.chunk is None


class StepScheduler:
    """Holds waiting, admitted, preempted and chunked rows; `plan` decides each step."""

    def __init__(self, config: EngineConfig, admission: AdmissionQueue[RequestState], device: DeviceAdapters,
                 budget: CacheBudget) -> None:
        self._config = config
        self.admission = admission
        self._device = device
        self.budget = budget
        self.ready: list[RequestState] = []  # admitted (adapter pinned), waiting for their prefill group
        self.preempted: list[RequestState] = []  # taken out to free cache, oldest first
        self.chunked: RequestState | None = None  # a long prompt, prefilled a chunk per step
        self._chunk_turn = False  # while chunking: whether the last prefill was a group's, not the chunk's
        self.preemptions = 0  # rows taken out so far

    def plan(self, batch: BatchView) -> StepPlan:
        """This step's plan; cancelled rows are retired on the way (`retire`)."""
        decode = [row for row in batch.rows if not row.done and not row.handle.cancelled]
        for row in batch.rows:
            if row.handle.cancelled:
                self.retire(row)
        self._drop_cancelled()
        preempted = self._preempt(batch, decode) if self._config.preempt else []
        decode = [row for row in decode if row not in preempted]
        admitted = self._admit(len(decode), batch)
        prefill, chunk = self._next_prefill()
        return StepPlan(tuple(decode), tuple(prefill), chunk, tuple(admitted), tuple(preempted))

    def retire(self, row: RequestState) -> None:
        """The row is finished, failed or cancelled: unpin its adapter (once)."""
        if row.adapter is not None and not row.done:
            self._device.release(row.adapter)
        row.done = True

    def chunk_finished(self) -> None:
        """The chunked row joined the batch or failed: the next long prompt may start."""
        self.chunked = None

    def rows(self, batch: BatchView) -> list[RequestState]:
        """Every row the batch holds or has promised a place: running, admitted, and the one being chunked."""
        chunked = self.chunked  # read once: another thread may ask (cache_reserved_bytes)
        return [*batch.rows, *self.ready, *([chunked] if chunked is not None else [])]

    def free_places(self, batch: BatchView) -> int:
        """Batch places no row holds or has been promised (preempted rows take theirs back first); read from other
        threads too, so an estimate there."""
        held = sum(1 for row in self.rows(batch) if not row.done) + len(self.preempted)
        return max(0, self._config.max_running - held)

    def cache_lengths(self, batch: BatchView, extra: Sequence[RequestState] = ()) -> list[int]:
        """What admission counts for each row of the batch and for `extra` rows about to join it: its peak, or
        with `preempt` its length after the next decode step (as `_preempt` counts it)."""
        rows = [*self.rows(batch), *extra]
        if not self._config.preempt:
            return [row.peak for row in rows]
        running = list(batch.lengths)  # the running rows' (the first ones), in their order
        return [*(n + 1 for n in running), *(row.joined_length + 1 for row in rows[len(running):])]

    def _drop_cancelled(self) -> None:
        for gone in self.admission.drop(lambda s: s.handle.cancelled):
            if gone.device is not None:
                self._device.release(gone.device)
        for row in [*self.ready, *self.preempted]:
            if row.handle.cancelled:
                self.retire(row)
        self.ready = [row for row in self.ready if not row.done]
        self.preempted = [row for row in self.preempted if not row.done]
        if self.chunked is not None and self.chunked.handle.cancelled:
            self.retire(self.chunked)

    def _admit(self, running: int, batch: BatchView) -> list[RequestState]:
        """Resume preempted rows, oldest first, then admit waiting requests while the batch has room and their
        adapters are on the device. While preempted rows wait, nothing new starts (they would starve); requests
        whose adapter failed still get their error."""
        room = self._config.max_running - running - len(self.ready) - (self.chunked is not None)
        resumed: list[RequestState] = []
        while self.preempted and len(resumed) < room and self._fits(batch, self.preempted[0], resumed):
            resumed.append(self.preempted.pop(0))  # its adapter is still pinned
        self.ready = [*resumed, *self.ready]  # prefilled ahead of rows admitted later
        admitted = list(resumed)
        fits = lambda row, others: self._fits(batch, row, others)  # noqa: E731
        for entry in self.admission.admit(0 if self.preempted else room - len(resumed), fits):
            if entry.error is not None:
                entry.item.fail(entry.error)
                continue
            entry.item.adapter = entry.device
            self.ready.append(entry.item)
            admitted.append(entry.item)
        return admitted

    def _fits(self, batch: BatchView, row: RequestState, admitted: list[RequestState]) -> bool:
        """Whether the batch still fits the cache budget, as `cache_lengths` counts it, with `row` and `admitted`."""
        return self.budget.fits(self.cache_lengths(batch, [*admitted, row]))

    def _next_prefill(self) -> tuple[list[RequestState], RequestState | None]:
        """This step's one prefill: (a group, None), or ([], the chunked row) for its next chunk."""
        if self.chunked is not None and not self.chunked.done:
            group = None if self._chunk_turn else self._take_group(fitting=True)
            self._chunk_turn = group is not None
            return (group, None) if group is not None else ([], self.chunked)
        self.chunked = None
        group = self._take_group(fitting=False)
        if group is None:
            return [], None
        if len(group) == 1 and group[0].prefill_length > self._config.max_prefill_tokens:
            self.chunked, self._chunk_turn = group[0], False
            return [], group[0]
        return group, None

    def _take_group(self, *, fitting: bool) -> list[RequestState] | None:
        """Remove from the ready list the prefill group holding its oldest request (`oldest_group`). A row that
        scores its prompt is prefilled alone when it is the oldest (its forward keeps every position's logits:
        alone, they are its own, at most a prefill budget of them); until then groups form without it."""
        candidates = [i for i, row in enumerate(self.ready) if not row.scores_prompt]
        if self.ready and self.ready[0].scores_prompt:
            candidates = [0]
        lengths = [self.ready[i].prefill_length for i in candidates]
        group = oldest_group(lengths, self._config.max_prefill_tokens, fitting=fitting)
        if group is None:
            return None
        taken = {candidates[j] for j in group}
        chosen = [row for i, row in enumerate(self.ready) if i in taken]
        self.ready = [row for i, row in enumerate(self.ready) if i not in taken]
        return chosen

    def _preempt(self, batch: BatchView, decode: list[RequestState]) -> list[RequestState]:
        """Of the `decode` rows and the admitted rows not yet prefilled, take out the newest until the rest fit
        the cache budget after this step's forward; returns the running rows taken out. Admitted ones taken out
        have no cache yet. The row being chunked counts but stays: its partial prefill would be lost."""
        length = dict(zip(map(id, batch.rows), batch.lengths, strict=True))
        chunked = [self.chunked] if self.chunked is not None else []
        rows = [*decode, *self.ready, *chunked]
        lengths = [*(length[id(r)] + 1 for r in decode), *(r.joined_length + 1 for r in rows[len(decode):])]
        arrivals = [-1 if row in chunked else row.arrival for row in rows]
        out = [rows[j] for j in self.budget.to_preempt(lengths, arrivals)]
        if not out:
            return []
        for row in out:
            row.logits = None
        self.ready = [row for row in self.ready if row not in out]
        self.preempted = sorted([*self.preempted, *out], key=lambda s: s.arrival)
        self.preemptions += len(out)
        return [row for row in decode if row in out]
