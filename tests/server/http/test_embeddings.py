"""Embeddings on a real server, over both fronts: the official `openai` client's `embeddings.create` (floats and
its default base64) and gRPC `Embed` give the same vectors as transformers / PEFT's pooled last hidden states for
the base model and each adapter kind, with the adapter's prompt template applied; errors as everywhere else."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
import torch

from quiver.v1 import generation_pb2 as pb
from quiver.v1 import generation_pb2_grpc as pb_grpc

from ...adapters.adapter_factory import load_base, load_peft_model
from ...server_thread import ServerThread
from .conftest import ADMIN, BASE_ID, start

TEXTS = ["w1 w2 w3", "w9 w8", "w4 w4 w4 w4 w5"]
TEMPLATE = "Q: {input}\nA:"


@pytest.fixture(scope="module")
def served(loaded: Any, adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerThread]:
    """The three kinds registered, plus the LoRA again under a prompt template."""
    srv = start(loaded, tmp_path_factory.mktemp("store"), adapter_dirs)
    try:
        from quiver.clients.client import QuiverClient

        with QuiverClient(srv.target, admin_token=ADMIN) as client:
            client.register_adapter(adapter_dirs["lora"], "templated", prompt_template=TEMPLATE)
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="module")
def references(base_dir: Path, adapter_dirs: dict[str, Path]) -> dict[str, Any]:
    models: dict[str, Any] = {BASE_ID: load_base(base_dir)}
    models.update({k: load_peft_model(base_dir, path) for k, path in adapter_dirs.items()})
    models["templated"] = models["lora"]
    return models


def expected(loaded: Any, model: Any, text: str, *, last: bool = False, normalize: bool = True) -> list[float]:
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        states = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0][-len(ids):]
    vector = states[-1] if last else states.mean(dim=0)
    return (torch.nn.functional.normalize(vector, dim=0) if normalize else vector).tolist()


def close(got: list[float], want: list[float]) -> bool:
    return len(got) == len(want) and all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4)
                                         for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("model", [BASE_ID, "lora", "prompt", "prefix", "templated"])
def test_openai_client_embeddings_equal_the_reference(served: ServerThread, loaded: Any, references: dict[str, Any],
                                                      model: str):
    with openai.OpenAI(base_url=f"{served.http}/v1", api_key="unused", max_retries=0) as client:
        floats = client.embeddings.create(model=model, input=TEXTS, encoding_format="float")
        default = client.embeddings.create(model=model, input=TEXTS)  # the client asks for base64 and decodes it
    template = TEMPLATE if model == "templated" else "{input}"
    for reply in (floats, default):
        assert [d.index for d in reply.data] == [0, 1, 2] and reply.model == model
        for text, item in zip(TEXTS, reply.data, strict=True):
            assert close(item.embedding, expected(loaded, references[model], template.format(input=text))), model
    ids = [len(loaded.tokenizer(template.format(input=t), add_special_tokens=False)["input_ids"]) for t in TEXTS]
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == sum(ids)


def test_grpc_embed_pooling_and_normalize(served: ServerThread, loaded: Any, references: dict[str, Any]):
    with grpc.insecure_channel(served.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        request = pb.EmbedRequest(adapter="prefix", inputs=[pb.EmbedInput(text=t) for t in TEXTS],
                                  pooling=pb.POOLING_LAST, normalize=False)
        reply = stub.Embed(request, timeout=30)
        ids = loaded.tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]
        by_ids = stub.Embed(pb.EmbedRequest(inputs=[pb.EmbedInput(tokens=pb.TokenIds(ids=ids))]), timeout=30)
    for text, item in zip(TEXTS, reply.embeddings, strict=True):
        assert close(list(item.values), expected(loaded, references["prefix"], text, last=True, normalize=False))
    assert [e.prompt_tokens for e in reply.embeddings] == [
        len(loaded.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS]
    assert reply.usage.prompt_tokens == sum(e.prompt_tokens for e in reply.embeddings)
    assert close(list(by_ids.embeddings[0].values), expected(loaded, references[BASE_ID], TEXTS[0]))
    assert math.isclose(sum(v * v for v in by_ids.embeddings[0].values), 1.0, rel_tol=1e-5)


def test_errors_are_the_generation_paths(served: ServerThread):
    with grpc.insecure_channel(served.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)

        def code(request: pb.EmbedRequest) -> tuple[grpc.StatusCode, str]:
            with pytest.raises(grpc.RpcError) as failed:
                stub.Embed(request, timeout=30)
            return failed.value.code(), failed.value.details()

        assert code(pb.EmbedRequest(adapter="missing", inputs=[pb.EmbedInput(text="w1")]))[0] \
            == grpc.StatusCode.NOT_FOUND  # fail closed: never the base model's vector
        assert code(pb.EmbedRequest())[0] == grpc.StatusCode.INVALID_ARGUMENT
        status, details = code(pb.EmbedRequest(inputs=[pb.EmbedInput(text="w1"), pb.EmbedInput(text="")]))
        assert status == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("inputs[1]"), details
        status, details = code(pb.EmbedRequest(adapter="templated",
                                               inputs=[pb.EmbedInput(tokens=pb.TokenIds(ids=[5]))]))
        assert status == grpc.StatusCode.INVALID_ARGUMENT and "template" in details
        assert code(pb.EmbedRequest(inputs=[pb.EmbedInput(text="w1")] * 257))[0] == grpc.StatusCode.INVALID_ARGUMENT
    for body, status, param in [
        ({"model": "missing", "input": "w1"}, 404, "model"),
        ({"model": BASE_ID, "input": "w1", "dimensions": 8}, 400, "dimensions"),
        ({"model": BASE_ID, "input": "w1", "pooling": "max"}, 400, "pooling"),
        ({"model": BASE_ID, "input": ["w1", ""]}, 400, "input[1]"),
        ({"model": BASE_ID, "input": [999_999]}, 400, "input"),
    ]:
        reply = httpx.post(f"{served.http}/v1/embeddings", json=body, timeout=30)
        assert reply.status_code == status, (body, reply.text)
        assert reply.json()["error"]["param"] == param, (body, reply.text)


def test_python_clients_and_the_cli(served: ServerThread, loaded: Any, references: dict[str, Any],
                                    capsys: pytest.CaptureFixture[str]):
    import asyncio
    import json

    from quiver.clients.aio import AsyncQuiverClient
    from quiver.clients.cli import main
    from quiver.clients.client import QuiverClient
    from quiver.clients.errors import QuiverRpcError

    want = [expected(loaded, references["prompt"], t) for t in TEXTS]
    with QuiverClient(served.target, timeout=30) as client:
        done = client.embed(TEXTS, adapter="prompt")
        one = client.embed(TEXTS[0], adapter="prompt", pooling="last", normalize=False)
        with pytest.raises(QuiverRpcError) as failed:
            client.embed("w1", adapter="missing")
        assert failed.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(ValueError, match="pooling"):
            client.embed("w1", pooling="max")  # type: ignore[arg-type]
    assert all(close(got, w) for got, w in zip(done.vectors, want, strict=True))
    assert close(one.vectors[0], expected(loaded, references["prompt"], TEXTS[0], last=True, normalize=False))

    async def embed_async() -> list[list[float]]:
        async with AsyncQuiverClient(served.target, timeout=30) as client:
            return (await client.embed(TEXTS, adapter="prompt")).vectors

    assert all(close(got, w) for got, w in zip(asyncio.run(embed_async()), want, strict=True))

    assert main(["embed", "--server", served.target, "--adapter", "prompt", *TEXTS]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2]
    assert all(close(line["embedding"], w) for line, w in zip(lines, want, strict=True))
    assert main(["embed", "--server", served.target, "--adapter", "missing", "w1"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_embedding_rows_count_in_the_prompt_token_metrics(served: ServerThread, loaded: Any):
    from .test_operations_metrics import samples

    def counted() -> float:  # 0 before the first lora request of this server
        return sum(s.value for s in samples(served)
                   if s.name == "quiver_prompt_tokens_total" and s.labels.get("kind") == "lora")

    before = counted()
    with openai.OpenAI(base_url=f"{served.http}/v1", api_key="unused", max_retries=0) as client:
        reply = client.embeddings.create(model="lora", input=TEXTS, encoding_format="float")
    assert counted() - before == reply.usage.prompt_tokens > 0
