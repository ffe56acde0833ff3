"""Embeddings and classification through Ray Serve: the replicas run the same prefill-only rows, so the vectors and
probabilities that come back over HTTP and gRPC are transformers / PEFT's."""

from __future__ import annotations

import json

import httpx
import torch
from transformers import AutoTokenizer

from quiver.clients.client import QuiverClient

from ...adapters.adapter_factory import load_peft_classifier, load_peft_model, make_classifier
from .conftest import ADAPTERS, ADMIN, Cluster

TEXTS = ["w1 w2 w3", "w7 w8"]


def close(got: list[float], want: list[float]) -> bool:
    return len(got) == len(want) and all(abs(a - b) < 1e-4 for a, b in zip(got, want, strict=True))


def test_embeddings_and_classification_through_ray(cluster: Cluster):
    tokenizer = AutoTokenizer.from_pretrained(cluster.base_dir)
    adapter = ADAPTERS[0]
    reference = load_peft_model(cluster.base_dir, cluster.base_dir.parent / "made" / adapter)
    want = []
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            states = reference(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
        want.append(torch.nn.functional.normalize(states.mean(dim=0), dim=0).tolist())
    body = {"model": adapter, "input": TEXTS, "encoding_format": "float"}
    http = httpx.post(f"{cluster.http}/v1/embeddings", json=body, timeout=120).raise_for_status().json()
    assert all(close(d["embedding"], w) for d, w in zip(http["data"], want, strict=True))

    # Registered through the HTTP admin route (Ray's gRPC proxy serves GenerationService only), its labels from the
    # adapter's own quiver_adapter.json.
    classifier = make_classifier(cluster.base_dir, cluster.imports / "topics", "lora", num_labels=3)
    (classifier / "quiver_adapter.json").write_text(json.dumps({"labels": ["a", "b", "c"]}))
    load = {"lora_name": "ray-topics", "lora_path": str(classifier)}
    httpx.post(f"{cluster.http}/v1/load_lora_adapter", json=load, headers={"Authorization": f"Bearer {ADMIN}"},
               timeout=120).raise_for_status()
    with QuiverClient(cluster.grpc, timeout=120) as client:
        assert all(close(v, w) for v, w in zip(client.embed(TEXTS, adapter=adapter).vectors, want, strict=True))
        served = client.classify(TEXTS, adapter="ray-topics")
    peft = load_peft_classifier(classifier, 3)
    for text, got in zip(TEXTS, served, strict=True):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            probabilities = peft(input_ids=torch.tensor([ids])).logits[0].softmax(-1).tolist()
        assert list(got.probabilities) == ["a", "b", "c"] and close(list(got.probabilities.values()), probabilities)
