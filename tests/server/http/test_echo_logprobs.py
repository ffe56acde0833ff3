"""`echo` with `logprobs` (what evaluation harnesses use for log-likelihoods): the prompt's own tokens scored by
the model under the request's adapter, checked against PEFT (or transformers for the base) teacher-forced."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from ...adapters.adapter_factory import load_base, load_peft_model
from .conftest import BASE_ID

PROMPT = "w5 w17 w42 w99 w7 w3 w120 w64"


def reference_logprobs(base_dir: Path, adapter_dir: Path | None, ids: list[int]) -> torch.Tensor:
    """(T, V) log-probabilities at each prompt position, from PEFT (or the bare base) in one forward."""
    model = load_base(base_dir) if adapter_dir is None else load_peft_model(base_dir, adapter_dir)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -len(ids):]  # a soft prompt's positions come first
    return torch.log_softmax(logits.float(), dim=-1)


@pytest.mark.parametrize("model", [BASE_ID, "lora", "prompt", "prefix"])
def test_echo_scores_the_prompt_as_peft_does(client: openai.OpenAI, loaded: Any, base_dir: Path,
                                            adapter_dirs: dict[str, Path], model: str):
    ids = loaded.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=1, temperature=0, echo=True,
                                      logprobs=2)
    choice = reply.choices[0]
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert lp.tokens[: len(ids)] == [loaded.tokenizer.decode([t]) for t in ids]
    assert len(lp.tokens) == len(ids) + 1 and choice.text.startswith(PROMPT)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    reference = reference_logprobs(base_dir, None if model == BASE_ID else adapter_dirs[model], ids)
    expected = [reference[j - 1, ids[j]].item() for j in range(1, len(ids))]
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=1e-4)
    for j in range(1, len(ids)):
        top = torch.topk(reference[j - 1], 2)
        wanted = {loaded.tokenizer.decode([int(t)]): v for t, v in zip(top.indices, top.values.tolist(), strict=True)}
        wanted.setdefault(lp.tokens[j], expected[j - 1])  # the prompt's own token is always listed
        assert lp.top_logprobs[j] == pytest.approx(wanted, abs=1e-4)
    assert lp.text_offset is not None and lp.text_offset[:2] == [0, len(lp.tokens[0])]
    assert lp.text_offset[len(ids)] == len(PROMPT)  # the completion's first token starts where the echo ends


def test_echo_without_logprobs_and_in_a_stream(client: openai.OpenAI):
    whole = client.completions.create(model="lora", prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    plain = client.completions.create(model="lora", prompt=PROMPT, max_tokens=4, temperature=0)
    assert whole.choices[0].text == PROMPT + plain.choices[0].text
    chunks = list(client.completions.create(model="lora", prompt=PROMPT, max_tokens=4, temperature=0, echo=True,
                                            logprobs=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    first = chunks[0].choices[0].logprobs
    assert first is not None and first.token_logprobs is not None and first.token_logprobs[0] is None
    assert len(first.token_logprobs) == len(PROMPT.split()) + 1  # the prompt's tokens, then the first generated


def test_grpc_prompt_logprobs_equal_the_echo(client: openai.OpenAI, server: Any, loaded: Any):
    import grpc

    from quiver.v1 import generation_pb2 as pb
    from quiver.v1 import generation_pb2_grpc as pb_grpc

    ids = loaded.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    with grpc.insecure_channel(server.target) as channel:
        reply = pb_grpc.GenerationServiceStub(channel).Generate(pb.GenerateRequest(
            adapter="prefix", tokens=pb.TokenIds(ids=ids), prompt_logprobs=1,
            stopping=pb.StoppingCriteria(max_new_tokens=1)))
    echo = client.completions.create(model="prefix", prompt=ids, max_tokens=1, echo=True, logprobs=1)
    lp = echo.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None
    assert [e.token_id for e in reply.prompt_logprobs] == ids[1:]
    assert [e.logprob for e in reply.prompt_logprobs] == pytest.approx(lp.token_logprobs[1: len(ids)], abs=1e-6)
