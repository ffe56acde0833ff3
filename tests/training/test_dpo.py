"""`quiver train --method dpo` on a tiny random Llama: the adapter registers and serves exactly as PEFT runs it,
the DPO loss falls on a learnable preference, --init-adapter is both the start and the reference, QLoRA works,
and flag errors exit 2."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from quiver.clients.cli import main
from quiver.clients.client import QuiverClient
from quiver.common.fingerprint import fingerprint
from quiver.server.config import AdapterConfig, ModelConfig

from ..conftest import write_tiny_checkpoint
from ..server.conftest import ServerThread
from .test_train import EOS, MAX_NEW, TOKEN, peft_greedy, strip_eos, write_rows

INSTRUCTION = "w200 w201"
TEMPLATE = "w200 w201\n\n{input}\n\n"
FLAGS = ["--rank", "4", "--alpha", "8", "--warmup", "0", "--log-steps", "1", "--batch-size", "4",
         "--log-level", "WARNING"]


def write_pairs(path: Path, count: int) -> Path:
    """A learnable preference: after any prompt, `w10 w11` is preferred to `w20 w21`."""
    with path.open("w") as f:
        for i in range(count):
            f.write(json.dumps({"prompt": f"w{30 + i} w{31 + i} w{32 + i}", "chosen": "w10 w11",
                                "rejected": "w20 w21"}) + "\n")
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("base") / "tiny", initializer_range=0.2)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", 40)


@pytest.fixture(scope="module")
def server(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    from quiver.server.model.model_loader import load_base_model

    loaded = load_base_model(ModelConfig(model=str(base_dir), device="cpu", quantize="none",
                                         cache_dir=str(tmp_path_factory.mktemp("cache"))))
    store = tmp_path_factory.mktemp("store")
    srv = ServerThread(loaded, store, adapter_config=AdapterConfig(store=str(store), admin_token=TOKEN), http_port=0)
    yield srv
    srv.close()


def dpo(base_dir: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(base_dir), "--data", str(data), "--output", str(output), "--method", "dpo",
            *FLAGS, *extra]


def metrics(output: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((output / "metrics.json").read_text())
    return loaded


def test_dpo_adapter_registers_and_serves_like_peft(base_dir: Path, pairs_file: Path, server: ServerThread,
                                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    output = tmp_path / "dpo"
    flags = ["--instruction", INSTRUCTION, "--max-steps", "4", "--eval-steps", "2", "--learning-rate", "5e-2",
             "--register", server.target, "--name", "prefers", "--admin-token", TOKEN]
    assert main(dpo(base_dir, pairs_file, output, *flags)) == 0
    assert "registered: prefers@1" in capsys.readouterr().out
    hints = json.loads((output / "quiver_adapter.json").read_text())
    assert hints["method"] == "dpo" and hints["peft_type"] == "LORA" and hints["prompt_template"] == TEMPLATE
    assert hints["base_fingerprint"] == fingerprint(base_dir)
    assert hints["dpo"] == {"beta": 0.1, "adapter": "lora", "sft_weight": 0.0, "init_adapter": None}
    assert (output / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in output.iterdir() if p.is_dir()) == []  # no reference copy beside the adapter
    found = metrics(output)
    assert [e["step"] for e in found["eval_rewards"]] == [2, 4]
    assert all(0.0 <= e["reward_accuracy"] <= 1.0 and math.isfinite(e["reward_margin"]) for e in found["eval_rewards"])
    assert found["final_reward_accuracy"] == found["eval_rewards"][-1]["reward_accuracy"]

    raw = "w40 w41 w42"
    with QuiverClient(server.target, timeout=60) as client:
        served = client.generate(raw, adapter="prefers", max_new_tokens=MAX_NEW)
    reference = peft_greedy(base_dir, output, TEMPLATE.format(input=raw))
    assert strip_eos(served.token_ids) == reference
    assert reference != peft_greedy(base_dir, None, TEMPLATE.format(input=raw))  # training changed the policy


def test_dpo_loss_falls_on_a_learnable_preference(base_dir: Path, pairs_file: Path, tmp_path: Path):
    output = tmp_path / "dpo"
    assert main(dpo(base_dir, pairs_file, output, "--max-steps", "20", "--eval-steps", "20", "--learning-rate",
                    "1e-2")) == 0
    losses = [p["loss"] for p in metrics(output)["train_loss"]]
    assert len(losses) == 20
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3)  # the policy starts equal to the reference
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]
    assert metrics(output)["final_reward_accuracy"] == 1.0 and metrics(output)["final_reward_margin"] > 0


def test_init_adapter_is_the_start_and_the_reference(base_dir: Path, pairs_file: Path, tmp_path: Path):
    sft = tmp_path / "sft"
    assert main(["train", "--model", str(base_dir), "--data", str(write_rows(tmp_path / "sft.jsonl", 24)),
                 "--output", str(sft), "--input-field", "question", "--output-field", "answer", "--instruction",
                 "w210", "--max-steps", "3", "--learning-rate", "5e-2", *FLAGS]) == 0
    output = tmp_path / "dpo"
    assert main(dpo(base_dir, pairs_file, output, "--init-adapter", str(sft), "--max-steps", "3", "--eval-steps",
                    "3", "--learning-rate", "1e-2")) == 0
    hints = json.loads((output / "quiver_adapter.json").read_text())
    assert hints["prompt_template"] == "w210\n\n{input}\n\n"  # the SFT adapter's template, not a new one
    assert hints["dpo"]["init_adapter"] == str(sft)
    # Against the base the SFT adapter's first DPO loss would not be log 2: the reference is the SFT adapter.
    assert metrics(output)["train_loss"][0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    from safetensors.torch import load_file

    start, end = load_file(sft / "adapter_model.safetensors"), load_file(output / "adapter_model.safetensors")
    assert start.keys() == end.keys() and any(not start[k].equal(end[k]) for k in start)


def test_qlora_policy_with_the_sft_term(base_dir: Path, pairs_file: Path, tmp_path: Path):
    output = tmp_path / "dpo"
    assert main(dpo(base_dir, pairs_file, output, "--dpo-adapter", "qlora", "--sft-weight", "1", "--max-steps", "2",
                    "--eval-fraction", "0")) == 0
    assert json.loads((output / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert json.loads((output / "quiver_adapter.json").read_text())["dpo"]["adapter"] == "qlora"
    # With the SFT term the first loss is log 2 plus the chosen answers' negative log-likelihood per token.
    assert metrics(output)["train_loss"][0]["loss"] > math.log(2) + 1


@pytest.mark.parametrize(("flags", "message"), [
    (["--method", "lora", "--beta", "0.5"], "apply to --method dpo only"),
    (["--method", "dpo", "--beta", "0"], "--beta must be"),
    (["--method", "lora", "--init-adapter", "x"], "apply to --method dpo only"),
    (["--method", "dpo", "--sft-weight", "-1"], "--sft-weight must be"),
])
def test_flag_errors_exit_2(flags: list[str], message: str, capsys: pytest.CaptureFixture[str]):
    assert main(["train", "--data", "x.jsonl", "--output", "o", *flags]) == 2
    assert message in capsys.readouterr().err


def test_bad_preference_rows_and_init_adapters_are_refused(base_dir: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "w1", "chosen": "w2", "rejected": "w2"}) + "\n" +
                   json.dumps({"prompt": "w1", "chosen": "w2"}) + "\n")
    assert main(dpo(base_dir, bad, tmp_path / "o", "--max-steps", "1")) == 1
    err = capsys.readouterr().err
    assert "no usable preference row" in err and "chosen equals rejected" in err
    prompt = tmp_path / "prompt"
    prompt.mkdir()
    (prompt / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    assert main(dpo(base_dir, write_pairs(tmp_path / "p.jsonl", 8), tmp_path / "o2", "--init-adapter",
                    str(prompt), "--max-steps", "1")) == 2
    assert "must be a LoRA adapter" in capsys.readouterr().err
    assert EOS == 2  # the tiny tokenizer's </s>, which DPO appends to both answers
