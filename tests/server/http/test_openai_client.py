"""The official `openai` client (sync and async) against a real Quiver server on loopback: every reply equals
what gRPC gives for the same request, for the base model and an adapter of each kind, alone and 32 mixed."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest

from quiver.clients.aio import AsyncQuiverClient
from quiver.clients.client import QuiverClient

from ...server_thread import ServerThread
from .conftest import ADMIN, BASE_ID

MODELS = (BASE_ID, "lora", "prompt", "prefix")
PROMPTS = ("w9 w8 w7", "w7 w5 w9 w11", "w200 w201", "w60 w61 w62 w63")
FINISH = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}


def adapter_of(model: str) -> str:
    return "" if model == BASE_ID else model


def test_models_list_the_base_and_every_adapter(client: openai.OpenAI, server: ServerThread, adapter_dirs: Any):
    with QuiverClient(server.target, admin_token=ADMIN) as grpc_client:  # registered a moment ago, over gRPC
        grpc_client.register_adapter(adapter_dirs["lora"], "fresh")
    try:
        models = {m.id: m for m in client.models.list()}
        assert set(models) == {*MODELS, "fresh"}
        assert models[BASE_ID].parent is None  # type: ignore[attr-defined]
        for name in ("lora", "prompt", "prefix", "fresh"):
            assert models[name].parent == BASE_ID and models[name].owned_by == "quiver"  # type: ignore[attr-defined]
            assert models[name].created > 1_700_000_000
        assert client.models.retrieve("fresh").id == "fresh"
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("nope")
    finally:
        with QuiverClient(server.target, admin_token=ADMIN) as grpc_client:
            grpc_client.delete_adapter("fresh")
    assert "fresh" not in {m.id for m in client.models.list()}


@pytest.mark.parametrize("model", MODELS)
def test_completion_equals_grpc(client: openai.OpenAI, grpc_client: QuiverClient, model: str, loaded: Any):
    http = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=12, temperature=0, logprobs=2)
    reply = grpc_client.generate(PROMPTS[1], adapter=adapter_of(model), max_new_tokens=12, logprobs=2)
    choice = http.choices[0]
    assert choice.text == reply.text and choice.finish_reason == FINISH[reply.finish_reason]
    assert choice.logprobs is not None and choice.logprobs.tokens is not None
    assert choice.logprobs.tokens == [loaded.tokenizer.decode([t]) for t in reply.token_ids]
    assert choice.logprobs.token_logprobs == pytest.approx([lp.logprob for lp in reply.logprobs], abs=1e-5)
    assert http.usage is not None
    assert (http.usage.prompt_tokens, http.usage.completion_tokens) == (reply.prompt_tokens, reply.completion_tokens)
    assert http.usage.total_tokens == reply.prompt_tokens + reply.completion_tokens


@pytest.mark.parametrize("model", MODELS)
def test_chat_equals_grpc(client: openai.OpenAI, grpc_client: QuiverClient, model: str):
    messages = [{"role": "system", "content": "w4 w4"}, {"role": "user", "content": PROMPTS[2]}]
    http = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=10)  # type: ignore[arg-type]
    reply = grpc_client.generate(messages=messages, adapter=adapter_of(model), max_new_tokens=10)
    choice = http.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == reply.text
    assert choice.finish_reason == FINISH[reply.finish_reason]
    assert http.usage is not None and http.usage.prompt_tokens == reply.prompt_tokens
    assert http.system_fingerprint is not None and http.system_fingerprint.startswith("fp_")


def test_prompt_template_applies_as_over_grpc(client: openai.OpenAI, grpc_client: QuiverClient, server: ServerThread,
                                              adapter_dirs: Any):
    with QuiverClient(server.target, admin_token=ADMIN) as admin:
        admin.register_adapter(adapter_dirs["lora"], "templated", prompt_template="w9 w9 {input} w8")
    plain = client.completions.create(model="lora", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    templated = client.completions.create(model="templated", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    reply = grpc_client.generate(PROMPTS[0], adapter="templated", max_new_tokens=8)
    assert templated.choices[0].text == reply.text
    assert templated.usage is not None and plain.usage is not None
    assert templated.usage.prompt_tokens == plain.usage.prompt_tokens + 3 == reply.prompt_tokens
    chat = client.chat.completions.create(model="templated", messages=[{"role": "user", "content": PROMPTS[0]}],
                                          max_tokens=8)
    assert chat.choices[0].message.content == grpc_client.generate(
        messages=[{"role": "user", "content": PROMPTS[0]}], adapter="templated", max_new_tokens=8).text


def test_streams_add_up_to_the_reply(client: openai.OpenAI):
    whole = client.completions.create(model="prefix", prompt=PROMPTS[3], max_tokens=9, temperature=0)
    chunks = list(client.completions.create(model="prefix", prompt=PROMPTS[3], max_tokens=9, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert not chunks[-1].choices and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])

    chat = client.chat.completions.create(model="prompt", messages=[{"role": "user", "content": PROMPTS[0]}],
                                          max_tokens=9)
    stream = list(client.chat.completions.create(model="prompt", messages=[{"role": "user", "content": PROMPTS[0]}],
                                                 max_tokens=9, stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == chat.choices[0].finish_reason
    assert all(c.usage is None for c in stream)  # not asked for


def test_async_client_streams_and_waits(server: ServerThread):
    async def run() -> tuple[str, str]:
        async with openai.AsyncOpenAI(base_url=f"{server.http}/v1", api_key="x", max_retries=0) as client:
            whole = await client.chat.completions.create(
                model="lora", messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=7)
            parts = []
            async for chunk in await client.chat.completions.create(
                    model="lora", messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=7, stream=True):
                parts.append(chunk.choices[0].delta.content or "")
            return whole.choices[0].message.content or "", "".join(parts)

    whole, streamed = asyncio.run(run())
    assert whole and whole == streamed


def test_n_choices_with_a_seed_repeat_and_differ(client: openai.OpenAI):
    def sample() -> list[str]:
        reply = client.chat.completions.create(model="lora", messages=[{"role": "user", "content": PROMPTS[0]}],
                                               max_tokens=12, n=4, temperature=50, seed=7)
        assert [c.index for c in reply.choices] == [0, 1, 2, 3]
        assert reply.usage is not None and reply.usage.completion_tokens == sum(
            len(c.message.content.split()) for c in reply.choices if c.message.content)
        return [c.message.content or "" for c in reply.choices]

    first = sample()
    assert sample() == first  # seeded: choice j draws from seed + j
    assert len(set(first)) > 1
    # The same choice alone: seed + 2 is choice 2's.
    alone = client.chat.completions.create(model="lora", messages=[{"role": "user", "content": PROMPTS[0]}],
                                           max_tokens=12, temperature=50, seed=9)
    assert alone.choices[0].message.content == first[2]


def test_batched_prompts_and_n_keep_openai_order(client: openai.OpenAI):
    reply = client.completions.create(model="prompt", prompt=[PROMPTS[0], PROMPTS[2]], n=2, max_tokens=6,
                                      temperature=0)
    texts = [c.text for c in sorted(reply.choices, key=lambda c: c.index)]
    each = [client.completions.create(model="prompt", prompt=p, max_tokens=6, temperature=0).choices[0].text
            for p in (PROMPTS[0], PROMPTS[2])]
    assert texts == [each[0], each[0], each[1], each[1]]
    assert reply.usage is not None
    single = client.completions.create(model="prompt", prompt=PROMPTS[0], max_tokens=6, temperature=0).usage
    assert single is not None and reply.usage.prompt_tokens == single.prompt_tokens + 2  # each prompt counted once


def test_token_id_prompts(client: openai.OpenAI, loaded: Any):
    ids = loaded.tokenizer(PROMPTS[1], add_special_tokens=False)["input_ids"]
    by_text = client.completions.create(model="lora", prompt=PROMPTS[1], max_tokens=6, temperature=0)
    by_ids = client.completions.create(model="lora", prompt=[ids, ids], max_tokens=6, temperature=0)
    assert [c.text for c in by_ids.choices] == [by_text.choices[0].text] * 2


def test_chat_logprobs(client: openai.OpenAI, grpc_client: QuiverClient):
    messages = [{"role": "user", "content": PROMPTS[3]}]
    http = client.chat.completions.create(model="prefix", messages=messages, max_tokens=6,  # type: ignore[arg-type]
                                          logprobs=True, top_logprobs=3)
    reply = grpc_client.generate(messages=messages, adapter="prefix", max_new_tokens=6, logprobs=3)
    content = http.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == len(reply.logprobs) == 6
    for entry, expected in zip(content, reply.logprobs, strict=True):
        assert entry.logprob == pytest.approx(expected.logprob, abs=1e-5)
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely one
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([v for _, v in expected.top], abs=1e-5)
        assert entry.bytes == list(entry.token.encode())


def test_vllm_sampling_extensions_pass_through_extra_body(client: openai.OpenAI, grpc_client: QuiverClient):
    http = client.completions.create(model=BASE_ID, prompt=PROMPTS[0], max_tokens=10, temperature=0.8, seed=3,
                                     top_p=0.9, extra_body={"top_k": 5, "repetition_penalty": 1.3})
    reply = grpc_client.generate(PROMPTS[0], max_new_tokens=10, temperature=0.8, seed=3, top_p=0.9, top_k=5,
                                 repetition_penalty=1.3)
    assert http.choices[0].text == reply.text


def test_ignore_eos_passes_through(client: openai.OpenAI, grpc_client: QuiverClient):
    http = client.completions.create(model="prompt", prompt=PROMPTS[2], max_tokens=40, temperature=0,
                                     extra_body={"ignore_eos": True})
    reply = grpc_client.generate(PROMPTS[2], adapter="prompt", max_new_tokens=40, ignore_eos=True)
    assert http.usage is not None and http.usage.completion_tokens == reply.completion_tokens == 40
    assert http.choices[0].text == reply.text


def test_stop_sequences(client: openai.OpenAI, grpc_client: QuiverClient):
    free = grpc_client.generate(PROMPTS[0], adapter="lora", max_new_tokens=10)
    stop = free.text.split()[2]
    http = client.completions.create(model="lora", prompt=PROMPTS[0], max_tokens=10, temperature=0, stop=[stop])
    reply = grpc_client.generate(PROMPTS[0], adapter="lora", max_new_tokens=10, stop=[stop])
    assert http.choices[0].text == reply.text and stop not in http.choices[0].text
    assert http.choices[0].finish_reason == "stop"


def test_32_mixed_streams_at_once_equal_grpc(server: ServerThread):
    """Base, LoRA, soft-prompt and prefix rows in one batch, over HTTP streams and over gRPC streams."""
    jobs = [(MODELS[i % 4], PROMPTS[i % 3 + (i // 12) % 2], 8 + i % 9) for i in range(32)]

    async def over_http() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.http}/v1", api_key="x", max_retries=0, timeout=120) as c:
            async def one(model: str, prompt: str, n: int) -> str:
                stream = await c.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0,
                                                    stream=True)
                return "".join([chunk.choices[0].text async for chunk in stream])
            return list(await asyncio.gather(*(one(*job) for job in jobs)))

    async def over_grpc() -> list[str]:
        async with AsyncQuiverClient(server.target, timeout=120) as c:
            async def one(model: str, prompt: str, n: int) -> str:
                return "".join([chunk.text async for chunk in c.generate_stream(
                    prompt, adapter=adapter_of(model), max_new_tokens=n)])
            return list(await asyncio.gather(*(one(*job) for job in jobs)))

    http, grpc_texts = asyncio.run(over_http()), asyncio.run(over_grpc())
    assert http == grpc_texts
    assert len(set(http)) > 8  # the kinds and prompts really differ


def test_each_adapter_changes_the_answer(client: openai.OpenAI):
    """So the equalities above compare adapter answers, not the base model's four times."""
    texts = {m: client.completions.create(model=m, prompt=PROMPTS[1], max_tokens=12, temperature=0).choices[0].text
             for m in MODELS}
    assert len(set(texts.values())) == len(MODELS), texts
