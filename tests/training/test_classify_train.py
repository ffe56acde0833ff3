"""`quiver train --task classify` on a tiny random Llama: each method (head, lora, prompt-tuning) writes a SEQ_CLS
adapter with its labels, metrics (accuracy, macro-F1) and loss curve; the head method leaves the body as the base's
and learns an easy task; the result registers with a real server (`--register`), which classifies as PEFT does."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from quiver.clients.cli import main
from quiver.clients.client import QuiverClient
from quiver.server.config import AdapterConfig
from quiver.training.classify_data import accuracy_and_macro_f1, classification_template
from quiver.training.config import DataConfig, MethodConfig, RegisterConfig, TrainConfig
from quiver.training.train import train

from ..adapters.adapter_factory import load_peft_classifier
from ..server_thread import ServerThread

TOKEN = "classify-token"
LABELS = ("even", "odd")  # "even" is the more frequent: the head's first output


def write_labeled(path: Path, count: int) -> Path:
    """An easy task: the label is the parity of the first word's number (every text starts with its own word)."""
    with path.open("w") as f:
        for i in range(count):
            first = 2 * (i % 20) + (0 if i % 5 else 1)  # 4 in 5 even
            f.write(json.dumps({"text": f"w{first} w{i % 7} w{(3 * i) % 11}",
                                "topic": "odd" if first % 2 else "even"}) + "\n")
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_labeled(tmp_path_factory.mktemp("data") / "train.jsonl", 100)


def configs(base_dir: Path, data: Path, output: Path, method: str, **run: Any
            ) -> tuple[DataConfig, MethodConfig, TrainConfig]:
    settings: dict[str, Any] = {"max_steps": 4, "eval_steps": 2, "log_steps": 1, "batch_size": 8, "warmup": 0.0,
                                **run}
    return (DataConfig(data=(str(data),), task="classify", input_field="text", label_field="topic",
                       eval_fraction=0.2),
            MethodConfig(method=method, rank=2, alpha=4, num_virtual_tokens=4),  # type: ignore[arg-type]
            TrainConfig(output=str(output), model=str(base_dir), **settings))


@pytest.mark.parametrize("method", ["head", "lora", "prompt-tuning"])
def test_each_method_writes_a_servable_classifier(base_dir: Path, data_file: Path, tmp_path: Path, method: str):
    output = tmp_path / method
    result = train(*configs(base_dir, data_file, output, method))
    assert result.global_step == 4
    own = json.loads((output / "quiver_adapter.json").read_text())
    assert own["labels"] == list(LABELS) and own["task"] == "classify" and own["prompt_template"] == "{input}"
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"
    metrics = json.loads((output / "metrics.json").read_text())
    assert [e["step"] for e in metrics["eval_scores"]] == [2, 4]
    assert 0 <= metrics["final_accuracy"] <= 1 and 0 <= metrics["final_macro_f1"] <= 1
    assert (output / "loss.png").stat().st_size > 0
    weights = load_file(str(output / "adapter_model.safetensors"))
    heads = [k for k in weights if k.endswith("score.weight")]
    assert len(heads) == 1 and weights[heads[0]].shape == (2, 64)
    if method == "head":  # only the head trained: the LoRA it is saved with is PEFT's identity
        assert all(not v.any() for k, v in weights.items() if "lora_B" in k)


def test_the_head_learns_an_easy_task(base_dir: Path, data_file: Path, tmp_path: Path):
    output = tmp_path / "head"
    train(*configs(base_dir, data_file, output, "head", max_steps=60, eval_steps=20, learning_rate=3e-2))
    metrics = json.loads((output / "metrics.json").read_text())
    first, last = metrics["eval_scores"][0], metrics["eval_scores"][-1]
    assert metrics["train_loss"][-1]["loss"] < metrics["train_loss"][0]["loss"]
    assert last["accuracy"] >= 0.8 and last["accuracy"] >= first["accuracy"], metrics["eval_scores"]


@pytest.fixture(scope="module")
def server(loaded: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, Any]]:
    """A server over the tiny base (and the model it holds, whose tokenizer the tests use)."""
    root = tmp_path_factory.mktemp("served")
    srv = ServerThread(loaded, root / "store", adapter_config=AdapterConfig(store=str(root / "store"),
                                                                            admin_token=TOKEN))
    yield srv, loaded
    srv.close()


def test_register_and_classify_through_the_server(server: tuple[ServerThread, Any], base_dir: Path, data_file: Path,
                                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    srv, loaded = server
    output = tmp_path / "lora"
    data, method, run = configs(base_dir, data_file, output, "lora")
    result = train(data, method, run, RegisterConfig(register=srv.target, name="parity", admin_token=TOKEN))
    assert result.registered is not None and result.registered.labels == LABELS
    texts = ["w4 w1 w2", "w7 w3 w3"]
    with QuiverClient(srv.target, timeout=60) as client:
        served = client.classify(texts, adapter="parity")
    reference = load_peft_classifier(output, len(LABELS))
    for text, got in zip(texts, served, strict=True):
        ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            want = reference(input_ids=torch.tensor([ids])).logits[0].softmax(-1).tolist()
        assert list(got.probabilities) == list(LABELS)
        assert all(abs(a - b) < 1e-4 for a, b in zip(got.probabilities.values(), want, strict=True))
    assert main(["classify", "--server", srv.target, "--adapter", "parity", texts[0]]) == 0
    printed = capsys.readouterr().out.splitlines()[-1]  # after the Trainer's own lines
    assert json.loads(printed)["label"] == served[0].label


@pytest.mark.parametrize(("flags", "message"), [
    (["--task", "classify", "--input-field", "text"], "--label-field"),
    (["--label-field", "topic", "--input-field", "text", "--output-field", "x"], "--task classify only"),
    (["--task", "classify", "--input-field", "text", "--label-field", "topic", "--method", "prefix-tuning"],
     "head, lora or prompt-tuning"),
    (["--method", "head", "--input-field", "text", "--output-field", "topic"], "--task classify"),
])
def test_cli_refuses_what_cannot_work(base_dir: Path, data_file: Path, tmp_path: Path, flags: list[str],
                                      message: str, capsys: pytest.CaptureFixture[str]):
    code = main(["train", "--data", str(data_file), "--model", str(base_dir), "--output", str(tmp_path / "o"),
                 "--max-steps", "1", *flags])
    assert code != 0 and message in capsys.readouterr().err


def test_scores_and_templates():
    assert accuracy_and_macro_f1([0, 0, 1, 1], [0, 1, 1, 1], 2) == {"accuracy": 0.75,
                                                                    "macro_f1": pytest.approx((2 / 3 + 0.8) / 2)}
    assert classification_template(None) == "{input}"
    assert classification_template("Topic {of} this:").format(input="x") == "Topic {of} this:\n\nx"


def test_eval_reports_the_classifier_against_a_baseline(server: tuple[ServerThread, Any], base_dir: Path,
                                                         data_file: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]):
    srv, _ = server
    for method, steps in (("head", 60), ("lora", 2)):
        data, method_config, run = configs(base_dir, data_file, tmp_path / method, method, max_steps=steps,
                                           eval_steps=steps, learning_rate=3e-2 if method == "head" else None)
        train(data, method_config, run, RegisterConfig(register=srv.target, name=method, admin_token=TOKEN))
    out = tmp_path / "eval.json"
    args = ["eval", "--task", "classify", "--data", str(data_file), "--input-field", "text", "--label-field",
            "topic", "--server", srv.target, "--out", str(out)]
    assert main([*args, "--adapter", "head"]) == 0
    report = json.loads(out.read_text())
    majority = report["metrics"]["accuracy"]["base"]
    assert majority == pytest.approx(0.8)  # 4 in 5 rows are "even", the adapter's first label
    assert report["metrics"]["accuracy"]["adapter"] >= 0.8 and report["counts"]["dev_rows"] == 100
    assert "baseline" in capsys.readouterr().out.splitlines()[-len(report["metrics"]) - 2]
    assert main([*args, "--adapter", "lora", "--baseline", "head"]) == 0
    report = json.loads(out.read_text())
    assert report["metrics"]["accuracy"]["base"] >= 0.8  # the head classifier, as the baseline now
    assert report["settings"]["baseline"] == "head" and len(report["samples"]) == 5
    assert main([*args, "--adapter", "missing"]) == 1
