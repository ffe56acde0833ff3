"""Access lines against a real server (gRPC and HTTP): one per call with its request id, adapter, status, tokens
and timings; the request id echoed back and carried by errors; prompts logged only with `log_prompts`; the JSON
formatter; probes and scrapes unlogged; a stream cut by its deadline.

The server runs in another thread: its access line may land just after the client has its answer, so lines are
awaited by request id (`line`).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from quiver.server.config import ModelConfig
from quiver.server.logging_setup import JsonFormatter
from quiver.v1 import generation_pb2 as pb
from quiver.v1 import generation_pb2_grpc as pb_grpc

from ...server_thread import ServerThread
from .conftest import BASE_ID, start

ACCESS = "quiver.access"
FIELDS = {"request_id", "front", "method", "adapter", "status", "prompt_tokens", "generated_tokens", "queue_ms",
          "ttft_ms", "duration_ms"}
GENERATED_ID = re.compile(r"[0-9a-f]{32}")
PROMPT = "w5 w6 w7 w8"
# The tiny tokenizer knows only `w0`..`w252`: the raw canary tokenizes to <unk>s, the word canary round-trips, so
# between them a prompt leaked as sent or as decoded tokens is caught.
CANARY = "zebra-canary-123"
WORD_CANARY = "w201 w13 w77 w150 w9"


def load(base_dir: Path, cache: Path) -> Any:
    """The base model, loaded afresh: an engine takes its model over, so a second server needs its own copy."""
    from quiver.server.model.model_loader import load_base_model

    return load_base_model(ModelConfig(model=str(base_dir), device="cpu", quantize="none", cache_dir=str(cache)))


@pytest.fixture(scope="module")
def server(loaded: Any, adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerThread]:
    srv = start(loaded, tmp_path_factory.mktemp("store"), adapter_dirs)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> Any:
    return pb_grpc.GenerationServiceStub(channel)


@pytest.fixture
def access(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=ACCESS)
    return caplog


def new_id() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in list(caplog.records) if r.name == ACCESS]


def line_record(caplog: pytest.LogCaptureFixture, rid: str, timeout: float = 10.0) -> logging.LogRecord:
    """The one access record of request `rid`, awaited (the server logs from its own thread)."""
    end = time.monotonic() + timeout
    while True:
        found = [r for r in access_records(caplog) if getattr(r, "fields", {}).get("request_id") == rid]
        if found or time.monotonic() > end:
            break
        time.sleep(0.01)
    time.sleep(0.05)  # a second line for the same call would show up by now
    found = [r for r in access_records(caplog) if getattr(r, "fields", {}).get("request_id") == rid]
    assert len(found) == 1, f"access lines of {rid}: {[r.getMessage() for r in found]}"
    return found[0]


def line(caplog: pytest.LogCaptureFixture, rid: str) -> dict[str, Any]:
    fields: dict[str, Any] = line_record(caplog, rid).__dict__["fields"]
    return fields


def metadata_id(call: Any) -> str:
    ids = [v for k, v in call.initial_metadata() if k == "x-request-id"]
    assert len(ids) == 1
    return str(ids[0])


def check_generation(fields: dict[str, Any], front: str, method: str, adapter: str, status: str,
                     prompt_tokens: int, generated_tokens: int) -> None:
    assert set(fields) == FIELDS
    assert (fields["front"], fields["method"], fields["adapter"], fields["status"]) == (front, method, adapter, status)
    assert (fields["prompt_tokens"], fields["generated_tokens"]) == (prompt_tokens, generated_tokens)
    assert prompt_tokens > 0 and generated_tokens > 0
    assert isinstance(fields["queue_ms"], float) and fields["queue_ms"] >= 0
    assert isinstance(fields["ttft_ms"], float) and fields["ttft_ms"] >= 0
    assert fields["duration_ms"] >= fields["ttft_ms"]


def sse(response: httpx.Response) -> list[dict[str, Any]]:
    events = []
    for raw in response.iter_lines():
        if raw.startswith("data: ") and raw != "data: [DONE]":
            events.append(json.loads(raw[len("data: "):]))
    return events


@pytest.mark.parametrize("adapter", ["", "lora"])
def test_grpc_generate_and_stream_lines(stub: Any, access: pytest.LogCaptureFixture, adapter: str) -> None:
    rid = new_id()
    stopping = pb.StoppingCriteria(max_new_tokens=6)
    reply, call = stub.Generate.with_call(pb.GenerateRequest(adapter=adapter, text=PROMPT, stopping=stopping),
                                          metadata=[("x-request-id", rid)])
    assert metadata_id(call) == rid
    check_generation(line(access, rid), "grpc", "Generate", adapter, "OK", reply.usage.prompt_tokens,
                     len(reply.token_ids))
    assert reply.usage.completion_tokens == len(reply.token_ids)

    rid = new_id()
    stream = stub.GenerateStream(pb.GenerateStreamRequest(adapter=adapter, text=PROMPT, stopping=stopping),
                                 metadata=[("x-request-id", rid)])
    assert metadata_id(stream) == rid
    chunks = list(stream)
    check_generation(line(access, rid), "grpc", "GenerateStream", adapter, "OK", chunks[-1].usage.prompt_tokens,
                     sum(len(c.token_ids) for c in chunks))


def test_grpc_model_info_line(stub: Any, access: pytest.LogCaptureFixture) -> None:
    rid = new_id()
    _, call = stub.ModelInfo.with_call(pb.ModelInfoRequest(), metadata=[("x-request-id", rid)])
    assert metadata_id(call) == rid
    fields = line(access, rid)
    assert set(fields) == FIELDS
    assert fields == {**fields, "front": "grpc", "method": "ModelInfo", "adapter": "", "status": "OK",
                      "prompt_tokens": 0, "generated_tokens": 0, "queue_ms": None, "ttft_ms": None}
    assert fields["duration_ms"] >= 0


@pytest.mark.parametrize("model", [BASE_ID, "lora"])
def test_http_completion_and_chat_stream_lines(server: ServerThread, access: pytest.LogCaptureFixture,
                                               model: str) -> None:
    adapter = "" if model == BASE_ID else model
    rid = new_id()
    response = httpx.post(f"{server.http}/v1/completions", headers={"x-request-id": rid}, timeout=60,
                          json={"model": model, "prompt": PROMPT, "max_tokens": 5})
    assert response.status_code == 200 and response.headers["x-request-id"] == rid
    usage = response.json()["usage"]
    check_generation(line(access, rid), "http", "/v1/completions", adapter, "200", usage["prompt_tokens"],
                     usage["completion_tokens"])

    rid = new_id()
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.http}/v1/chat/completions", json=body, headers={"x-request-id": rid},
                      timeout=60) as streamed:
        assert streamed.status_code == 200 and streamed.headers["x-request-id"] == rid
        events = sse(streamed)
    usage = events[-1]["usage"]
    check_generation(line(access, rid), "http", "/v1/chat/completions", adapter, "200", usage["prompt_tokens"],
                     usage["completion_tokens"])


INVALID_IDS = ["has space", "a" * 129, "-leading-dash", "semi;colon"]


@pytest.mark.parametrize("sent", [None, "a" * 128, "A.b_c:d/e+f=g-1", *INVALID_IDS])
def test_grpc_request_id_kept_or_replaced(stub: Any, access: pytest.LogCaptureFixture, sent: str | None) -> None:
    metadata = [] if sent is None else [("x-request-id", sent)]
    _, call = stub.ModelInfo.with_call(pb.ModelInfoRequest(), metadata=metadata)
    rid = metadata_id(call)
    if sent is None or sent in INVALID_IDS:
        assert GENERATED_ID.fullmatch(rid), rid
    else:
        assert rid == sent
    assert line(access, rid)["method"] == "ModelInfo"


@pytest.mark.parametrize("sent", [None, "a" * 128, *INVALID_IDS, "a" * 200, "café".encode()])
def test_http_request_id_kept_or_replaced(server: ServerThread, access: pytest.LogCaptureFixture,
                                          sent: str | bytes | None) -> None:
    raw = sent.encode() if isinstance(sent, str) else sent
    headers = [] if raw is None else [(b"x-request-id", raw)]
    response = httpx.get(f"{server.http}/v1/models", headers=headers, timeout=30)
    assert response.status_code == 200
    rid = response.headers["x-request-id"]
    if sent == "a" * 128:
        assert rid == sent
    else:
        assert GENERATED_ID.fullmatch(rid), rid
    fields = line(access, rid)
    assert (fields["front"], fields["method"], fields["status"]) == ("http", "/v1/models", "200")


@pytest.mark.parametrize("stream", [False, True])
def test_grpc_not_found_carries_request_id(stub: Any, access: pytest.LogCaptureFixture, stream: bool) -> None:
    rid = new_id()
    metadata = [("x-request-id", rid)]
    with pytest.raises(grpc.RpcError) as caught:
        if stream:
            list(stub.GenerateStream(pb.GenerateStreamRequest(adapter="nope", text=PROMPT), metadata=metadata))
        else:
            stub.Generate(pb.GenerateRequest(adapter="nope", text=PROMPT), metadata=metadata)
    error: Any = caught.value
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details().endswith(f" (request id {rid})"), error.details()
    assert metadata_id(error) == rid
    fields = line(access, rid)
    assert (fields["status"], fields["adapter"], fields["generated_tokens"]) == ("NOT_FOUND", "nope", 0)
    assert fields["method"] == ("GenerateStream" if stream else "Generate")


@pytest.mark.parametrize(("body", "status"), [
    ({"model": "nope", "prompt": PROMPT}, 404),
    ({"model": BASE_ID, "prompt": PROMPT, "max_tokens": -1}, 400),
])
@pytest.mark.parametrize("sent", [True, False])
def test_http_error_carries_request_id(server: ServerThread, access: pytest.LogCaptureFixture,
                                       body: dict[str, Any], status: int, sent: bool) -> None:
    headers = {"x-request-id": new_id()} if sent else {}
    response = httpx.post(f"{server.http}/v1/completions", json=body, headers=headers, timeout=30)
    assert response.status_code == status
    rid = response.headers["x-request-id"]
    assert rid == headers["x-request-id"] if sent else GENERATED_ID.fullmatch(rid)
    assert response.json()["error"]["request_id"] == rid
    assert line(access, rid)["status"] == str(status)


def send_canaries(server: ServerThread, prompt: str) -> list[str]:
    """`prompt` through every way a prompt comes in, on both fronts; the request ids."""
    ids = [new_id() for _ in range(4)]
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        stopping = pb.StoppingCriteria(max_new_tokens=2)
        stub.Generate(pb.GenerateRequest(adapter="lora", text=prompt, stopping=stopping),
                      metadata=[("x-request-id", ids[0])])
        chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=prompt)])
        list(stub.GenerateStream(pb.GenerateStreamRequest(chat=chat, stopping=stopping),
                                 metadata=[("x-request-id", ids[1])]))
    bodies: list[tuple[str, str, dict[str, Any]]] = [
        (ids[2], "completions", {"prompt": prompt}),
        (ids[3], "chat/completions", {"messages": [{"role": "user", "content": prompt}], "stream": True}),
    ]
    for rid, path, body in bodies:
        response = httpx.post(f"{server.http}/v1/{path}", headers={"x-request-id": rid}, timeout=60,
                              json={"model": BASE_ID, "max_tokens": 2, **body})
        assert response.status_code == 200
    return ids


def test_prompts_never_logged_by_default(server: ServerThread, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    ids = send_canaries(server, f"{CANARY} {WORD_CANARY}")
    for rid in ids:
        assert "prompt" not in line(caplog, rid)
    for record in list(caplog.records):
        seen = f"{record.getMessage()} {getattr(record, 'fields', '')} {record.args}"
        assert CANARY not in seen and WORD_CANARY not in seen, seen


def test_prompts_logged_with_log_prompts(base_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path,
                                         access: pytest.LogCaptureFixture) -> None:
    srv = start(load(base_dir, tmp_path / "cache"), tmp_path / "store", adapter_dirs, log_prompts=True)
    try:
        ids = send_canaries(srv, f"{CANARY} {WORD_CANARY}")
        for rid in ids:
            fields = line(access, rid)
            assert WORD_CANARY in fields["prompt"], fields
            assert WORD_CANARY in line_record(access, rid).getMessage()
    finally:
        srv.close()


def test_json_formatter_puts_fields_at_top_level(stub: Any, access: pytest.LogCaptureFixture) -> None:
    rid = new_id()
    stub.Generate(pb.GenerateRequest(text=PROMPT, stopping=pb.StoppingCriteria(max_new_tokens=3)),
                  metadata=[("x-request-id", rid)])
    record = line_record(access, rid)
    out = json.loads(JsonFormatter().format(record))
    fields = record.__dict__["fields"]
    assert {key: out[key] for key in fields} == fields
    assert set(out) == {"ts", "level", "logger", "message", *FIELDS}
    assert (out["logger"], out["level"], out["message"]) == (ACCESS, "INFO", record.getMessage())
    assert out["request_id"] == rid and out["generated_tokens"] == 3


def test_probes_scrapes_health_and_reflection_unlogged(server: ServerThread, channel: grpc.Channel,
                                                       access: pytest.LogCaptureFixture) -> None:
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert replies and replies[0].list_services_response.service
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{server.http}{path}", timeout=30).status_code == 200
    marker = new_id()  # a logged call after them: their lines, if any, come before its own
    assert httpx.get(f"{server.http}/v1/models", headers={"x-request-id": marker}, timeout=30).status_code == 200
    line(access, marker)
    logged = [getattr(r, "fields", {}) for r in access_records(access)]
    assert [f.get("request_id") for f in logged] == [marker], [r.getMessage() for r in access_records(access)]


DEADLINE_TRIES = 10


def test_stream_past_its_deadline_logs_tokens_sent(stub: Any, access: pytest.LogCaptureFixture) -> None:
    """Several tries: the deadline may strike while the server awaits the engine or while gRPC sends a chunk (its
    handler's generator then closes at its `yield`), and both must log the call as cut short."""
    request = pb.GenerateStreamRequest(text=PROMPT, stopping=pb.StoppingCriteria(max_new_tokens=2000,
                                                                                 ignore_eos=True))
    lines: list[tuple[str, str]] = []
    for _ in range(DEADLINE_TRIES):
        rid = new_id()
        stream = stub.GenerateStream(request, timeout=0.3, metadata=[("x-request-id", rid)])
        received = 0
        with pytest.raises(grpc.RpcError) as caught:
            for chunk in stream:
                received += len(chunk.token_ids)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        assert 0 < received < 2000
        fields = line(access, rid)
        lines.append((fields["status"], f"received {received}: {line_record(access, rid).getMessage()}"))
        assert fields["generated_tokens"] >= received
        assert fields["prompt_tokens"] > 0 and fields["ttft_ms"] is not None
        assert fields["duration_ms"] >= 300 * 0.9
    assert {status for status, _ in lines} <= {"DEADLINE_EXCEEDED", "CANCELLED"}, "\n".join(m for _, m in lines)
