"""Every error the HTTP front answers, in OpenAI's JSON shape, with the status the same domain error has on gRPC:
400 invalid or unsupported, 404 unknown model (never a base-model answer), 413 too large, 429 queue full, 503
draining, 504 deadline; and a stream whose client disconnects frees its row at once."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import openai
import pytest

from ...server_thread import ServerThread, wait_for

CHAT = {"model": "lora", "messages": [{"role": "user", "content": "w1 w2"}], "max_tokens": 4}
COMPLETION = {"model": "prompt", "prompt": "w1 w2", "max_tokens": 4}


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code", "request_id"}
    error: dict[str, Any] = body["error"]
    assert error["message"]
    assert error["request_id"] == response.headers["x-request-id"]  # the call's id, to quote when reporting it
    return error


@pytest.mark.parametrize(("path", "change", "param", "code"), [
    ("/v1/chat/completions", {"top_p": 2.0}, "top_p", "invalid_value"),
    ("/v1/chat/completions", {"temperature": -1}, "temperature", "invalid_value"),
    ("/v1/chat/completions", {"max_tokens": 0}, "max_tokens", "invalid_value"),
    ("/v1/chat/completions", {"max_completion_tokens": 99999}, "max_completion_tokens", "invalid_value"),
    ("/v1/chat/completions", {"n": 0}, "n", "invalid_value"),
    ("/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs", "invalid_value"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
    ("/v1/chat/completions", {"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
    ("/v1/chat/completions", {"stop": [""]}, "stop[0]", "invalid_value"),
    ("/v1/chat/completions", {"messages": []}, "messages", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": ""}]}, "messages[0].content", "invalid_value"),
    ("/v1/chat/completions", {"messages": "w1"}, "messages", "invalid_value"),
    ("/v1/chat/completions", {"model": 3}, "model", "invalid_value"),
    ("/v1/chat/completions", {"temperature": "hot"}, "temperature", "invalid_value"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools",
     "unsupported_parameter"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format", "unsupported_parameter"),
    ("/v1/chat/completions", {"logit_bias": {"5": 10}}, "logit_bias", "unsupported_parameter"),
    ("/v1/chat/completions", {"presence_penalty": 0.5}, "presence_penalty", "unsupported_parameter"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role",
     "unsupported_parameter"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].type", "unsupported_parameter"),
    ("/v1/chat/completions", {"guided_json": {}}, "guided_json", "unsupported_parameter"),
    ("/v1/completions", {"prompt": []}, "prompt", "invalid_value"),
    ("/v1/completions", {"prompt": [10**9]}, "prompt[0]", "invalid_value"),
    ("/v1/completions", {"suffix": "w5"}, "suffix", "unsupported_parameter"),
    ("/v1/completions", {"best_of": 3}, "best_of", "unsupported_parameter"),
    ("/v1/completions", {"logprobs": 30}, "logprobs", "invalid_value"),
    ("/v1/completions", {"seed": -1}, "seed", "invalid_value"),
])
def test_bad_requests_are_400_naming_the_field(server: ServerThread, path: str, change: dict[str, Any], param: str,
                                               code: str):
    body = {**(CHAT if "chat" in path else COMPLETION), **change}
    error = error_of(httpx.post(server.http + path, json=body), 400)
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")


def test_the_openai_client_raises_its_own_errors(client: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="lora", messages=[{"role": "user", "content": "w1"}], top_p=3)
    assert bad.value.param == "top_p" and "(0, 1]" in bad.value.message  # type: ignore[attr-defined]
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="no-such-adapter", prompt="w1", max_tokens=2)
    assert missing.value.code == "model_not_found"  # type: ignore[attr-defined]


def test_malformed_bodies(server: ServerThread):
    error = error_of(httpx.post(server.http + "/v1/completions", content=b"{not json"), 400)
    assert error["param"] == "body"
    error_of(httpx.get(server.http + "/v1/nothing-here"), 404)
    error_of(httpx.get(server.http + "/v1/completions"), 405)


@pytest.mark.parametrize("model", ["nope", "lora@9", "Lora", "gpt-4o/mini"])
def test_unknown_models_are_404_never_a_base_answer(server: ServerThread, model: str):
    for path, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
        error = error_of(httpx.post(server.http + path, json={**body, "model": model}), 404)
        assert (error["param"], error["code"]) == ("model", "model_not_found")
    assert error_of(httpx.get(f"{server.http}/v1/models/{model}"), 404)["code"] == "model_not_found"


def _running(server: ServerThread) -> float:
    text = httpx.get(server.http + "/metrics").text
    line = next(x for x in text.splitlines() if x.startswith("vllm:num_requests_running{"))
    return float(line.rsplit(" ", 1)[1])


def test_a_client_that_disconnects_mid_stream_frees_its_row(server: ServerThread):
    """A 2,000-token generation takes seconds; once its reader goes away the row leaves the batch at once."""
    body = {"model": "lora", "prompt": "w1 w2", "max_tokens": 2000, "stream": True}
    with httpx.Client(timeout=60) as c, c.stream("POST", server.http + "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert _running(server) == 1
        closed = time.monotonic()
    assert wait_for(lambda: _running(server) == 0, timeout=5)
    assert time.monotonic() - closed < 1.0


def test_a_non_streaming_client_that_disconnects_frees_its_row(server: ServerThread):
    body = {"model": "prefix", "messages": [{"role": "user", "content": "w1"}], "max_tokens": 2000}
    sender = threading.Thread(target=lambda: _post_and_drop(server.http + "/v1/chat/completions", body))
    sender.start()
    assert wait_for(lambda: _running(server) == 1)
    sender.join()
    closed = time.monotonic()
    assert wait_for(lambda: _running(server) == 0, timeout=5) and time.monotonic() - closed < 1.0


def _post_and_drop(url: str, body: dict[str, Any]) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json=body, timeout=httpx.Timeout(60, read=0.5))


def test_deadline_is_504_and_ends_the_work(server: ServerThread):
    long = {"model": "lora", "prompt": "w1 w2", "max_tokens": 2000}
    started = time.monotonic()
    response = httpx.post(server.http + "/v1/completions", json=long, headers={"X-Request-Timeout": "0.3"})
    assert error_of(response, 504)["code"] == "deadline_exceeded" and time.monotonic() - started < 2
    assert wait_for(lambda: _running(server) == 0, timeout=2)
    stream = httpx.post(server.http + "/v1/completions", json={**long, "stream": True},
                        headers={"X-Request-Timeout": "0.3"}, timeout=30)
    events = [line.removeprefix("data: ") for line in stream.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and '"deadline_exceeded"' in events[-2]
    assert wait_for(lambda: _running(server) == 0, timeout=2)
    bad = httpx.post(server.http + "/v1/completions", json=long, headers={"X-Request-Timeout": "soon"})
    assert error_of(bad, 400)["param"] == "X-Request-Timeout"
