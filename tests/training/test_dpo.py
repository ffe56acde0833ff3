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
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from quiver.clients.cli import main
from quiver.clients.client import QuiverClient
from quiver.common.fingerprint import fingerprint
from quiver.server.config import AdapterConfig
from quiver.training.config import MethodConfig
from quiver.training.dpo import ServedTokensDPOTrainer, _add_dpo_results
from quiver.training.preference_data import PreferenceRow, tokenize_pairs

from ..server_thread import ServerThread
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
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", 40)


@pytest.fixture(scope="module")
def server(loaded: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
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
    found = metrics(output)
    assert [e["step"] for e in found["eval_rewards"]] == [2, 4]
    assert all(0.0 <= e["reward_accuracy"] <= 1.0 and math.isfinite(e["reward_margin"]) for e in found["eval_rewards"])
    kept = next(e for e in found["eval_rewards"] if e["step"] == found["best_step"])  # the kept adapter's
    assert found["kept_step"] == found["best_step"] and found["final_reward_accuracy"] == kept["reward_accuracy"]

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
    start, end = load_file(sft / "adapter_model.safetensors"), load_file(output / "adapter_model.safetensors")
    assert start.keys() == end.keys() and any(not start[k].equal(end[k]) for k in start)
    assert not [p for p in output.iterdir() if p.is_dir()]  # TRL's frozen "ref" copy is not saved beside it
    # The check above is not vacuous: against the base, the SFT adapter's first loss would be far from log 2.
    pair = json.loads(pairs_file.read_text().splitlines()[0])
    margin = (log_likelihood(base_dir, sft, "w210\n\n{input}\n\n", pair, "chosen")
              - log_likelihood(base_dir, None, "w210\n\n{input}\n\n", pair, "chosen")
              - log_likelihood(base_dir, sft, "w210\n\n{input}\n\n", pair, "rejected")
              + log_likelihood(base_dir, None, "w210\n\n{input}\n\n", pair, "rejected"))
    assert abs(-math.log(1 / (1 + math.exp(-0.1 * margin))) - math.log(2)) > 1e-2


def log_likelihood(base_dir: Path, adapter: Path | None, template: str, pair: dict[str, str], answer: str) -> float:
    """log p(answer + EOS | templated prompt) under the base, or the base with `adapter`, in float64."""
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    prompt = tokenizer(template.format(input=pair["prompt"]), add_special_tokens=False)["input_ids"]
    target = [*tokenizer(pair[answer], add_special_tokens=False)["input_ids"], EOS]
    ids = torch.tensor([prompt + target])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].log_softmax(-1)
    return float(logits[torch.arange(len(target)), torch.tensor(target)].sum())


def test_pairs_are_tokenized_as_the_server_tokenizes(base_dir: Path, tmp_path: Path):
    """No BOS even where the tokenizer adds one by default (TRL would), the prompt alone, EOS ids after answers,
    a long prompt cut from the left; the trainer keeps those ids as they are."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(base_dir)
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.pad_token = tokenizer.eos_token
    assert tokenizer("w5")["input_ids"] == [1, 8]  # this tokenizer adds BOS by default
    rows = [PreferenceRow("w5 w6", "w7", "w8 w9"), PreferenceRow(" ".join(f"w{i}" for i in range(3, 20)), "w7", "w8"),
            PreferenceRow("w5", "w7 " * 12, "w8")]
    done = tokenize_pairs(tokenizer, "w200 {input}", rows, max_length=8)
    assert done.dropped == 1 and done.truncated == 1
    assert done.features[0] == {"prompt_ids": [203, 8, 9], "chosen_ids": [10, EOS], "rejected_ids": [11, 12, EOS]}
    assert done.features[1]["prompt_ids"] == [i + 3 for i in range(14, 20)]  # 8 - 2 answer tokens: the prompt's last 6
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import DPOConfig

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    trainer = ServedTokensDPOTrainer(model=model, args=DPOConfig(output_dir=str(tmp_path), report_to="none",
                                                                 use_cpu=True, activation_checkpointing=False),
                                     train_dataset=Dataset.from_list(done.features), processing_class=tokenizer)
    assert [trainer.train_dataset[i]["prompt_ids"] for i in range(2)] == [f["prompt_ids"] for f in done.features]


def test_metrics_report_the_kept_checkpoints_rewards(tmp_path: Path):
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "quiver_adapter.json").write_text("{}")
    history = [{"step": 2, "eval_rewards/accuracies": 0.9, "eval_rewards/margins": 1.5},
               {"step": 4, "eval_rewards/accuracies": 0.6, "eval_rewards/margins": 0.2}]
    _add_dpo_results(tmp_path, history, MethodConfig(method="dpo"), kept_step=2)
    assert metrics(tmp_path)["final_reward_accuracy"] == 0.9 and metrics(tmp_path)["final_reward_margin"] == 1.5


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
    (prompt / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (prompt / "quiver_adapter.json").write_text(json.dumps({"base_fingerprint": "sha256:another-base"}))
    assert main(dpo(base_dir, write_pairs(tmp_path / "p.jsonl", 8), tmp_path / "o3", "--init-adapter",
                    str(prompt), "--max-steps", "1")) == 1
    assert "was trained on base sha256:another-base" in capsys.readouterr().err
    one_prompt = tmp_path / "one.jsonl"
    one_prompt.write_text("".join(json.dumps({"prompt": "w1", "chosen": f"w{i}", "rejected": "w3"}) + "\n"
                                  for i in (4, 5, 6)))
    assert main(dpo(base_dir, one_prompt, tmp_path / "o4", "--max-steps", "1")) == 1
    assert "cannot be split into training and held-out pairs" in capsys.readouterr().err
