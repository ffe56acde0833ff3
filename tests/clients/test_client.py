"""QuiverClient's generation, model-info, embedding and classification calls against a real Quiver server (the tiny
served model): results checked against transformers/PEFT or against each other (streamed vs unary), error statuses,
deadlines, and that closing a stream early stops the server's work."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from transformers import AutoTokenizer

from quiver.clients import GenerationChunk, QuiverClient, QuiverRpcError

from ..adapters.adapter_factory import load_base, load_peft_classifier, load_peft_model
from ..server_thread import ServerThread, wait_for
from .conftest import CLASSIFIER, LABELS, LONG, busy, calls_ended, unused_target

PROMPT = "w1 w2 w3"


@pytest.fixture
def client(server: ServerThread) -> Iterator[QuiverClient]:
    with QuiverClient(server.target, timeout=60) as c:
        yield c


def reference_greedy(model: Any, tokenizer: Any, prompt: str, n: int) -> list[int]:
    """transformers' greedy continuation of `prompt`: the tokens after it, at most `n`."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return [int(t) for t in out[0, ids.shape[1]:]]


# --- results ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ["", "lora"])
def test_generate_is_greedy_transformers(client: QuiverClient, served_base_dir: Path,
                                         served_adapter_dirs: dict[str, Path], adapter: str) -> None:
    """Temperature 0 gives transformers' (with PEFT's LoRA: the adapter is applied) greedy tokens and their text."""
    model = load_peft_model(served_base_dir, served_adapter_dirs[adapter]) if adapter else load_base(served_base_dir)
    tokenizer = AutoTokenizer.from_pretrained(served_base_dir)
    expected = reference_greedy(model, tokenizer, PROMPT, 8)
    got = client.generate(PROMPT, adapter=adapter, max_new_tokens=8, temperature=0)
    assert got.token_ids == expected
    assert got.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert (got.prompt_tokens, got.completion_tokens) == (3, len(expected))
    assert got.finish_reason == ("length" if len(expected) == 8 else "eos_token")


@pytest.mark.parametrize("adapter", ["", "lora", "prompt", "prefix"])
def test_stream_chunks_add_up_to_generate(client: QuiverClient, adapter: str) -> None:
    whole = client.generate(PROMPT, adapter=adapter, max_new_tokens=6, temperature=0)
    chunks = list(client.generate_stream(PROMPT, adapter=adapter, max_new_tokens=6, temperature=0))
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids
    *body, last = chunks
    assert all(c.finish_reason is None and c.prompt_tokens is None and c.completion_tokens is None for c in body)
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == (
        whole.finish_reason, whole.prompt_tokens, whole.completion_tokens)


def test_adapters_change_the_completion(client: QuiverClient) -> None:
    """The adapter name crosses the wire: each random adapter steers the tiny model elsewhere."""
    texts = {a: client.generate(PROMPT, adapter=a, max_new_tokens=8, temperature=0).token_ids
             for a in ("", "lora", "prompt", "prefix", "lora@1")}
    assert texts["lora@1"] == texts["lora"]
    assert len({tuple(texts[a]) for a in ("", "lora", "prompt", "prefix")}) == 4


@pytest.mark.parametrize("method", ["generate", "generate_stream"])
def test_stop_sequence_cuts_before_it(client: QuiverClient, method: str) -> None:
    full = client.generate(PROMPT, max_new_tokens=6, temperature=0).text
    stop = f" {full.split()[2]}"  # the third generated word: the text ends before its first occurrence
    if method == "generate":
        got = client.generate(PROMPT, max_new_tokens=6, temperature=0, stop=[" w999", stop])
        text, reason = got.text, got.finish_reason
    else:
        chunks = list(client.generate_stream(PROMPT, max_new_tokens=6, temperature=0, stop=[" w999", stop]))
        text, reason = "".join(c.text for c in chunks), chunks[-1].finish_reason
    assert (text, reason) == (full[: full.index(stop)], "stop_sequence")
    assert 0 < len(text) < len(full)


def test_sampling_options_arrive(client: QuiverClient) -> None:
    """temperature, top_k, top_p and seed arrive: one seed repeats its sample, another seed gives another one."""
    options: dict[str, Any] = {"max_new_tokens": 12, "temperature": 5.0, "top_k": 0, "top_p": 1.0}
    first = client.generate(PROMPT, seed=7, **options)
    assert client.generate(PROMPT, seed=7, **options).token_ids == first.token_ids
    assert client.generate(PROMPT, seed=8, **options).token_ids != first.token_ids
    assert client.generate(PROMPT, seed=7, **{**options, "top_k": 1}).token_ids == client.generate(
        PROMPT, max_new_tokens=12, temperature=0).token_ids  # top_k=1 is greedy whatever the temperature


def test_repetition_penalty_arrives(client: QuiverClient) -> None:
    """The base model's greedy text repeats a word; a strong penalty on repeats changes it."""
    greedy = client.generate(PROMPT, max_new_tokens=6, temperature=0).token_ids
    assert len(set(greedy)) < len(greedy)
    penalized = client.generate(PROMPT, max_new_tokens=6, temperature=0, repetition_penalty=5.0).token_ids
    assert len(set(penalized)) > len(set(greedy))


@pytest.mark.parametrize("n", [0, 3])
def test_logprobs_per_token(client: QuiverClient, n: int) -> None:
    whole = client.generate(PROMPT, max_new_tokens=5, temperature=0, logprobs=n)
    chunks = list(client.generate_stream(PROMPT, max_new_tokens=5, temperature=0, logprobs=n))
    assert [e.token_id for e in whole.logprobs] == whole.token_ids
    assert [e for c in chunks for e in c.logprobs] == whole.logprobs
    for entry in whole.logprobs:
        assert len(entry.top) == n and entry.logprob <= 0
        if n:  # greedy: the chosen token is the most likely one
            assert entry.top[0] == (entry.token_id, pytest.approx(entry.logprob))
            assert [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top), reverse=True)
    assert client.generate(PROMPT, max_new_tokens=5).logprobs == []


def test_chat_messages_go_through_the_chat_template(client: QuiverClient) -> None:
    """The tiny model's template joins the contents, each followed by a space."""
    messages = [{"role": "system", "content": "w1"}, {"role": "user", "content": "w2 w3"}]
    chat = client.generate(messages=messages, max_new_tokens=5, temperature=0)
    raw = client.generate("w1 w2 w3 ", max_new_tokens=5, temperature=0)
    assert (chat.token_ids, chat.prompt_tokens) == (raw.token_ids, raw.prompt_tokens)


def test_model_info_describes_the_loaded_model(client: QuiverClient, served_loaded: Any) -> None:
    info = client.model_info()
    config = served_loaded.model.config
    assert (info.fingerprint, info.architecture) == (served_loaded.info.fingerprint, config.architectures[0])
    assert (info.context_length, info.device, info.quantization) == (config.max_position_embeddings, "cpu", "none")
    assert info.resident_bytes >= sum(p.numel() * p.element_size() for p in served_loaded.model.parameters())
    assert info.has_chat_template and info.max_new_tokens_limit > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.dtype = "changed"  # type: ignore[misc]


def test_embed_equals_transformers_mean_pooled_last_hidden_states(client: QuiverClient, served_base_dir: Path
                                                                  ) -> None:
    tokenizer = AutoTokenizer.from_pretrained(served_base_dir)
    model = load_base(served_base_dir)
    texts = ["w1 w2 w3", "w7"]
    got = client.embed([*texts, [4, 5, 6]])
    assert got.prompt_tokens == [3, 1, 3]
    for text, vector in zip(texts, got.vectors, strict=False):
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            pooled = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].mean(0)
        torch.testing.assert_close(torch.tensor(vector), pooled / pooled.norm(), rtol=1e-4, atol=1e-4)
    assert got.vectors[2] == pytest.approx(got.vectors[0], abs=1e-5)  # "w1 w2 w3" is ids 4, 5, 6
    raw = client.embed("w7", pooling="last", normalize=False).vectors[0]  # one token: last == mean, unscaled
    assert math.hypot(*raw) != pytest.approx(1.0)
    assert [x / math.hypot(*raw) for x in raw] == pytest.approx(got.vectors[1], abs=1e-5)


def test_classify_equals_peft(client: QuiverClient, classifier_dir: Path, served_base_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(served_base_dir)
    model = load_peft_classifier(classifier_dir, len(LABELS))
    results = client.classify(["w1 w2 w3", "w9 w8"], adapter=CLASSIFIER)
    for text, result in zip(["w1 w2 w3", "w9 w8"], results, strict=True):
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            expected = model(input_ids=ids).logits[0].softmax(-1).tolist()
        assert list(result.probabilities) == list(LABELS)
        assert list(result.probabilities.values()) == pytest.approx(expected, abs=1e-4)
        assert result.label == LABELS[max(range(len(LABELS)), key=expected.__getitem__)]
        assert result.prompt_tokens == len(ids[0])


# --- errors -------------------------------------------------------------------------------------------

ERROR_CASES = [
    ({"adapter": "nope"}, grpc.StatusCode.NOT_FOUND, "adapter nope not found"),
    ({"adapter": "lora@9"}, grpc.StatusCode.NOT_FOUND, "adapter lora@9 not found"),
    ({"max_new_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "stopping.max_new_tokens: must be in [1, "),
    ({"prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT, "text: must not be empty"),
    ({"prompt": None, "messages": []}, grpc.StatusCode.INVALID_ARGUMENT, "chat.messages: must hold at least one"),
]


@pytest.mark.parametrize(("kwargs", "code", "details"), ERROR_CASES)
@pytest.mark.parametrize("method", ["generate", "generate_stream"])
def test_server_errors_become_quiver_rpc_errors(client: QuiverClient, method: str, kwargs: dict[str, Any],
                                                code: grpc.StatusCode, details: str) -> None:
    with pytest.raises(QuiverRpcError) as error:
        if method == "generate":
            client.generate(**{"prompt": PROMPT, **kwargs})
        else:
            list(client.generate_stream(**{"prompt": PROMPT, **kwargs}))
    assert error.value.code == code and error.value.details.startswith(details)
    assert str(error.value) == f"{code.name}: {error.value.details}"
    assert isinstance(error.value.__cause__, grpc.RpcError)


@pytest.mark.parametrize(("method", "kwargs", "code"), [
    ("embed", {"inputs": "w1", "adapter": "nope"}, grpc.StatusCode.NOT_FOUND),
    ("classify", {"inputs": "w1", "adapter": "nope"}, grpc.StatusCode.NOT_FOUND),
    ("classify", {"inputs": "w1", "adapter": "lora"}, grpc.StatusCode.FAILED_PRECONDITION),  # not a classifier
])
def test_embed_and_classify_errors(client: QuiverClient, method: str, kwargs: dict[str, Any],
                                   code: grpc.StatusCode) -> None:
    with pytest.raises(QuiverRpcError) as error:
        getattr(client, method)(**kwargs)
    assert error.value.code == code


@pytest.mark.parametrize("method", ["generate", "generate_stream"])
def test_deadline_exceeded_ends_the_server_work(server: ServerThread, method: str) -> None:
    with QuiverClient(server.target, timeout=0.3) as c, pytest.raises(QuiverRpcError) as error:
        if method == "generate":
            c.generate(PROMPT, max_new_tokens=LONG, ignore_eos=True)
        else:
            list(c.generate_stream(PROMPT, max_new_tokens=LONG, ignore_eos=True))
    assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: busy(server) == 0, timeout=2)  # long before the 2,000 tokens would be done


@pytest.mark.parametrize("method", ["generate", "model_info"])
def test_unreachable_server_is_unavailable(method: str) -> None:
    with QuiverClient(unused_target(), timeout=10) as c, pytest.raises(QuiverRpcError) as error:
        c.generate(PROMPT) if method == "generate" else c.model_info()
    assert error.value.code == grpc.StatusCode.UNAVAILABLE


# --- streams and cancellation ------------------------------------------------------------------------


def long_stream(client: QuiverClient) -> Generator[GenerationChunk, None, None]:
    return client.generate_stream(PROMPT, max_new_tokens=LONG, ignore_eos=True)


def test_stream_starts_the_call_on_first_next(client: QuiverClient, server: ServerThread) -> None:
    stream = long_stream(client)
    assert not wait_for(lambda: busy(server) > 0, timeout=0.3)
    assert next(stream).token_ids
    assert busy(server) == 1
    stream.close()
    assert wait_for(lambda: busy(server) == 0, timeout=5)


def test_closing_a_stream_cancels_the_call(client: QuiverClient, server: ServerThread) -> None:
    """A 2,000-token generation takes seconds; `close()` must free the server's row at once."""
    cancelled = calls_ended(server, "GenerateStream", "CANCELLED")
    stream = long_stream(client)
    next(stream)
    assert busy(server) == 1
    stream.close()
    assert wait_for(lambda: busy(server) == 0, timeout=1)
    assert wait_for(lambda: calls_ended(server, "GenerateStream", "CANCELLED") == cancelled + 1, timeout=5)


def test_leaving_a_stream_loop_early_cancels_the_call(client: QuiverClient, server: ServerThread) -> None:
    for chunk in long_stream(client):
        assert chunk.token_ids and busy(server) == 1
        break
    assert wait_for(lambda: busy(server) == 0, timeout=1)


def test_a_finished_stream_is_not_cancelled(client: QuiverClient, server: ServerThread) -> None:
    ok, cancelled = calls_ended(server, "GenerateStream", "OK"), calls_ended(server, "GenerateStream", "CANCELLED")
    stream = client.generate_stream(PROMPT, max_new_tokens=3)
    assert [c.finish_reason for c in stream][-1] == "length"
    stream.close()
    assert wait_for(lambda: calls_ended(server, "GenerateStream", "OK") == ok + 1)
    assert calls_ended(server, "GenerateStream", "CANCELLED") == cancelled
