"""`--time-budget`: the run takes the budget (within 10 %), plans its steps and schedule from the measured step
time, keeps the best checkpoint, and says how it spent the time; `--max-steps` wins over it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from quiver.training.config import DataConfig, MethodConfig, TrainConfig
from quiver.training.time_budget import CALIBRATION_STEPS, lr_factor
from quiver.training.train import train

from .test_train import write_rows

BUDGET_MINUTES = 0.4  # 24 s: tens of tiny-model steps at least, on a loaded machine too


def _data(tmp_path: Path) -> DataConfig:
    return DataConfig(data=(str(write_rows(tmp_path / "train.jsonl", 60)),), input_field="question",
                      output_field="answer", eval_fraction=0.2)


def test_schedules_warm_up_then_decay_to_zero_over_the_planned_steps():
    assert [lr_factor("cosine", s, 100, 4) for s in (0, 3)] == [0.25, 1.0]
    assert lr_factor("cosine", 52, 100, 4) == pytest.approx(0.5)
    assert lr_factor("linear", 100, 100, 4) == 0.0 and lr_factor("cosine", 100, 100, 4) == pytest.approx(0.0)
    assert lr_factor("constant_with_warmup", 50, 100, 4) == 1.0 and lr_factor("constant", 0, 100, 4) == 1.0


def test_a_budgeted_run_fills_its_budget_and_reports_how(base_dir: Path, tmp_path: Path):
    run = TrainConfig(output=str(tmp_path / "out"), model=str(base_dir), time_budget=BUDGET_MINUTES, batch_size=4,
                      log_steps=1, learning_rate=1e-2)
    began = time.monotonic()
    result = train(_data(tmp_path), MethodConfig(method="lora", rank=4, alpha=8), run)
    elapsed = time.monotonic() - began
    budget = BUDGET_MINUTES * 60
    assert 0.9 * budget <= elapsed <= 1.1 * budget, elapsed
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    report = metrics["time_budget"]
    assert report["budget_seconds"] == budget and report["steps"] == result.global_step == metrics["global_step"]
    assert result.global_step > 4 * CALIBRATION_STEPS and report["seconds_per_step"] > 0
    # The plan ends on an evaluation, and the adapter kept is the checkpoint with the lowest eval loss.
    every, evals = report["eval_every"], metrics["eval_loss"]
    assert every >= 1 and len(evals) >= 2 and all(e["step"] % every == 0 for e in evals[:-1])
    assert evals[-1]["step"] == result.global_step  # the last step is evaluated (planned end, or stopped early)
    best = min(evals, key=lambda e: e["loss"])
    assert metrics["best_step"] == best["step"] and metrics["final_eval_loss"] == pytest.approx(best["loss"])
    # The learning rate follows the planned cosine: warm-up, peak, and near zero by the end.
    rates = [e["learning_rate"] for e in _log_history(tmp_path / "out")]
    assert max(rates) == pytest.approx(1e-2, rel=0.05) and rates[-1] < 0.25 * max(rates)


def _log_history(output: Path) -> list[dict[str, float]]:
    """The Trainer's logged entries with a learning rate (the last checkpoint's trainer_state.json)."""
    checkpoints = sorted(output.with_name(output.name + "-checkpoints").glob("checkpoint-*"),
                         key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    return [e for e in state["log_history"] if "learning_rate" in e]


def test_max_steps_wins_over_the_budget(base_dir: Path, tmp_path: Path):
    run = TrainConfig(output=str(tmp_path / "out"), model=str(base_dir), time_budget=5.0, max_steps=3, batch_size=4)
    began = time.monotonic()
    assert train(_data(tmp_path), MethodConfig(method="lora", rank=4), run).global_step == 3
    assert time.monotonic() - began < 60
    assert "time_budget" not in json.loads((tmp_path / "out" / "metrics.json").read_text())


@pytest.mark.parametrize(("settings", "message"), [
    ({"time_budget": 0.0}, "minutes > 0"), ({"time_budget": float("nan")}, "minutes > 0"),
    ({"time_budget": 1.0, "resume": True}, "cannot --resume"),
])
def test_bad_budgets_are_refused(tmp_path: Path, settings: dict[str, object], message: str):
    with pytest.raises(ValueError, match=message):
        TrainConfig(output=str(tmp_path / "out"), **settings)  # type: ignore[arg-type]
