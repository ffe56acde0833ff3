"""The generation engine: owns the model on one thread and runs every request in one continuously batched loop.

Each step reads as four lines (`Engine.step`): the step scheduler plans (rows decoded, admitted, preempted,
the prefill group or chunk: step_scheduler.py), the model runner runs the plan's forwards (model_runner.py),
then one token is sampled for every running row and emitted. Rows of one batch may use different adapters of
different kinds (multi-LoRA slots, soft prompts, key/value prefixes) or none; the weights never change
between requests. docs/engine.md draws one step.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from typing import Any

import torch

from quiver.common.errors import ResourceExhausted, Unavailable
from quiver.server.config import EngineConfig
from quiver.server.engine.adapter_tiers import DeviceAdapters, HostAdapterCache
from quiver.server.engine.admission import AdmissionQueue
from quiver.server.engine.cache_budget import CacheBudget
from quiver.server.engine.engine_load import EngineLoad, LoadPublisher
from quiver.server.engine.generation_events import RequestHandle, Sink
from quiver.server.engine.held_model import HeldModel
from quiver.server.engine.logprobs import token_logprobs
from quiver.server.engine.model_runner import ModelRunner
from quiver.server.engine.observer import EngineObserver
from quiver.server.engine.request import GenerationRequest, virtual_tokens
from quiver.server.engine.sampling import sample_next
from quiver.server.engine.sequence import RequestState
from quiver.server.engine.step_scheduler import StepPlan, StepScheduler
from quiver.server.platform.base import platform_for

log = logging.getLogger(__name__)


class Engine:
    """Runs generation requests on a dedicated thread that alone touches the model."""

    def __init__(self, model: Any, tokenizer: Any, eos_token_ids: frozenset[int], config: EngineConfig,
                 observer: EngineObserver | None = None) -> None:
        self._model = model
        self._observer = observer or EngineObserver()
        self._tokenizer = tokenizer
        self._eos = eos_token_ids
        self._config = config
        self._device = next(model.parameters()).device
        self._platform = platform_for(self._device)
        log.info("platform: %s", self._platform.name)
        dtype = model.get_input_embeddings().weight.dtype
        self._held = HeldModel(model, config, dtype, self._platform)
        try:
            self._setup(config, dtype)
        except BaseException:
            self._held.release()  # the model stays usable by another engine
            raise

    def _setup(self, config: EngineConfig, dtype: torch.dtype) -> None:
        self.lora = self._held.lora
        self.host_adapters = HostAdapterCache(config.max_host_adapter_bytes, observer=self._observer)
        try:
            self.device_adapters = DeviceAdapters(self.lora, config.max_device_adapter_bytes, self._device, dtype,
                                                  self._observer)
        except BaseException:
            self.host_adapters.close()
            raise
        self._admission: AdmissionQueue[RequestState] = AdmissionQueue(self.host_adapters, self.device_adapters)
        budget = CacheBudget.of(self._model, config.max_cache_bytes, config.cache_block_tokens, dtype)
        self._scheduler = StepScheduler(config, self._admission, self.device_adapters, budget)
        self._runner = ModelRunner(self._model, self.lora, config, self._device, self._platform, self._observer)
        self._tokens: torch.Tensor | None = None  # (B,) sampled at the last step for the runner's rows
        self._inbox: queue.Queue[RequestState] = queue.Queue()
        self._arrivals = itertools.count()
        self._wake = threading.Event()
        self._stopping = False
        self.failure: BaseException | None = None
        """What ended the engine thread, if it died rather than being stopped (every call then gets UNAVAILABLE)."""
        self._last_step = time.monotonic()  # when the engine thread last ended a step, or idle, got work
        self._step_since: float | None = None  # when the step under way (with work) started
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
        """Memory of the platform's copies of the base weights (server/platform/) while the engine holds the model."""
        return self._held.packed_bytes

    @property
    def cache_reserved_bytes(self) -> int:
        """Key/value cache bytes admission holds against `max_cache_bytes` for the batch's rows (running, admitted,
        chunked): at their longest, or with `preempt` after their next token."""
        return self._scheduler.budget.batch_bytes(self._scheduler.cache_lengths(self._runner))

    @property
    def preemptions(self) -> int:
        """Rows taken out so far to stay within `max_cache_bytes` (`preempt`)."""
        return self._scheduler.preemptions

    @property
    def num_running(self) -> int:
        """Rows of the batch still generating (a finished row leaves the batch at the next step)."""
        return sum(1 for row in self._runner.rows if not row.done)

    @property
    def load(self) -> EngineLoad:
        """Adapters of the batch, of waiting requests and on the device, as the engine thread last published them."""
        return self._load.current

    def _publish_load(self, *, force: bool = False) -> None:
        if not self._load.due(force):
            return
        try:
            waiting = [*(w.stored for w in self._admission), *(s.request.adapter for s in self._scheduler.preempted)]
            running = [s.request.adapter for s in self._scheduler.rows(self._runner)]
            self._load.publish(running, waiting, self.device_adapters.residents(), self.cache_reserved_bytes)
        except Exception:  # a report, not the engine's work: never let it stop the loop
            log.exception("publishing the engine's load failed")

    @property
    def num_waiting(self) -> int:
        # Admitted ones (`ready`) hold a batch place; preempted ones wait to resume.
        return self._inbox.qsize() + len(self._admission) + len(self._scheduler.preempted)

    def check_queue(self) -> None:
        """ResourceExhausted when `max_queued` requests already wait (preempted ones do not count: they started). A
        request that will find a free batch place does not wait: a burst into an idle engine fills its batch places
        and then its queue, whatever order the engine thread takes them in."""
        waiting = self._inbox.qsize() + len(self._admission) - self._scheduler.free_places(self._runner)
        if waiting >= self._config.max_queued:
            raise ResourceExhausted(f"{self._config.max_queued} requests are already waiting")

    def submit(self, request: GenerationRequest, sink: Sink) -> RequestHandle:
        """Queue `request`; `sink` is called from the engine thread with every event."""
        if self._stopping:
            raise Unavailable("the server is shutting down" if self.failure is None else
                              "the engine stopped after an internal error; the server is restarting")
        self.check_queue()
        self._scheduler.budget.check_alone(len(request.prompt_ids) + virtual_tokens(request.adapter)
                                       + request.max_new_tokens)
        sequence = RequestState.of(request, sink, self._tokenizer, next(self._arrivals))
        if not (self.num_running or self.num_waiting):  # an idle engine's last step is old: its clock starts now
            self._last_step = time.monotonic()
        self._inbox.put(sequence)
        self._wake.set()
        return sequence.handle

    # -- engine thread -------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._platform.enter_engine_thread(self._config)
            with torch.inference_mode():
                while not self._stopping:
                    self.step()
                    self._last_step = time.monotonic()
        except BaseException as e:  # a bug outside a forward: the engine cannot go on, and says so at once
            log.critical("the engine thread died", exc_info=e)
            self.failure = e
            self._stopping = True
        self._fail_all_work()

    def stalled_seconds(self) -> float:
        """How long the step under way has run, or work has waited without a step ending; 0 while idle."""
        now = time.monotonic()
        since = self._step_since
        if since is not None:
            return now - since
        if not (self.num_running or self.num_waiting):
            return 0.0
        return max(0.0, now - self._last_step)

    def fail_pending(self) -> None:
        """After the thread died: answer what reached the inbox after its last look (from another thread)."""
        if not self._thread.is_alive():
            self._fail_all_work()

    def step(self, *, block: bool = True) -> StepPlan:
        """One engine step: plan, run the forwards, sample and emit a token for every running row. With nothing
        to run, waits for a request (`block`) or for a cold adapter's load."""
        self._take_inbox()
        plan = self._scheduler.plan(self._runner)
        self._publish_load(force=plan.idle and not len(self._admission))  # at once when the engine goes idle
        if plan.idle and not self._runner.rows:  # (rows that finished or were cancelled leave in `_run`)
            if block:
                waiting = len(self._admission) or self._scheduler.preempted
                self._wake.wait(timeout=0.005 if waiting else None)
                self._wake.clear()
            return plan
        self._step_since = time.monotonic()
        try:
            self._run(plan)
            self._sample_and_emit()
        except Exception as e:  # a model failure fails the batch, not the server
            log.exception("engine step failed")
            self._finish_all(self._runner.clear(), e)
            self._answer_embedded()  # rows prefilled before the failure still get their vectors
        finally:
            self._step_since = None
        return plan

    def _run(self, plan: StepPlan) -> None:
        if plan.preempted:
            log.info("preempted %d sequences to stay within --max-cache-bytes", len(plan.preempted))
        outcome = self._runner.run(plan, self._tokens)
        for row, error in outcome.failed:
            self._finish_all([row], error)
        self._answer_embedded()
        if outcome.chunk_ended:
            self._scheduler.chunk_finished()

    def _answer_embedded(self) -> None:
        """Prefill-only rows are answered right after their prefill (they never join the batch); each is retired
        whatever happens to the others."""
        embedded, self._runner.embedded = self._runner.embedded, []
        for row, part in embedded:
            try:
                if not row.done:
                    row.emit_embedding(part)
            except Exception as e:  # e.g. the device failed reading the vector back: this row fails, not the rest
                log.exception("answering an embedding row failed")
                row.fail(e)
            finally:
                self._scheduler.retire(row)

    def _sample_and_emit(self) -> None:
        """Sample one token for every running row, emit it; finished rows retire (they leave at the next step)."""
        rows = self._runner.rows
        self._tokens = None
        if not rows:
            return
        logits = torch.stack([row.logits for row in rows if row.logits is not None])  # (B, V)
        tokens = sample_next(logits, [row.sampler for row in rows], [row.seen[: row.n_seen] for row in rows],
                             rows_per_draw=self._platform.sampler_rows_per_draw)
        details = token_logprobs(logits, tokens.clamp(min=0), [row.request.logprobs for row in rows])
        for row, token, detail in zip(rows, tokens.tolist(), details, strict=True):
            if not row.emit(token, detail, self._eos):
                self._scheduler.retire(row)
        self._tokens = tokens

    def _fail_all_work(self) -> None:
        """At shutdown, once the loop has ended: every request the engine holds gets UNAVAILABLE."""
        gone = Unavailable("the server is shutting down" if self.failure is None else
                           "the engine stopped after an internal error; the server is restarting")
        scheduler = self._scheduler
        chunked = [scheduler.chunked] if scheduler.chunked is not None else []
        embedded = [row for row, _ in self._runner.embedded]
        self._runner.embedded = []
        for rows in (self._runner.clear(), scheduler.ready, scheduler.preempted, chunked, embedded):
            self._finish_all(rows, gone)
        scheduler.ready, scheduler.preempted, scheduler.chunked = [], [], None
        self._take_inbox()
        for waiting in self._admission.take_all():
            waiting.item.fail(gone)

    def _take_inbox(self) -> None:
        while True:
            try:
                row = self._inbox.get_nowait()
            except queue.Empty:
                return
            self._admission.add(row, row.request.adapter)

    def _finish_all(self, rows: list[RequestState], error: BaseException) -> None:
        for row in rows:
            if not row.done:
                row.fail(error)
            self._scheduler.retire(row)
