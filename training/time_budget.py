"""Training within a time budget (`--time-budget MINUTES`): the step count and the learning-rate schedule follow
from the machine's measured step time instead of from --epochs.

How the budget is spent (all of it counted from the start of `train`, so loading the model and the data is in it):
1. The Trainer starts with an upper bound of steps (it stops when told) and a learning-rate schedule that reads
   its length from a `BudgetPlan`.
2. After CALIBRATION_STEPS optimizer steps, `TimeBudget` measures the seconds per step (the first step, which
   pays for warm-up allocations, is left out), estimates what each evaluation and checkpoint will cost, and plans
   the step count that ends with the final save inside the budget, with EVALUATIONS evaluations spread over it
   and one at the last step, so that it can be the one kept (the best by held-out loss is kept, as without a
   budget). At each evaluation the plan is made again from the rates measured so far.
3. Every step checks that one more step (and its evaluation) still fits, and stops early otherwise: the plan may
   be wrong, the budget holds regardless.
The report (metrics.json's "time_budget") says how the seconds went.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from transformers import TrainerCallback

CALIBRATION_STEPS = 4
"""Optimizer steps timed before the plan is made (the first is not counted)."""
EVALUATIONS = 4
"""Held-out evaluations (each with a checkpoint) across the planned steps; the last is at the final step."""
UNPLANNED_STEPS = 10**9
"""The Trainer's step bound until the plan replaces it (never reached)."""
FINAL_SECONDS = 1.0
"""Reserved for what follows the last step: copying the kept adapter, metrics.json, loss.png."""


def lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """The learning rate's multiplier at optimizer `step` (0-based) of `total`, after `warmup` linear steps; the
    schedules are transformers' of the same names."""
    if step < warmup and schedule != "constant":
        return (step + 1) / warmup
    if schedule in ("constant", "constant_with_warmup"):
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


@dataclass
class BudgetPlan:
    """The plan and the report of a budgeted run (the schedule reads `total` and `warmup` while training)."""

    budget_seconds: float
    schedule: str
    warmup_setting: float
    """--warmup: a fraction of the planned steps if < 1, else a number of steps."""
    total: int | None = None
    """Planned optimizer steps; None until calibrated."""
    warmup: int = CALIBRATION_STEPS
    eval_every: int | None = None
    seconds_per_step: float | None = None
    seconds_per_evaluation: float | None = None
    seconds_before_training: float | None = None
    stopped_early_at: int | None = None
    evaluation_seconds: list[float] = field(default_factory=list)

    def factor(self, step: int) -> float:
        """The learning-rate multiplier at `step`: a warmup over the calibration steps until the plan exists."""
        if self.total is None:
            return min(1.0, (step + 1) / CALIBRATION_STEPS)
        return lr_factor(self.schedule, step, self.total, self.warmup)

    def report(self, used_seconds: float, steps: int) -> dict[str, Any]:
        """What metrics.json records under "time_budget"."""
        return {**asdict(self), "used_seconds": round(used_seconds, 3), "steps": steps,
                "calibration_steps": CALIBRATION_STEPS}


class TimeBudget(TrainerCallback):
    """Plans the steps after calibration and again at each evaluation (from the rate measured so far), and stops
    training when one more step would overrun the budget."""

    def __init__(self, plan: BudgetPlan, started: float, eval_batches: int, evaluates: bool) -> None:
        self.plan = plan
        self.deadline = started + plan.budget_seconds
        self.started = started
        self.eval_batches = eval_batches
        self.evaluates = evaluates
        self._step_began = 0.0
        self._step_ended: float | None = None
        self._evaluated = False
        self._step_seconds: list[float] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The Trainer's schedule (built for the step bound) is replaced by the plan's, from the first step on."""
        self.plan.seconds_before_training = round(time.monotonic() - self.started, 3)
        scheduler, optimizer = kwargs["lr_scheduler"], kwargs["optimizer"]
        scheduler.lr_lambdas = [self.plan.factor] * len(optimizer.param_groups)
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base * self.plan.factor(0)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        now = time.monotonic()
        if self._step_ended is not None and self._evaluated:
            self.plan.evaluation_seconds.append(round(now - self._step_ended, 3))  # evaluation + checkpoint
        self._step_began = now

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        now = time.monotonic()
        self._step_seconds.append(now - self._step_began)
        self._step_ended = now
        calibrated = self.plan.total is None and state.global_step >= CALIBRATION_STEPS
        if calibrated or (self.plan.total is not None and control.should_evaluate):
            self._plan(state, now)
        if state.global_step == self.plan.total:  # the planned end: evaluated, so it can be the one kept
            control.should_evaluate = control.should_save = self.evaluates
        cost = self._evaluation_cost() if self.evaluates else 0.0
        # Going on means this step's own evaluation (if one is due), one more step, that step's evaluation as the
        # last one, and the final save; stopping here needs only this step's evaluation and the save.
        due = cost if control.should_evaluate else 0.0
        if self.plan.total is not None and now + due + self._rate() + cost + FINAL_SECONDS > self.deadline:
            # One more step (and its evaluation) would overrun: this step is the last, evaluated and saved.
            if state.global_step < self.plan.total:
                self.plan.stopped_early_at = state.global_step
            control.should_training_stop = True
            control.should_evaluate = control.should_save = self.evaluates
        self._evaluated = bool(control.should_evaluate or control.should_save)

    def _rate(self) -> float:
        timed = self._step_seconds[1:] or self._step_seconds  # the first step pays for warm-up
        return sum(timed[-50:]) / len(timed[-50:])

    def _evaluation_cost(self) -> float:
        if self.plan.evaluation_seconds:
            return max(self.plan.evaluation_seconds[-3:])
        # Before one is measured: a forward pass is about a third of a training step, per batch; plus the save.
        return self._rate() * self.eval_batches / 3 + 0.5

    def _plan(self, state: Any, now: float) -> None:
        """The step count that fills the time left: n steps at the measured rate, with an evaluation every
        `eval_every` steps and one at the final step (each at its measured cost), then the final save."""
        plan, rate = self.plan, self._rate()
        cost = self._evaluation_cost() if self.evaluates else 0.0
        left = self.deadline - now - FINAL_SECONDS
        if plan.eval_every is None:  # first plan: the interval that gives EVALUATIONS evaluations
            plan.eval_every = max(1, int((left - EVALUATIONS * cost) / rate) // EVALUATIONS)
        steps = max(1, int((left - cost) / (rate + cost / plan.eval_every)))
        plan.total = state.global_step + steps
        plan.seconds_per_step, plan.seconds_per_evaluation = round(rate, 4), round(cost, 3)
        setting = plan.warmup_setting
        plan.warmup = max(CALIBRATION_STEPS, int(setting * plan.total) if setting < 1 else int(setting))
        state.max_steps = plan.total
        state.eval_steps = state.save_steps = plan.eval_every
