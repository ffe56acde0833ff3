"""In-process gRPC tests on the real default model (SmolLM2-135M-Instruct, fp32, CPU)."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from quiver.v1 import generation_pb2 as pb
from quiver.v1 import generation_pb2_grpc as pb_grpc

from ...real_models import RealModels
from ...server_thread import ServerThread

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def loaded(real_models: RealModels) -> Any:
    return real_models.get()


@pytest.fixture(scope="module")
def server(loaded: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    srv = ServerThread(loaded, store=tmp_path_factory.mktemp("store"))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.GenerationServiceStub:
    return pb_grpc.GenerationServiceStub(channel)


def reference_tokens(loaded: Any, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = loaded.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=sorted(loaded.eos_token_ids), pad_token_id=loaded.tokenizer.pad_token_id,
        )
    return list(out[0, ids.shape[1]:].tolist())


def test_greedy_generate_equals_transformers(stub: Any, loaded: Any):
    prompt = "The three primary colors are"
    reply = stub.Generate(pb.GenerateRequest(text=prompt, stopping=pb.StoppingCriteria(max_new_tokens=24)))
    prompt_ids = loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert list(reply.token_ids) == reference_tokens(loaded, prompt_ids, 24)
    assert reply.text == loaded.tokenizer.decode(reply.token_ids, skip_special_tokens=True)
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.completion_tokens == len(reply.token_ids)


def test_chat_generate_uses_template_and_stops_at_eos(stub: Any, loaded: Any):
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    reply = stub.Generate(
        pb.GenerateRequest(
            chat=pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in messages]),
            stopping=pb.StoppingCriteria(max_new_tokens=40),
        )
    )
    rendered = loaded.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = loaded.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert list(reply.token_ids) == reference_tokens(loaded, prompt_ids, 40)
    assert reply.finish_reason == pb.FINISH_REASON_EOS_TOKEN
    assert "Paris" in reply.text


def test_stream_concatenation_equals_generate(stub: Any):
    fields: dict[str, Any] = {"text": "Write a short poem about the sea.\n",
                              "stopping": pb.StoppingCriteria(max_new_tokens=32)}
    whole = stub.Generate(pb.GenerateRequest(**fields))
    chunks = list(stub.GenerateStream(pb.GenerateStreamRequest(**fields)))
    assert len(chunks) > 1
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.token_ids] == list(whole.token_ids)
    assert chunks[-1].finish_reason == whole.finish_reason == pb.FINISH_REASON_LENGTH
    assert chunks[-1].usage == whole.usage
    assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])


def test_logprobs_are_the_models_and_stream_like_generate(stub: Any, loaded: Any):
    prompt = "The three primary colors are"
    fields: dict[str, Any] = {"text": prompt, "stopping": pb.StoppingCriteria(max_new_tokens=6), "logprobs": 3,
                              "sampling": pb.SamplingParameters(temperature=0.8, seed=7)}
    reply = stub.Generate(pb.GenerateRequest(**fields))
    assert [lp.token_id for lp in reply.logprobs] == list(reply.token_ids)
    # Teacher forcing: the model's log-softmax at each generated position, before any sampling transform.
    prompt_ids = loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + list(reply.token_ids)])
    with torch.inference_mode():
        expected = torch.log_softmax(loaded.model(input_ids=ids).logits[0].float(), dim=-1)  # (T, V)
    for i, lp in enumerate(reply.logprobs):
        row = expected[len(prompt_ids) - 1 + i]  # (V,)
        assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=1e-3)
        top_values, top_ids = row.topk(3)
        assert [t.token_id for t in lp.top] == top_ids.tolist()
        assert [t.logprob for t in lp.top] == pytest.approx(top_values.tolist(), abs=1e-3)
    chunks = list(stub.GenerateStream(pb.GenerateStreamRequest(**fields)))
    assert [lp for c in chunks for lp in c.logprobs] == list(reply.logprobs)  # same seed: same tokens
    plain = stub.Generate(pb.GenerateRequest(text=prompt, stopping=pb.StoppingCriteria(max_new_tokens=2)))
    assert not plain.logprobs  # only when asked


def test_stop_sequence_over_grpc(stub: Any):
    base = stub.Generate(pb.GenerateRequest(text="Count: 1, 2, 3,", stopping=pb.StoppingCriteria(max_new_tokens=20)))
    stop = " 6"
    assert stop in base.text
    stopping = pb.StoppingCriteria(max_new_tokens=20, stop_sequences=[stop])
    reply = stub.Generate(pb.GenerateRequest(text="Count: 1, 2, 3,", stopping=stopping))
    assert reply.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert reply.text == base.text[: base.text.index(stop)]


def _with(**kw: Any) -> Callable[[], pb.GenerateRequest]:
    def make() -> pb.GenerateRequest:
        fields: dict[str, Any] = {"text": "hello"}
        fields.update(kw)
        return pb.GenerateRequest(**fields)

    return make


BAD_INPUTS: dict[str, tuple[Callable[[], pb.GenerateRequest], str]] = {
    "no input": (lambda: pb.GenerateRequest(), "input"),
    "empty prompt": (_with(text=""), "text"),
    "prompt longer than context": (_with(text="word " * 9000), "text"),
    "max_new_tokens zero": (_with(stopping=pb.StoppingCriteria(max_new_tokens=0)), "stopping.max_new_tokens"),
    "max_new_tokens over limit": (
        _with(stopping=pb.StoppingCriteria(max_new_tokens=1_000_000)), "stopping.max_new_tokens"),
    "nan temperature": (_with(sampling=pb.SamplingParameters(temperature=float("nan"))), "sampling.temperature"),
    "negative temperature": (_with(sampling=pb.SamplingParameters(temperature=-0.5)), "sampling.temperature"),
    "top_p zero": (_with(sampling=pb.SamplingParameters(top_p=0.0)), "sampling.top_p"),
    "top_p above one": (_with(sampling=pb.SamplingParameters(top_p=1.5)), "sampling.top_p"),
    "negative top_k": (_with(sampling=pb.SamplingParameters(top_k=-1)), "sampling.top_k"),
    "zero repetition penalty": (
        _with(sampling=pb.SamplingParameters(repetition_penalty=0.0)), "sampling.repetition_penalty"),
    "empty stop sequence": (
        _with(stopping=pb.StoppingCriteria(stop_sequences=["ok", ""])), "stopping.stop_sequences[1]"),
    "too many stop sequences": (
        _with(stopping=pb.StoppingCriteria(stop_sequences=[str(i) for i in range(17)])), "stopping.stop_sequences"),
    "overlong stop sequence": (
        _with(stopping=pb.StoppingCriteria(stop_sequences=["x" * 257])), "stopping.stop_sequences[0]"),
    "too many logprobs": (_with(logprobs=21), "logprobs"),
    "empty chat": (lambda: pb.GenerateRequest(chat=pb.ChatMessages()), "chat.messages"),
    "bad chat role": (
        lambda: pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="robot", content="hi")])),
        "chat.messages[0].role"),
    "empty chat content": (
        lambda: pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="")])),
        "chat.messages[0].content"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_invalid_argument(stub: Any, case: str):
    make, field = BAD_INPUTS[case]
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(make())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":"), err.value.details()
    # The same mistake through the streaming RPC gets the same status.
    stream_request = pb.GenerateStreamRequest.FromString(make().SerializeToString())
    with pytest.raises(grpc.RpcError) as err:
        list(stub.GenerateStream(stream_request))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_adapter_is_not_found(stub: Any):
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(adapter="summarizer", text="hello"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "summarizer" in err.value.details()


def test_model_info(stub: Any, loaded: Any):
    info = stub.ModelInfo(pb.ModelInfoRequest())
    assert info.model_name == loaded.info.name
    assert info.fingerprint == loaded.info.fingerprint and info.fingerprint
    assert info.quantization == "none"
    assert info.device == "cpu"
    assert info.context_length == loaded.model.config.max_position_embeddings
    params = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    assert info.resident_bytes >= params > 0
    # The engine's prepacked copies of the fp32 linears (lm_head included) count as resident too.
    packed = sum(m.weight.nbytes for m in loaded.model.modules() if type(m) is torch.nn.Linear)
    assert info.resident_bytes == loaded.info.resident_bytes + packed
    assert info.has_chat_template


def _wait_idle(server: ServerThread, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.running.engine.num_running == 0 and server.running.engine.num_waiting == 0:
            return True
        time.sleep(0.02)
    return False


def test_cancelled_stream_frees_its_sequence(stub: Any, server: ServerThread):
    call = stub.GenerateStream(
        pb.GenerateStreamRequest(text="1, 2, 3, 4, 5,", stopping=pb.StoppingCriteria(max_new_tokens=1000))
    )
    next(call)
    assert server.running.engine.num_running == 1
    call.cancel()
    assert _wait_idle(server)


def test_expired_deadline_frees_its_sequence(stub: Any, server: ServerThread):
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(
            pb.GenerateRequest(text="1, 2, 3, 4, 5,", stopping=pb.StoppingCriteria(max_new_tokens=1000)),
            timeout=0.5,
        )
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _wait_idle(server)


def test_health_and_reflection(channel: grpc.Channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "quiver.v1.GenerationService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"quiver.v1.GenerationService", "grpc.health.v1.Health"} <= names


def test_metrics_count_requests_by_status(stub: Any, server: ServerThread):
    stub.Generate(pb.GenerateRequest(text="Hi", stopping=pb.StoppingCriteria(max_new_tokens=2)))
    with pytest.raises(grpc.RpcError):
        stub.Generate(pb.GenerateRequest(text=""))
    url = f"http://127.0.0.1:{server.running.metrics_port}/metrics"
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    assert 'quiver_requests_total{code="OK",method="Generate"}' in body
    assert 'quiver_requests_total{code="INVALID_ARGUMENT",method="Generate"}' in body
    assert 'quiver_request_duration_seconds_bucket{le="0.005",method="Generate"}' in body


def _scrape(server: ServerThread) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the metrics endpoint: (name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{server.running.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_time_and_count_tokens(stub: Any, server: ServerThread):
    base = (("kind", "base"),)
    before = _scrape(server)
    reply = stub.Generate(pb.GenerateRequest(text="Hi", stopping=pb.StoppingCriteria(max_new_tokens=3)))
    after = _scrape(server)

    def grew(name: str, labels: tuple[tuple[str, str], ...] = base) -> float:
        return after[(name, labels)] - before.get((name, labels), 0.0)

    assert len(reply.token_ids) == 3
    assert grew("quiver_generation_tokens_total") == 3
    assert grew("quiver_prompt_tokens_total") == reply.usage.prompt_tokens > 0
    assert grew("quiver_time_to_first_token_seconds_count") == 1
    assert grew("quiver_inter_token_latency_seconds_count") == 2  # 3 tokens, 2 gaps
    assert grew("quiver_time_to_first_token_seconds_sum") > 0
    for tier in ("host", "device"):
        for name in ("quiver_adapter_hits_total", "quiver_adapter_misses_total", "quiver_adapter_loads_total",
                     "quiver_adapter_evictions_total", "quiver_adapter_bytes"):
            assert (name, (("tier", tier),)) in after
    assert after[("quiver_cache_budget_bytes", ())] == server.running.engine._config.max_cache_bytes
    assert ("quiver_cache_reserved_bytes", ()) in after
    assert after[("quiver_preemptions_total", ())] == 0  # the default admission reserves, so never preempts


def test_openai_client_on_the_real_model_equals_grpc(stub: Any, server: ServerThread):
    """The README's example: the base model's id in `model`, the same greedy answer as over gRPC."""
    import openai

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    grpc_reply = stub.Generate(pb.GenerateRequest(
        chat=pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in messages]),
        stopping=pb.StoppingCriteria(max_new_tokens=40)))
    with openai.OpenAI(base_url=f"{server.http}/v1", api_key="unused", max_retries=0) as client:
        [model] = client.models.list().data
        reply = client.chat.completions.create(model=model.id, messages=messages, max_tokens=40)  # type: ignore[arg-type]
    assert model.id == "SmolLM2-135M-Instruct.Q4_1"
    assert reply.choices[0].message.content == grpc_reply.text and "Paris" in grpc_reply.text
    assert reply.choices[0].finish_reason == "stop"
