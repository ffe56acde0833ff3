"""The generation engine: owns the model on one thread and decodes every running sequence in one batch.

Iteration-level scheduling as in Orca (Yu et al., OSDI 2022): at every step the engine admits waiting
requests, prefills one group of them (bounded by a token budget, oldest first, so a burst of arrivals stalls
the running sequences by one prefill per step, as TGI's `max_batch_prefill_tokens`; only a failed group's
rows are retried at once, one by one) or one chunk of a prompt longer than the budget, samples one token
for every running sequence, retires finished or cancelled ones at once (with `preempt`, takes out the newest
ones while the key/value cache would outgrow its budget; they resume first, by recomputing) and runs one
batched forward for the rest. Rows of one batch may use different adapters of different kinds (S-LoRA-style
multi-LoRA slots, soft prompts, key/value prefixes) or none; the weights never change between requests.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from typing import Any

import torch

from quiver.common.errors import ResourceExhausted, Unavailable
from quiver.server.adapter_tiers import DeviceAdapters, HostAdapterCache
from quiver.server.batch import DecodeBatch
from quiver.server.cache_budget import CacheBudget
from quiver.server.chunked_prefill import ChunkedPrefill
from quiver.server.config import EngineConfig
from quiver.server.cpu_threads import claim_for_this_thread
from quiver.server.decode_step import decode_step_for
from quiver.server.engine_load import EngineLoad, LoadPublisher
from quiver.server.generation_events import RequestHandle, Sink
from quiver.server.held_model import HeldModel
from quiver.server.logprobs import token_logprobs
from quiver.server.prefill import Prefilled, PrefillRow, oldest_group, prefill
from quiver.server.request_builder import GenerationRequest, virtual_tokens
from quiver.server.sampling import sample_next
from quiver.server.scheduler import Scheduler
from quiver.server.sequence import RequestState
from quiver.server.uploads import select_rows

log = logging.getLogger(__name__)


def _no_lora(seq: RequestState) -> bool:
    """Sort key that puts sequences using a LoRA first (see LoraBatch.rows)."""
    return not seq.uses_lora


class Engine:
    """Runs generation requests on a dedicated thread that alone touches the model."""

    def __init__(self, model: Any, tokenizer: Any, eos_token_ids: frozenset[int], config: EngineConfig) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._eos = eos_token_ids
        self._config = config
        self._device = next(model.parameters()).device
        dtype = model.get_input_embeddings().weight.dtype
        self._held = HeldModel(model, config, dtype)
        try:
            self._setup(config, dtype)
        except BaseException:
            self._held.release()  # the model stays usable by another engine
            raise

    def _setup(self, config: EngineConfig, dtype: torch.dtype) -> None:
        self.lora = self._held.lora
        self.host_adapters = HostAdapterCache(config.max_host_adapter_bytes)
        try:
            self.device_adapters = DeviceAdapters(self.lora, config.max_device_adapter_bytes, self._device, dtype)
        except BaseException:
            self.host_adapters.close()
            raise
        self._scheduler: Scheduler[RequestState] = Scheduler(self.host_adapters, self.device_adapters)
        self._inbox: queue.Queue[RequestState] = queue.Queue()
        self._running: list[RequestState] = []
        self._ready: list[RequestState] = []  # admitted (adapter pinned), waiting for their prefill group
        self._preempted: list[RequestState] = []  # taken out to free cache (`preempt`), oldest first
        self._arrivals = itertools.count()
        self.preemptions = 0  # rows taken out so far
        self._chunked: tuple[RequestState, ChunkedPrefill] | None = None  # a long prompt, prefilled a chunk per step
        self._chunk_turn = False  # while chunking: whether the next step's prefill is the chunk's, not a group's
        step = decode_step_for(self._model, plain=config.plain_decode_step)
        self._batch = DecodeBatch(self._device, config.cache_block_tokens, step)
        self._cache_budget = CacheBudget.of(self._model, config.max_cache_bytes, config.cache_block_tokens, dtype)
        self._wake = threading.Event()
        self._stopping = False
        self._load = LoadPublisher()
        self._thread = threading.Thread(target=self._loop, name="quiver-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish no more work: running and waiting requests get UNAVAILABLE."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        self._fail_all_work()  # a submit that raced the thread's last look still gets its answer
        self.host_adapters.close()
        self._held.release()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def packed_weight_bytes(self) -> int:
        """Memory of the base weights' prepacked copies (server/cpu_linear.py) while the engine holds the model."""
        return self._held.packed_bytes

    @property
    def cache_reserved_bytes(self) -> int:
        """Key/value cache bytes admission holds against `max_cache_bytes` for the batch's rows (running, admitted,
        chunked): at their longest, or with `preempt` after their next token."""
        return self._cache_budget.batch_bytes(self._cache_lengths([]))

    def _cache_lengths(self, extra: list[RequestState]) -> list[int]:
        """What admission counts for each row of the batch and for `extra` rows about to join it: its peak, or
        with `preempt` its length after the next decode step (as `_preempt` counts it)."""
        rows = [*self._batch_rows(), *extra]
        if not self._config.preempt:
            return [row.peak for row in rows]
        running = self._batch.lengths  # the running rows' (the first ones), in their order
        return [*(n + 1 for n in running), *(row.joined_length + 1 for row in rows[len(running):])]

    def _batch_rows(self) -> list[RequestState]:
        """Every row the batch holds or has promised a place: running, admitted, and the one being chunked."""
        chunked = self._chunked  # read once: another thread may ask (cache_reserved_bytes)
        return [*self._running, *self._ready, *([chunked[0]] if chunked is not None else [])]

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def load(self) -> EngineLoad:
        """Adapters of the batch, of waiting requests and on the device, as the engine thread last published them."""
        return self._load.current

    def _publish_load(self, *, force: bool = False) -> None:
        if not self._load.due(force):
            return
        try:
            waiting = [*(w.stored for w in self._scheduler), *(s.request.adapter for s in self._preempted)]
            running = [s.request.adapter for s in self._batch_rows()]
            self._load.publish(running, waiting, self.device_adapters.residents(), self.cache_reserved_bytes)
        except Exception:  # a report, not the engine's work: never let it stop the loop
            log.exception("publishing the engine's load failed")

    @property
    def num_waiting(self) -> int:
        # Admitted ones (`_ready`) hold a batch place; preempted ones wait to resume.
        return self._inbox.qsize() + len(self._scheduler) + len(self._preempted)

    def submit(self, request: GenerationRequest, sink: Sink) -> RequestHandle:
        """Queue `request`; `sink` is called from the engine thread with every event."""
        if self._stopping:
            raise Unavailable("the server is shutting down")
        if self._inbox.qsize() + len(self._scheduler) >= self._config.max_queued:  # preempted ones had started
            raise ResourceExhausted(f"{self._config.max_queued} requests are already waiting")
        self._cache_budget.check_alone(len(request.prompt_ids) + virtual_tokens(request.adapter)
                                       + request.max_new_tokens)
        sequence = RequestState.of(request, sink, self._tokenizer, next(self._arrivals))
        self._inbox.put(sequence)
        self._wake.set()
        return sequence.handle

    # -- engine thread -------------------------------------------------------------------------------

    def _loop(self) -> None:
        claim_for_this_thread(self._config.threads)
        with torch.inference_mode():
            while not self._stopping:
                self._take_inbox()
                self._admit()
                idle = not self._running and not self._ready and self._chunked is None
                self._publish_load(force=idle and not len(self._scheduler))  # at once when the engine goes idle
                if not self._running:
                    if idle:
                        # Nothing to do: sleep until a request arrives (or a cold adapter may have loaded).
                        self._wake.wait(timeout=0.005 if len(self._scheduler) or self._preempted else None)
                        self._wake.clear()
                    continue
                try:
                    self._step()
                except Exception as e:  # a model failure fails the batch, not the server
                    log.exception("engine step failed")
                    self._finish_all(self._running, e)
        self._fail_all_work()

    def _fail_all_work(self) -> None:
        """At shutdown, once the loop has ended: every request the engine holds gets UNAVAILABLE."""
        gone = Unavailable("the server is shutting down")
        chunked = [self._chunked[0]] if self._chunked is not None else []
        for rows in (self._running, self._ready, self._preempted, chunked):
            self._finish_all(rows, gone)
        self._ready, self._preempted, self._chunked = [], [], None
        self._take_inbox()
        for waiting in self._scheduler.take_all():
            waiting.item.fail(gone)

    def _take_inbox(self) -> None:
        while True:
            try:
                seq = self._inbox.get_nowait()
            except queue.Empty:
                return
            self._scheduler.add(seq, seq.request.adapter)

    def _admit(self) -> None:
        """Admit waiting requests while the batch has room and their adapters are on the device; prefill one
        group of the admitted ones, the group holding the oldest, or the next chunk of a long prompt."""
        for gone in self._scheduler.drop(lambda s: s.handle.cancelled):
            if gone.device is not None:
                self.device_adapters.release(gone.device)
        for seq in [*self._ready, *self._preempted]:
            if seq.handle.cancelled:
                self._retire(seq)
        self._ready = [seq for seq in self._ready if not seq.done]
        self._preempted = [seq for seq in self._preempted if not seq.done]
        room = self._config.max_running - len(self._running) - len(self._ready) - (self._chunked is not None)
        resumed: list[RequestState] = []
        while self._preempted and len(resumed) < room and self._fits_cache(self._preempted[0], resumed):
            resumed.append(self._preempted.pop(0))  # oldest first; its adapter is still pinned
        self._ready = [*resumed, *self._ready]  # prefilled ahead of rows admitted later
        room -= len(resumed)
        # While preempted rows wait, nothing new starts (they would starve); failed adapters still answer.
        for entry in self._scheduler.admit(0 if self._preempted else room, self._fits_cache):
            if entry.error is not None:
                entry.item.fail(entry.error)
                continue
            entry.item.adapter = entry.device
            self._ready.append(entry.item)
        self._prefill_next()

    def _fits_cache(self, seq: RequestState, admitted: list[RequestState]) -> bool:
        """Whether the batch still fits the cache budget, as `_cache_lengths` counts it, with `seq` and `admitted`."""
        return self._cache_budget.fits(self._cache_lengths([*admitted, seq]))

    def _prefill_next(self) -> None:
        """This step's one prefill: a group of ready requests, or the next chunk of a long prompt. While a long
        prompt is chunked, ready groups within the budget take every other step, so short requests do not wait
        for the whole long prompt (as Sarathi and vLLM mix chunks with other work)."""
        if self._chunked is not None:
            group = None if self._chunk_turn else self._take_group(fitting=True)
            self._chunk_turn = group is not None
            if group is None:
                self._advance_chunk()
            else:
                self._prefill(group)
            return
        group = self._take_group(fitting=False)
        if group is None:
            return
        budget = self._config.max_prefill_tokens
        if len(group) == 1 and group[0].prefill_length > budget:
            self._start_chunks(group[0], budget)
        else:
            self._prefill(group)

    def _take_group(self, *, fitting: bool) -> list[RequestState] | None:
        """Remove from the ready list the prefill group holding its oldest request (`oldest_group`). A row that
        scores its prompt is prefilled alone when it is the oldest (its forward keeps every position's logits: alone,
        they are its own, at most a prefill budget of them); until then groups form without it."""
        candidates = [i for i, seq in enumerate(self._ready) if not seq.scores_prompt]
        if self._ready and self._ready[0].scores_prompt:
            candidates = [0]
        lengths = [self._ready[i].prefill_length for i in candidates]
        group = oldest_group(lengths, self._config.max_prefill_tokens, fitting=fitting)
        if group is None:
            return None
        taken = {candidates[j] for j in group}
        chosen = [seq for i, seq in enumerate(self._ready) if i in taken]
        self._ready = [seq for i, seq in enumerate(self._ready) if i not in taken]
        return sorted(chosen, key=_no_lora)

    def _start_chunks(self, seq: RequestState, budget: int) -> None:
        try:
            self._chunked = (seq, ChunkedPrefill(self._row(seq), budget))
        except Exception as e:
            log.exception("prefill failed")
            self._finish_all([seq], e)
            return
        self._chunk_turn = False
        self._advance_chunk()

    def _row(self, seq: RequestState) -> PrefillRow:
        # The prompt, and for a preempted row the tokens it generated before (their cache was dropped).
        scored = seq.request.prompt_logprobs if seq.scores_prompt else None
        return PrefillRow(seq.seen[: seq.n_seen].to(self._device, copy=True), seq.adapter, scored)

    def _advance_chunk(self) -> None:
        """Feed the long prompt its next chunk; after the last, it joins the running batch. Never raises."""
        assert self._chunked is not None
        seq, chunked = self._chunked
        if seq.handle.cancelled:
            self._chunked = None
            self._retire(seq)
            return
        try:
            out = chunked.advance(self._model, self.lora)
        except Exception as e:
            log.exception("prefill failed")
            self._chunked = None
            self._finish_all([seq], e)
            return
        if out is not None:
            self._chunked = None
            self._join([seq], out)

    def _prefill(self, seqs: list[RequestState]) -> None:
        """Prefill `seqs` in one forward and add them to the running batch; never raises."""
        try:
            out = prefill(self._model, self.lora, [self._row(seq) for seq in seqs])
        except Exception as e:  # the group fails, the running batch goes on
            if len(seqs) > 1:  # find the row at fault: each alone, so only it fails
                log.warning("prefill of %d rows failed; retrying each alone", len(seqs), exc_info=True)
                for seq in seqs:
                    self._prefill([seq])
                return
            log.exception("prefill failed")
            self._finish_all(seqs, e)
            return
        self._join(seqs, out)

    def _join(self, seqs: list[RequestState], out: Prefilled) -> None:
        """Add prefilled `seqs` to the running batch; never raises."""
        for i, (seq, logits) in enumerate(zip(seqs, out.logits, strict=True)):
            seq.logits = logits
            if out.prompt_logprobs is not None:
                seq.prompt_logprobs = out.prompt_logprobs[i] or ()
        self._running.extend(seqs)
        try:
            self._batch.add(out.cache, out.mask, out.lengths)
            order = sorted(range(len(self._running)), key=lambda i: _no_lora(self._running[i]))
            if order != sorted(order):
                self._batch.keep(order)  # one cache copy per join, so no decode step runs LoRA math for other rows
                self._running = [self._running[i] for i in order]
        except Exception as e:  # the batch's cache may be half changed: nothing in it can go on
            log.exception("joining the running batch failed")
            self._finish_all(self._running, e)

    def _set_lora(self, rows: list[RequestState]) -> None:
        slots = [s.adapter.lora_slot if s.adapter else 0 for s in rows]
        ranks = [s.adapter.rank if s.adapter else 0 for s in rows]
        self.lora.set_batch(slots, ranks)

    def _drop_cancelled(self) -> None:
        alive = [i for i, seq in enumerate(self._running) if not seq.handle.cancelled]
        if len(alive) == len(self._running):
            return
        for seq in self._running:
            if seq.handle.cancelled:
                self._retire(seq)
        self._running = [self._running[i] for i in alive]
        self._batch.keep(alive)

    def _step(self) -> None:
        """Sample one token for every running sequence, emit it, then decode the survivors in one forward."""
        self._drop_cancelled()
        batch = self._running
        if not batch:
            return
        logits = torch.stack([s.logits for s in batch if s.logits is not None])  # (B, V)
        tokens = sample_next(logits, [s.sampler for s in batch], [s.seen[: s.n_seen] for s in batch])
        details = token_logprobs(logits, tokens.clamp(min=0), [s.request.logprobs for s in batch])
        keep = [i for i, (seq, token, detail) in enumerate(zip(batch, tokens.tolist(), details, strict=True))
                if seq.emit(token, detail, self._eos)]
        for i, seq in enumerate(batch):
            if i not in keep:
                self._retire(seq)
        if self._config.preempt:
            keep = self._preempt(batch, keep)
        self._running = [batch[i] for i in keep]
        self._batch.keep(keep)
        if not self._running:
            return
        self._set_lora(self._running)
        next_logits = self._batch.forward(self._model, select_rows(tokens, keep).to(self._device))  # (B', V)
        for seq, row in zip(self._running, next_logits, strict=True):
            seq.logits = row

    def _preempt(self, batch: list[RequestState], keep: list[int]) -> list[int]:
        """Of the rows `keep` of `batch` and the admitted rows not yet prefilled, take out the newest until the
        rest fit the cache budget after this step's forward; returns the rows of `batch` that stay. The others
        drop their cache (admitted ones have none yet) and wait to resume. The row being chunked counts but stays:
        its partial prefill would be lost."""
        chunked = [self._chunked[0]] if self._chunked is not None else []
        rows = [*(batch[i] for i in keep), *self._ready, *chunked]
        lengths = [*(self._batch.lengths[i] + 1 for i in keep), *(r.joined_length + 1 for r in rows[len(keep):])]
        arrivals = [-1 if row in chunked else row.arrival for row in rows]
        out = {rows[j] for j in self._cache_budget.to_preempt(lengths, arrivals)}
        if not out:
            return keep
        for seq in out:
            seq.logits = None
        self._ready = [seq for seq in self._ready if seq not in out]
        self._preempted = sorted([*self._preempted, *out], key=lambda s: s.arrival)
        self.preemptions += len(out)
        log.info("preempted %d sequences to stay within --max-cache-bytes", len(out))
        return [i for i in keep if batch[i] not in out]

    def _retire(self, seq: RequestState) -> None:
        if seq.adapter is not None and not seq.done:
            self.device_adapters.release(seq.adapter)
        seq.done = True

    def _finish_all(self, seqs: list[RequestState], error: BaseException) -> None:
        for seq in seqs:
            seq.fail(error)
            self._retire(seq)
        if seqs is self._running:
            self._running = []
            self._batch.keep([])
