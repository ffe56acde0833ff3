"""What a training run leaves beside its adapter: the adapter files (the best checkpoint's or the final ones),
quiver_adapter.json, metrics.json, loss.png; and registering the adapter with a server."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import Trainer

from quiver.adapters.metadata import METADATA_FILE, utc_now
from quiver.training.config import MethodConfig, RegisterConfig, TrainConfig

if TYPE_CHECKING:
    from quiver.training.train import TrainingData

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
LOSS_PLOT = "loss.png"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
REGISTERED_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, METADATA_FILE)
ADMIN_TOKEN_ENV = "QUIVER_ADMIN_TOKEN"  # the same variable `quiver serve` and `quiver adapters` read
REGISTER_MODES = {"create": "create", "new-version": "new_version", "replace": "replace"}


def loss_history(log_history: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """Training and eval loss by optimizer step, from the Trainer's log (which survives resumes)."""
    train = [{"step": e["step"], "loss": e["loss"]} for e in log_history if "loss" in e]
    evaluation = [{"step": e["step"], "loss": e["eval_loss"]} for e in log_history if "eval_loss" in e]
    return {"train_loss": train, "eval_loss": evaluation}


def plot_losses(history: dict[str, list[dict[str, float]]], path: Path, title: str) -> bool:
    """Draw the loss curves into a PNG; False (with a warning) when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure  # the object API: no pyplot state, no GUI backend
    except ImportError:
        log.warning("matplotlib is not installed: no %s (pip install matplotlib)", path.name)
        return False
    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.subplots()
    for key, label, style in (("train_loss", "train", "-"), ("eval_loss", "eval", "o-")):
        points = history[key]
        if points:
            axes.plot([p["step"] for p in points], [p["loss"] for p in points], style, label=label)
    axes.set_title(title)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    return True


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def save_adapter(trainer: Trainer, output: Path, best_checkpoint: str | None) -> None:
    """The adapter into `output`: the best checkpoint's, whose files are `save_pretrained`'s, or the final one."""
    output.mkdir(parents=True, exist_ok=True)
    if best_checkpoint is None:
        peft_model: Any = trainer.model
        peft_model.save_pretrained(str(output))
        return
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.copyfile(Path(best_checkpoint) / name, output / name)
    log.info("kept the adapter of %s (lowest eval loss)", best_checkpoint)


def write_outputs(trainer: Trainer, output: Path, method: MethodConfig, run: TrainConfig, data: TrainingData,
                  base: dict[str, str], history: dict[str, list[dict[str, float]]],
                  final_eval_loss: float | None, seconds: float, extra: dict[str, Any] | None = None) -> None:
    """quiver_adapter.json, metrics.json (with `extra`'s entries) and loss.png beside the saved adapter."""
    state = trainer.state
    write_json(output / METADATA_FILE, {
        "prompt_template": data.template,
        "chat_template": data.chat_template,
        "base_fingerprint": base["fingerprint"],
        "base_model": base["name"],
        "method": method.method,
        "peft_type": json.loads((output / ADAPTER_CONFIG).read_text())["peft_type"],
        "data": data.files,
        "steps": state.global_step,
        "eval_loss": final_eval_loss,
        "seed": run.seed,
        "trained_at": utc_now(),
    })
    write_json(output / METRICS_FILE, {
        **history,
        "final_eval_loss": final_eval_loss,
        "best_step": state.best_global_step,
        "global_step": state.global_step,
        "epochs": state.epoch,
        "train_examples": len(data.train),
        "eval_examples": len(data.eval),
        "seconds": round(seconds, 3),
        **(extra or {}),
    })
    plot_losses(history, output / LOSS_PLOT, f"{method.method} on {base['name']}")
    log.info("adapter written to %s (step %d, eval loss %s)", output, state.global_step, final_eval_loss)


def register_adapter(output: Path, config: RegisterConfig, template: str, labels: tuple[str, ...] = ()) -> Any:
    """Upload the adapter's files (not metrics or plot) to the server named by --register (with a classifier's
    labels)."""
    from quiver.clients.client import QuiverClient

    assert config.register is not None and config.name is not None  # RegisterConfig checked both
    token = config.admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None
    with tempfile.TemporaryDirectory(prefix="quiver-train-upload-") as tmp:
        for name in REGISTERED_FILES:
            shutil.copy2(output / name, Path(tmp) / name)
        with QuiverClient(config.register, admin_token=token) as client:
            info = client.register_adapter(
                tmp, config.name, mode=REGISTER_MODES[config.register_mode],  # type: ignore[arg-type]
                description=config.description, prompt_template=template, labels=labels,
            )
    log.info("registered %s@%d with %s", info.name, info.version, config.register)
    return info
