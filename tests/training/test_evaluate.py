"""`quiver eval` on a tiny random Llama with a briefly trained LoRA: the report through a running server and
through the local in-process server, the scoring functions on hand-made strings, and the general-ability set."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from quiver.clients.cli import main
from quiver.clients.client import QuiverClient
from quiver.server.config import AdapterConfig, ModelConfig
from quiver.server.model import model_loader
from quiver.server.model.model_loader import load_base_model
from quiver.training.data import Example, Message
from quiver.training.evaluate import (
    GENERAL_METRIC,
    TEXT_METRICS,
    EvalConfig,
    corpus_bleu,
    evaluate,
    request_pair,
    rouge_f1,
)
from quiver.training.general_set import GENERAL_SET, GeneralItem, accuracy, normalise, passes
from quiver.training.train import train

from ..server_thread import ServerThread
from .test_train import configs, write_rows

TOKEN = "eval-test-token"
NAME = "task"
FIELDS = ["--input-field", "question", "--output-field", "answer"]


@pytest.fixture(scope="module")
def dev_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_rows(tmp_path_factory.mktemp("dev") / "dev.jsonl", 4, start=50)


@pytest.fixture(scope="module")
def adapter_dir(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA trained for a few steps at a high learning rate: far enough to change greedy generations."""
    work = tmp_path_factory.mktemp("train")
    data = write_rows(work / "train.jsonl", 16)
    train(*configs(base_dir, data, work / "adapter", max_steps=4, learning_rate=5e-2))
    return work / "adapter"


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def server(loaded: Any, adapter_dir: Path, store_dir: Path) -> Iterator[ServerThread]:
    """A running server whose store holds the trained adapter as NAME@1."""
    srv = ServerThread(loaded, store_dir, adapter_config=AdapterConfig(store=str(store_dir), admin_token=TOKEN))
    try:
        with QuiverClient(srv.target, timeout=60, admin_token=TOKEN) as client:
            client.register_adapter(adapter_dir, NAME)
        yield srv
    finally:
        srv.close()


def test_report_through_the_server(server: ServerThread, dev_file: Path, tmp_path: Path):
    out = tmp_path / "report.json"
    config = EvalConfig(data=str(dev_file), adapter=NAME, server=server.target, max_new_tokens=6,
                        general_max_new_tokens=4, out=str(out), input_field="question", output_field="answer")
    report = evaluate(config)

    assert report.adapter == f"{NAME}@1" and report.prompt_template == "{input}\n\n"
    assert set(report.base) == set(report.adapted) == {*TEXT_METRICS, GENERAL_METRIC}
    for scores in (report.base, report.adapted):
        assert all(0.0 <= value <= 1.0 for value in scores.values()), scores
    assert report.counts == {"dev_rows": 4, "skipped_rows": 0, "general_items": len(GENERAL_SET)}
    assert [s["base"] for s in report.samples] != [s["adapter"] for s in report.samples]
    assert "Δ" in report.table().splitlines()[0] and len(report.table().splitlines()) == 1 + len(report.base)

    written = json.loads(out.read_text())
    assert set(written["metrics"]) == set(report.base)
    rouge1 = written["metrics"]["rouge1"]
    assert rouge1["delta"] == pytest.approx(rouge1["adapter"] - rouge1["base"])
    assert written["settings"]["max_new_tokens"] == 6 and written["seconds"] > 0
    assert len(written["general"]) == len(GENERAL_SET) and len(written["samples"]) == 4


def test_cli_local_mode_limits_rows(base_dir: Path, server: ServerThread, store_dir: Path, dev_file: Path,
                                    tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch):
    """--model/--store start an in-process server over the store the running server registered NAME in, and
    load its model on one thread, as `quiver serve` does (server/platform/cpu_threads.py)."""
    out = tmp_path / "eval.json"
    args = ["eval", "--data", str(dev_file), "--adapter", f"{NAME}@1", "--model", str(base_dir), "--store",
            str(store_dir), "--limit", "2", "--max-new-tokens", "4", "--no-general", "--out", str(out), *FIELDS]
    loading_threads: list[int] = []

    def load(config: ModelConfig) -> Any:
        loading_threads.append(torch.get_num_threads())
        return load_base_model(config)

    monkeypatch.setattr(model_loader, "load_base_model", load)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # as if this thread had run torch on two threads before
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    assert loading_threads == [1]
    printed = capsys.readouterr().out
    assert "rougeL" in printed and GENERAL_METRIC not in printed
    written = json.loads(out.read_text())
    assert written["counts"]["dev_rows"] == 2 and written["settings"]["server"] == "local"
    assert len(written["samples"]) == 2 and GENERAL_METRIC not in written["metrics"]


def test_cli_evaluates_through_a_tls_server_with_an_api_key(base_dir: Path, adapter_dir: Path, dev_file: Path,
                                                            tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from ..tls_certs import make_pki

    pki = make_pki(tmp_path / "pki")
    store = tmp_path / "store"
    loaded = load_base_model(ModelConfig(model=str(base_dir), device="cpu", quantize="none",
                                         cache_dir=str(tmp_path / "cache")))
    srv = ServerThread(loaded, store, adapter_config=AdapterConfig(store=str(store), admin_token=TOKEN),
                       api_key="k3y", tls_cert=str(pki.server_cert), tls_key=str(pki.server_key))
    try:
        with QuiverClient(srv.target, timeout=60, admin_token=TOKEN, tls_ca=str(pki.ca)) as client:
            client.register_adapter(adapter_dir, NAME)
        common = ["eval", "--data", str(dev_file), "--adapter", NAME, "--server", f"localhost:{srv.running.port}",
                  "--limit", "1", "--max-new-tokens", "2", "--no-general", "--out", str(tmp_path / "e.json"),
                  *FIELDS]
        assert main([*common, "--tls-ca", str(pki.ca), "--api-key", "k3y"]) == 0
        assert json.loads((tmp_path / "e.json").read_text())["counts"]["dev_rows"] == 1
        assert main([*common, "--tls-ca", str(pki.ca)]) == 1  # TLS right, no key
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        assert main([*common, "--tls-ca", str(pki.other_ca), "--api-key", "k3y", "--timeout", "5"]) == 1
        assert "UNAVAILABLE" in capsys.readouterr().err  # a CA that did not sign the server's certificate
    finally:
        srv.close()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "--data is required"),
        (["--data", "d.jsonl"], "--adapter is required"),
        (["--data", "d.jsonl", "--adapter", "a", "--server", "h:1", "--model", "m"], "cannot be combined"),
        (["--data", "d.jsonl", "--adapter", "a", "--limit", "0"], "--limit must be >= 1"),
        (["--data", "d.jsonl", "--adapter", "a", "--input-field", "q"], "given together"),
    ],
)
def test_flag_errors_exit_2(flags: list[str], message: str, capsys: pytest.CaptureFixture[str]):
    assert main(["eval", *flags]) == 2
    assert message in capsys.readouterr().err


def test_scores_of_identical_and_disjoint_strings():
    same = ["the cat sat on the mat today", "a quick brown fox jumps over it"]
    other = ["zebra yellow violin quartz", "mountain river lantern piano"]
    assert rouge_f1(same, same) == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    assert rouge_f1(other, same) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert corpus_bleu(same, same) == pytest.approx(1.0)
    assert corpus_bleu(other, same) == 0.0
    assert rouge_f1(["", "a quick brown fox jumps over it"], same)["rouge1"] == pytest.approx(0.5)


def test_request_pair_templates_only_the_base_side():
    text = Example("w1 w2", "w3", 1, "dev.jsonl")
    assert request_pair(text, "Q: {input}\nA:") == ({"prompt": "w1 w2"}, {"prompt": "Q: w1 w2\nA:"})
    assert request_pair(text, None) == ({"prompt": "w1 w2"}, {"prompt": "w1 w2"})
    chat = Example("hi", "hello", 1, "dev.jsonl", "chat", (Message("system", "s"), Message("user", "hi")))
    adapter, base = request_pair(chat, "<{input}>")
    assert adapter["messages"][-1] == {"role": "user", "content": "hi"}
    assert base["messages"] == [{"role": "system", "content": "s"}, {"role": "user", "content": "<hi>"}]


def test_general_set_is_well_formed():
    prompts = [normalise(item.prompt) for item in GENERAL_SET]
    assert 15 <= len(GENERAL_SET) <= 30 and len(set(prompts)) == len(prompts)
    assert all(item.answers and all(normalise(a) for a in item.answers) for item in GENERAL_SET)
    assert accuracy(GENERAL_SET, [item.answers[0] for item in GENERAL_SET]) == 1.0
    assert accuracy(GENERAL_SET, [""] * len(GENERAL_SET)) == 0.0


@pytest.mark.parametrize(
    ("item", "prediction", "ok"),
    [
        (GeneralItem("q", ("12",)), "The answer is 12.", True),
        (GeneralItem("q", ("4",)), "It is 40", False),
        (GeneralItem("q", ("paris",)), "PARIS, of course", True),
        (GeneralItem("q", ("3.5",)), "about 3.5 metres", True),
        (GeneralItem("q", ("yes",), "starts"), "Yes, it is.", True),
        (GeneralItem("q", ("yes",), "starts"), "No - yes would be wrong", False),
    ],
)
def test_general_rules(item: GeneralItem, prediction: str, ok: bool):
    assert passes(item, prediction) is ok
