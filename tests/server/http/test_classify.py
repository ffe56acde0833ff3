"""Classification adapters on a real server: registered with their labels over gRPC, they classify over gRPC
(`Classify`), HTTP (`POST /v1/classify`, vLLM's shape), both Python clients and `quiver classify`, with PEFT's
probabilities; a generation adapter or the base model cannot classify, and a classifier cannot generate."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import torch

from quiver.clients.aio import AsyncQuiverClient
from quiver.clients.cli import main
from quiver.clients.client import QuiverClient
from quiver.clients.errors import QuiverRpcError

from ...adapters.adapter_factory import load_peft_classifier, make_classifier
from ...server_thread import ServerThread
from .conftest import ADMIN, BASE_ID, start

LABELS = ("billing", "travel", "health")
TEXTS = ["w1 w2 w3", "w9 w8", "w4 w4 w5"]
TEMPLATE = "Topic of: {input}"


@pytest.fixture(scope="module")
def classifiers(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("classifiers")
    return {m: make_classifier(base_dir, out / m, m, num_labels=len(LABELS), seed=i)
            for i, m in enumerate(("lora", "prompt"))}


@pytest.fixture(scope="module")
def served(loaded: Any, adapter_dirs: dict[str, Path], classifiers: dict[str, Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    srv = start(loaded, tmp_path_factory.mktemp("store"), adapter_dirs)
    try:
        with QuiverClient(srv.target, admin_token=ADMIN) as client:
            info = client.register_adapter(classifiers["lora"], "topics", labels=LABELS, prompt_template=TEMPLATE)
            assert info.labels == LABELS
            assert client.register_adapter(classifiers["prompt"], "topics-prompt").labels == (
                "LABEL_0", "LABEL_1", "LABEL_2")  # none given: transformers' defaults
        yield srv
    finally:
        srv.close()


def expected(loaded: Any, adapter_dir: Path, text: str) -> list[float]:
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = load_peft_classifier(adapter_dir, len(LABELS))(input_ids=torch.tensor([ids])).logits[0]
    return logits.softmax(dim=-1).tolist()


def close(got: list[float], want: list[float]) -> bool:
    return len(got) == len(want) and all(abs(a - b) < 1e-4 for a, b in zip(got, want, strict=True))


def test_every_front_gives_pefts_probabilities(served: ServerThread, loaded: Any, classifiers: dict[str, Path],
                                               capsys: pytest.CaptureFixture[str]):
    want = [expected(loaded, classifiers["lora"], TEMPLATE.format(input=t)) for t in TEXTS]
    with QuiverClient(served.target, timeout=30) as client:
        results = client.classify(TEXTS, adapter="topics")
        assert client.get_adapter("topics").adapter.labels == LABELS
    assert [list(r.probabilities) for r in results] == [list(LABELS)] * 3
    assert all(close(list(r.probabilities.values()), w) for r, w in zip(results, want, strict=True))
    assert [r.label for r in results] == [LABELS[max(range(3), key=w.__getitem__)] for w in want]

    async def aio() -> list[Any]:
        async with AsyncQuiverClient(served.target, timeout=30) as client:
            return await client.classify(TEXTS, adapter="topics")

    assert [r.probabilities for r in asyncio.run(aio())] == [r.probabilities for r in results]

    reply = httpx.post(f"{served.http}/v1/classify", json={"model": "topics", "input": TEXTS}, timeout=30).json()
    assert [d["index"] for d in reply["data"]] == [0, 1, 2] and reply["model"] == "topics"
    assert all(close(d["probs"], w) and d["num_classes"] == 3 for d, w in zip(reply["data"], want, strict=True))
    assert [d["label"] for d in reply["data"]] == [r.label for r in results]
    assert reply["usage"]["prompt_tokens"] == sum(r.prompt_tokens for r in results)
    listed = httpx.get(f"{served.http}/v1/models/topics", timeout=30).json()
    assert listed["labels"] == list(LABELS)

    assert main(["classify", "--server", served.target, "--adapter", "topics", *TEXTS]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["label"] for line in lines] == [r.label for r in results]

    prompt_want = expected(loaded, classifiers["prompt"], TEXTS[0])
    with QuiverClient(served.target, timeout=30) as client:
        got = client.classify(TEXTS[0], adapter="topics-prompt")[0]
    assert close(list(got.probabilities.values()), prompt_want)


def test_tasks_are_kept_apart(served: ServerThread):
    with QuiverClient(served.target, timeout=30) as client:
        for adapter, call in [("lora", "classify"), ("topics", "generate"), ("missing", "classify")]:
            with pytest.raises(QuiverRpcError) as failed:
                if call == "classify":
                    client.classify("w1", adapter=adapter)
                else:
                    client.generate("w1", adapter=adapter, max_new_tokens=2)
            expected_code = grpc.StatusCode.NOT_FOUND if adapter == "missing" else grpc.StatusCode.FAILED_PRECONDITION
            assert failed.value.code == expected_code, (adapter, call, failed.value)
        assert len(client.embed("w1", adapter="topics").vectors[0]) == 64  # a classifier's body still embeds
        with pytest.raises(ValueError, match="adapter"):
            client.classify("w1", adapter="")
    reply = httpx.post(f"{served.http}/v1/classify", json={"model": BASE_ID, "input": "w1"}, timeout=30)
    assert reply.status_code == 400 and "classification" in reply.json()["error"]["message"]


def test_labels_are_validated_at_registration(served: ServerThread, classifiers: dict[str, Path],
                                              adapter_dirs: dict[str, Path]):
    with QuiverClient(served.target, admin_token=ADMIN) as client:
        for directory, labels, problem in [
            (classifiers["lora"], ("a", "b"), "2 labels given for a head of 3 outputs"),
            (classifiers["lora"], ("a", "a", "b"), "distinct"),
            (adapter_dirs["lora"], ("a", "b", "c"), "labels are for a classification"),
        ]:
            with pytest.raises(QuiverRpcError) as failed:
                client.register_adapter(directory, "refused", labels=labels)
            assert problem in str(failed.value), failed.value
