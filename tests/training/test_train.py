"""`quiver train` on a tiny random Llama: every method trains a few steps, writes an adapter the registry accepts
unchanged, and, registered with a running server through `--register`, generates exactly what PEFT generates
from the same adapter on the template-formatted prompt. Also: resume, early stopping, flag errors, DDP."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from quiver.adapters.base_spec import base_spec_from_checkpoint
from quiver.adapters.metadata import sha256_file
from quiver.adapters.registry import AdapterRegistry, RegistrationOptions
from quiver.adapters.store import LocalAdapterStore
from quiver.adapters.validation import ValidationLimits
from quiver.clients.cli import main
from quiver.clients.client import QuiverClient
from quiver.common.fingerprint import fingerprint
from quiver.server.config import AdapterConfig
from quiver.training.config import DataConfig, MethodConfig, TrainConfig
from quiver.training.train import train

from ..server_thread import ServerThread

TOKEN = "train-test-token"
INSTRUCTION = "w200 w201"  # every prompt starts with it, so the stored template is not the identity
TEMPLATE = "w200 w201\n\n{input}\n\n"
RAW_INPUT = "w7 w8 w9"
MAX_NEW = 6
EOS = 2

# Few steps and a high learning rate: fast, yet far enough from the initialisation to change generations.
METHOD_FLAGS: dict[str, list[str]] = {
    "lora": ["--rank", "4", "--alpha", "8"],
    "qlora": ["--rank", "4", "--alpha", "8", "--gradient-checkpointing"],
    "prompt-tuning": ["--num-virtual-tokens", "4", "--init-text", "w10 w11 w12"],
    "prefix-tuning": ["--num-virtual-tokens", "3", "--prefix-projection", "--prefix-hidden-size", "16"],
}
COMMON_FLAGS = ["--max-steps", "3", "--eval-steps", "2", "--log-steps", "1", "--batch-size", "4",
                "--learning-rate", "5e-2", "--warmup", "0", "--log-level", "WARNING"]


def write_rows(path: Path, count: int, start: int = 0) -> Path:
    """`count` rows of words the tiny tokenizer knows, in user-named fields."""
    with path.open("w") as f:
        for i in range(start, start + count):
            row = {"question": f"w{i} w{i + 1} w{i + 2}", "answer": f"w{i + 3} w{i + 4}"}
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_rows(tmp_path_factory.mktemp("data") / "train.jsonl", 40)


@pytest.fixture(scope="module")
def server(loaded: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    store = tmp_path_factory.mktemp("store")
    srv = ServerThread(loaded, store, adapter_config=AdapterConfig(store=str(store), admin_token=TOKEN))
    yield srv
    srv.close()


def train_args(base_dir: Path, data_file: Path, output: Path, method: str, *extra: str) -> list[str]:
    return ["train", "--model", str(base_dir), "--data", str(data_file), "--output", str(output),
            "--method", method, "--input-field", "question", "--output-field", "answer",
            "--instruction", INSTRUCTION, *METHOD_FLAGS[method], *COMMON_FLAGS, *extra]


def peft_greedy(base_dir: Path, adapter_dir: Path | None, text: str) -> list[int]:
    """The reference: PEFT's own loading of the adapter onto the fp32 base, greedy `generate`."""
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                             do_sample=False, pad_token_id=EOS)
    return strip_eos(out[0, ids.shape[1]:].tolist())


def strip_eos(tokens: list[int]) -> list[int]:
    return tokens[: tokens.index(EOS)] if EOS in tokens else tokens


@pytest.mark.parametrize("method", list(METHOD_FLAGS))
def test_train_register_and_serve_like_peft(
    method: str, base_dir: Path, data_file: Path, server: ServerThread, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
):
    output = tmp_path / "adapter"
    register = ["--register", server.target, "--name", method, "--admin-token", TOKEN]
    assert main(train_args(base_dir, data_file, output, method, *register)) == 0
    assert f"registered: {method}@1" in capsys.readouterr().out

    for name in ("adapter_config.json", "adapter_model.safetensors", "quiver_adapter.json", "metrics.json"):
        assert (output / name).is_file(), name
    assert (output / "loss.png").read_bytes().startswith(b"\x89PNG")
    hints = json.loads((output / "quiver_adapter.json").read_text())
    assert hints["prompt_template"] == TEMPLATE
    assert hints["base_fingerprint"] == fingerprint(base_dir)
    assert hints["method"] == method and hints["steps"] == 3
    assert hints["data"] == [{"role": "train", "path": str(data_file), "sha256": sha256_file(data_file),
                              "weight": 1.0, "rows": 40}]
    metrics = json.loads((output / "metrics.json").read_text())
    assert [p["step"] for p in metrics["train_loss"]] == [1, 2, 3]
    assert [p["step"] for p in metrics["eval_loss"]] == [2, 3]
    assert math.isfinite(metrics["final_eval_loss"]) and metrics["final_eval_loss"] == hints["eval_loss"]
    assert metrics["train_examples"] == 36 and metrics["eval_examples"] == 4

    # The validator accepts the directory as written, template and all.
    registry = AdapterRegistry(LocalAdapterStore(tmp_path / "store"), base_spec_from_checkpoint(base_dir),
                               ValidationLimits())
    stored = registry.register(output, RegistrationOptions(name="local"))
    assert stored.metadata.prompt_template == TEMPLATE

    # Round trip: the server's greedy tokens for the raw input equal PEFT's on the templated prompt.
    with QuiverClient(server.target, timeout=60) as client:
        served = client.generate(RAW_INPUT, adapter=method, max_new_tokens=MAX_NEW)
        plain = client.generate(RAW_INPUT, max_new_tokens=MAX_NEW)
    reference = peft_greedy(base_dir, output, TEMPLATE.format(input=RAW_INPUT))
    assert strip_eos(served.token_ids) == reference
    assert strip_eos(plain.token_ids) == peft_greedy(base_dir, None, RAW_INPUT)
    assert reference != peft_greedy(base_dir, None, TEMPLATE.format(input=RAW_INPUT))  # training changed it


def configs(base_dir: Path, data: Path, output: Path, **run: Any) -> tuple[DataConfig, MethodConfig, TrainConfig]:
    settings: dict[str, Any] = {"max_steps": 2, "eval_steps": 1, "log_steps": 1, "batch_size": 4, "warmup": 0.0,
                                **run}
    return (
        DataConfig(data=(str(data),), input_field="question", output_field="answer"),
        MethodConfig(method="lora", rank=2, alpha=4),
        TrainConfig(output=str(output), model=str(base_dir), **settings),
    )


def test_resume_continues_the_step_count(base_dir: Path, data_file: Path, tmp_path: Path):
    output = tmp_path / "adapter"
    first = train(*configs(base_dir, data_file, output, max_steps=2))
    assert first.global_step == 2 and (tmp_path / "adapter-checkpoints" / "checkpoint-2").is_dir()
    with pytest.raises(ValueError, match="--resume"):
        train(*configs(base_dir, data_file, output, max_steps=4))
    resumed = train(*configs(base_dir, data_file, output, max_steps=4, resume=True))
    assert resumed.global_step == 4
    metrics = json.loads((output / "metrics.json").read_text())
    assert [p["step"] for p in metrics["train_loss"]] == [1, 2, 3, 4]  # the history survives the resume
    assert json.loads((output / "quiver_adapter.json").read_text())["steps"] == 4


def test_early_stopping_keeps_the_best_adapter(base_dir: Path, data_file: Path, tmp_path: Path):
    # A learning rate this large makes the eval loss climb after the first steps.
    result = train(*configs(base_dir, data_file, tmp_path / "adapter", max_steps=30, early_stopping_patience=1,
                            learning_rate=3.0))
    metrics = json.loads((tmp_path / "adapter" / "metrics.json").read_text())
    assert result.global_step < 30
    best = min(metrics["eval_loss"], key=lambda p: p["loss"])
    assert metrics["best_step"] == best["step"]
    assert result.final_eval_loss == pytest.approx(best["loss"], rel=1e-4)


def test_without_eval_data_trains_and_keeps_the_last_adapter(base_dir: Path, data_file: Path, tmp_path: Path):
    data, method, run = configs(base_dir, data_file, tmp_path / "adapter")
    data = DataConfig(data=(f"{data_file}:0.5", str(data_file)), input_field="question", output_field="answer",
                      eval_fraction=0.0)
    result = train(data, method, run)
    metrics = json.loads((tmp_path / "adapter" / "metrics.json").read_text())
    assert result.final_eval_loss is None and metrics["eval_loss"] == []
    assert metrics["train_examples"] == 60  # 20 + 40: the mixture weights


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "--data is required"),
        (["--data", "x.jsonl"], "--output is required"),
        (["--data", "x.jsonl", "--output", "o", "--init-text", "w1"], "--init-text"),
        (["--data", "x.jsonl", "--output", "o", "--register", "localhost:1"], "--register needs --name"),
        (["--data", "x.jsonl", "--output", "o", "--rank", "0"], "--rank"),
        (["--data", "x.jsonl", "--output", "o", "--method", "prefix-tuning", "--gradient-checkpointing"],
         "gradient-checkpointing"),
        (["--data", "x.jsonl", "--output", "o", "--eval-fraction", "0", "--early-stopping-patience", "2"],
         "needs eval data"),
    ],
)
def test_flag_errors_exit_2(flags: list[str], message: str, capsys: pytest.CaptureFixture[str]):
    assert main(["train", *flags]) == 2
    assert message in capsys.readouterr().err


def test_two_processes_under_torchrun(base_dir: Path, data_file: Path, tmp_path: Path):
    """DDP over gloo on CPU: the two processes split the data; only process zero writes and reports."""
    quiver = Path(sys.executable).parent / "quiver"
    assert quiver.exists(), "the quiver console script comes with `pip install -e .`"
    output = tmp_path / "adapter"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(quiver)]
    done = subprocess.run([*launch, *train_args(base_dir, data_file, output, "lora")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("adapter: ") == 1
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["global_step"] == 3
    # 36 training rows, 18 per process, 5 batches of 4 per epoch: 3 steps are 0.6 epochs (one process: 1/3).
    assert metrics["epochs"] == pytest.approx(0.6)
