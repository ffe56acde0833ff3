"""Property-based fuzzing of every HTTP route (OpenAI's /v1 routes, vLLM's adapter routes, anything else) on one real
server.

Why: an OpenAI-compatible front faces clients we do not write. Whatever they send must be answered as their mistake
(a 4xx with OpenAI's error body, which their SDKs parse) or served, never a 500 (a bug), a hang, or a change to what
others are answered. Bodies are built from the request models of server/http/schema.py, so a field added there is
fuzzed without touching this file: each field sane, missing or of any JSON type (NaN and Infinity tokens, 2**70,
nested objects, 100,000-entry arrays), then sent as JSON or as what a broken client sends instead (invalid UTF-8,
deep nesting, a byte-order mark, UTF-16, truncated JSON, bytes, form data, more than the body cap), under any
content type, with or without credentials, also to unknown paths and with unknown methods.

Beside the gRPC fuzzing, in the package whose fixtures (the tiny Llama, its three adapters) both reuse. Examples are
derandomized, so CI runs the same ~1,300 every time; the last test checks readiness, the base model's greedy output
against the one taken before any fuzzing, the fixture adapters, and that no server error was logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from logging.handlers import BufferingHandler
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from quiver.adapters.names import parse_ref
from quiver.common.errors import InvalidArgument
from quiver.server.http.schema import (
    ChatCompletionRequest,
    ClassifyRequest,
    CompletionRequest,
    EmbeddingRequest,
    LoadLoraRequest,
    UnloadLoraRequest,
)

from .conftest import ADAPTERS, ADMIN, BASE_ID, start

KEY = "key-fuzz"
TIMEOUT = 10.0  # a request still unanswered after this is a hang
# Small limits keep a valid generation to milliseconds on a CPU, so examples go to inputs, not to decoding.
ENGINE = {"max_new_tokens_limit": 64, "default_max_new_tokens": 8}
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=list(HealthCheck))
# ~1,300 examples: every HTTP response now waits ~40 ms for a delayed ACK (the listening socket lacks TCP_NODELAY),
# which is most of this module's time; at ~1 ms a response these can triple within the same budget.
EXAMPLES = {"load": 150, "completions": 320, "chat": 320, "embeddings": 160, "classify": 100, "models": 120,
            "unload": 90, "anything": 300}
MIN_TOTAL = 1_000
MARK = "\x01MARK\x01"  # a string value the encoder replaces with raw bytes (json.dumps writes it as below)
MARK_JSON = json.dumps(MARK).encode()


HOSTILE = ["", " ", "w1 w2 w3", "../x", "a@b@c", "%2e%2e", "..", "lora", "lora@1", "lora@0", "lora@01", "LORA",
           "lora\n", "lor\u0430", "\x00", "a\x00b", "\r\n\t\x1b[31m", "\u202e\u200b\ufeff", "\ufffd", "\U0001d518",
           "{input}", "{", "}", "{0}", "{{input}}", "{% for m in messages %}{{ m }}{% endfor %}", "<s>", "</s>",
           "/etc/passwd", "NaN", "-1", "1e999", "text", "user", "tiny", "tiny@1", "gpt-4o/mini", "\ud800"]
# Megabyte strings and 100,000-entry arrays stand in bodies as short placeholders that `encoded` swaps for their
# JSON, written once here: hypothesis re-draws examples many times, and encoding them each time would cost minutes.
BIG = {f"\x01big{i}\x01": json.dumps(value, ensure_ascii=False).encode() for i, value in enumerate([
    "w1 " * 10_000, "x" * 1_000_000, "\u00e9" * 100_000, [1] * 100_000, ["w1"] * 100_000,
    [{"role": "user", "content": "w1"}] * 20_000, {f"k{i}": i for i in range(50_000)}, [[1] * 100] * 1_000])}
WORDS = st.lists(st.integers(0, 260), min_size=1, max_size=12).map(lambda ids: " ".join(f"w{i}" for i in ids))
TEXT = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=40), WORDS, st.sampled_from(sorted(BIG)))
NUMBERS = st.one_of(st.sampled_from([0, -1, 1, 2, 20, 21, 64, 65, 128, 129, 2**31, 2**63, 2**64, 10**30, -(10**30),
                                     0.5, -0.0, 1e-6, 1e308, math.nan, math.inf, -math.inf, True]),
                    st.integers(), st.floats())
JSON = st.recursive(st.none() | st.booleans() | NUMBERS | TEXT,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=8)


def _guarded(value: Any) -> Any:
    """A `lora_name` that cannot touch the fixture adapters: their names move to `fz-<name>`."""
    with contextlib.suppress(InvalidArgument):
        return "fz-" + value if isinstance(value, str) and parse_ref(value).name in ADAPTERS else value
    return value


FZ_NAMES = st.one_of(st.sampled_from(["fz", "fz-a", "fz-b"]), st.from_regex(r"fz[a-z0-9._-]{0,8}", fullmatch=True))
MODELS = st.one_of(st.sampled_from([BASE_ID, *ADAPTERS, "lora@1", "prompt@1", "fz-a", "fz-b"]), TEXT)
SANE_MODELS = st.sampled_from([BASE_ID, BASE_ID, *ADAPTERS, "lora@1", "fz-a"])
IDS = st.lists(st.integers(0, 255), min_size=1, max_size=8)
SAMPLING = {
    "model": SANE_MODELS, "n": st.integers(1, 3), "temperature": st.floats(0, 2), "top_p": st.floats(0.05, 1),
    "seed": st.integers(0, 2**64 - 1), "stop": st.one_of(st.sampled_from(["w1", "\n"]), st.lists(WORDS, max_size=3)),
    "stream": st.booleans(), "user": WORDS, "top_k": st.integers(0, 300), "repetition_penalty": st.floats(0.5, 2),
    "ignore_eos": st.booleans(), "frequency_penalty": st.just(0), "presence_penalty": st.just(0.0),
    "logit_bias": st.just({}), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}
SANE_COMPLETION = {**SAMPLING, "max_tokens": st.integers(1, 8), "logprobs": st.integers(0, 5), "echo": st.booleans(),
                   "suffix": st.just(""), "prompt": st.one_of(WORDS, st.lists(WORDS, min_size=1, max_size=3), IDS,
                                                               st.lists(IDS, min_size=1, max_size=3))}
INPUTS = st.one_of(WORDS, st.lists(WORDS, min_size=1, max_size=3), IDS, st.lists(IDS, min_size=1, max_size=3))
SANE_EMBEDDINGS = {"model": SANE_MODELS, "input": INPUTS, "encoding_format": st.sampled_from(["float", "base64"]),
                   "user": WORDS, "pooling": st.sampled_from(["mean", "last"]), "normalize": st.booleans()}
SANE_CLASSIFY = {"model": SANE_MODELS, "input": INPUTS, "user": WORDS}
PARTS = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": WORDS}), min_size=1, max_size=2)
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer"]),
                                           "content": st.one_of(WORDS, PARTS)}), min_size=1, max_size=3)
SANE_CHAT = {**SAMPLING, "messages": MESSAGES, "max_tokens": st.integers(1, 8), "logprobs": st.booleans(),
             "max_completion_tokens": st.integers(1, 8), "top_logprobs": st.integers(0, 5),
             "response_format": st.just({"type": "text"}), "tool_choice": st.sampled_from(["none", "auto"]),
             "store": st.just(False), "metadata": st.dictionaries(WORDS, WORDS, max_size=2)}


def _paths(root: Path) -> tuple[st.SearchStrategy[str], st.SearchStrategy[str]]:
    """Adapter directories (sane: the fixtures' or a fixed hostile one; wild: also any text, in the root or not)."""
    r = str(root)
    fixed = st.sampled_from([f"{r}/" + "a" * 300, f"{r}/" + "a/" * 3000, f"{r}/lora/adapter_config.json", r,
                             f"{r}/../..", f"{r}/nope", f"{r}/lora\x00", "lora", "", "/", "/etc", "/dev/null"])
    sane = st.one_of(fixed, st.sampled_from([f"{r}/{kind}" for kind in ADAPTERS]))
    return sane, st.one_of(sane, TEXT, TEXT.map(lambda t: f"{r}/{t}"))


@st.composite
def objects(draw: st.DrawFn, model: type[BaseModel], sane: Mapping[str, st.SearchStrategy[Any]],
            wild: Mapping[str, st.SearchStrategy[Any]] = {}) -> dict[str, Any]:
    """A body for `model`: all sane (`sane` strategies, required fields always there), sane but for one field
    (missing or any JSON), or wild throughout (every field missing or any JSON, or from `wild`; unknown fields)."""
    fields = list(model.model_fields)
    mode = draw(st.sampled_from(["sane", "one", "wild"]))
    loose = draw(st.sampled_from(fields)) if mode == "one" else None
    body: dict[str, Any] = {}
    if mode != "wild":
        for name in fields:
            if name != loose and name in sane and (model.model_fields[name].is_required() or draw(st.booleans())):
                body[name] = draw(sane[name])
    wild_fields: list[str] = [loose] if loose else []
    if mode == "wild":
        wild_fields = draw(st.lists(st.sampled_from(fields), max_size=6, unique=True))
    for name in wild_fields:
        if draw(st.sampled_from([True, True, False])):  # else missing
            body[name] = draw(st.one_of(wild[name], JSON) if name in wild else JSON)
    if mode == "wild":
        body.update(draw(st.dictionaries(TEXT, JSON, max_size=2)))
    return body


ENCODINGS = ["json"] * 8 + ["bad-utf8", "deep", "huge", "truncated", "bom", "utf-16", "bytes", "empty",
             "form", "scalar"]
BAD_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"w1 \x80 w2"]


@st.composite
def encoded(draw: st.DrawFn, body: dict[str, Any]) -> bytes:
    """`body` as JSON (NaN and Infinity as tokens), or as a broken client would send it."""
    how = draw(st.sampled_from(ENCODINGS))
    if how in ("bad-utf8", "deep", "huge"):  # one field's value becomes raw bytes
        body = {**body, draw(st.sampled_from(sorted(body) or ["model"])): MARK}
    text = json.dumps(body, allow_nan=True).encode()
    for mark, value in BIG.items():
        text = text.replace(json.dumps(mark).encode(), value)
    if how == "bad-utf8":
        return text.replace(MARK_JSON, b'"w1 ' + draw(st.sampled_from(BAD_UTF8)) + b'"')
    if how == "deep":
        depth = draw(st.sampled_from([64, 1_000, 100_000]))
        return text.replace(MARK_JSON, draw(st.sampled_from([b"[", b'{"a":'])) * depth + b"1" + b"]" * depth)
    if how == "huge":  # a 5 MB body is past the server's 4 MiB cap: 413
        return text.replace(MARK_JSON, b"[" + b"1," * draw(st.sampled_from([100_000, 2_500_000])) + b"1]")
    variants = {"truncated": text[: draw(st.integers(0, max(len(text) - 1, 0)))], "bom": b"\xef\xbb\xbf" + text,
                "utf-16": text.decode(errors="replace").encode("utf-16"), "empty": b"",
                "bytes": draw(st.binary(max_size=64)), "form": b"model=tiny&prompt=w1",
                "scalar": draw(st.sampled_from([b"null", b"[]", b"1", b'"w1"', b"NaN", b"{}", b"[{}]"]))}
    return variants.get(how, text)


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    headers: dict[str, str]
    content: bytes | None
    chunked: bool = False  # sent without Content-Length, so only the server's running count can cap it

    def __repr__(self) -> str:
        body = self.content if self.content is None or len(self.content) < 600 else self.content[:600] + b"..."
        return f"Call({self.method} {self.path!r} headers={self.headers} chunked={self.chunked} body={body!r})"


AUTH = st.sampled_from([f"Bearer {ADMIN}"] * 7 + [f"Bearer {KEY}", f"bearer {KEY}", f"BEARER {ADMIN}", None,
                                                   "Bearer wrong", f"Basic {KEY}", "Bearer " + "x" * 5_000])
CONTENT_TYPES = st.sampled_from(["application/json", "application/json", None, "text/plain", "application/octet-stream",
                                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                 "application/json; charset=utf-16"])
TIMEOUTS = st.sampled_from([None, None, None, None, "5", "abc", "-1", "0", "nan", "inf", "1e309", "0.000001", ""])
HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300).map(lambda t: t.strip())


@st.composite
def calls(draw: st.DrawFn, method: str, path: str, body: st.SearchStrategy[dict[str, Any]] | None) -> Call:
    headers: dict[str, str] = {}
    for name, value in (("authorization", draw(AUTH)), ("content-type", draw(CONTENT_TYPES)),
                        ("x-request-timeout", draw(TIMEOUTS)), ("x-request-id", draw(st.none() | HEADER_TEXT))):
        if value:
            headers[name] = value
    if body is None:
        return Call(method, path, headers, None)
    return Call(method, path, headers, draw(body.flatmap(encoded)), draw(st.sampled_from([False, False, False, True])))


def _admin(model: type[BaseModel], sane: Mapping[str, st.SearchStrategy[Any]],
           wild: Mapping[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    guard = {"lora_name": _guarded}
    return objects(model, sane, wild).map(lambda body: {k: guard.get(k, lambda v: v)(v) for k, v in body.items()})


METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "FOO"]
PATHS = ["/", "/v1", "/v1/", "/v1/completions", "/v1/completions/", "/v1/chat/completions", "/v1//completions",
         "/v1/embeddings", "/v1/classify",
         "/v1/models", "/v1/models/", "/v1/models/lora", "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
         "/v1/nothing", "/%2e%2e/etc/passwd", "/v1/models/../completions", "/v1/models/%00", "/health", "/ready",
         "/metrics", "/docs", "/openapi.json", "/v1/completions?stream=true", "/" + "a" * 10_000, "/v1/\u00e9"]


def _quote(text: str, safe: str) -> str:
    return quote(text, safe=safe, errors="surrogatepass")  # a lone surrogate becomes invalid UTF-8 in the path


def _cases(root: Path) -> dict[str, st.SearchStrategy[Call]]:
    """Each route's calls; "anything" is any method on any path, known or not, with any body."""
    model_paths = st.one_of(MODELS.map(lambda m: _quote(m, "")), MODELS.map(lambda m: _quote(m, "/@")))
    paths = st.one_of(st.sampled_from(PATHS), TEXT.map(lambda t: "/" + _quote(t, "/")))
    anything = st.tuples(st.sampled_from(METHODS), paths)
    names = {"lora_name": st.one_of(FZ_NAMES, MODELS)}
    sane_path, wild_path = _paths(root)
    return {  # in this order: adapters loaded are then generated with, listed, unloaded
        "load": calls("POST", "/v1/load_lora_adapter", _admin(LoadLoraRequest, {
            "lora_name": FZ_NAMES, "lora_path": sane_path, "load_inplace": st.booleans()},
            {**names, "lora_path": wild_path})),
        "completions": calls("POST", "/v1/completions", objects(CompletionRequest, SANE_COMPLETION, {"model": MODELS})),
        "chat": calls("POST", "/v1/chat/completions", objects(ChatCompletionRequest, SANE_CHAT, {"model": MODELS})),
        "embeddings": calls("POST", "/v1/embeddings", objects(EmbeddingRequest, SANE_EMBEDDINGS, {"model": MODELS})),
        "classify": calls("POST", "/v1/classify", objects(ClassifyRequest, SANE_CLASSIFY, {"model": MODELS})),
        "models": st.one_of(calls("GET", "/v1/models", None),
                            model_paths.flatmap(lambda m: calls("GET", f"/v1/models/{m}", None))),
        "unload": calls("POST", "/v1/unload_lora_adapter", _admin(UnloadLoraRequest, {
            "lora_name": FZ_NAMES, "lora_int_id": st.integers(0, 9)}, names)),
        "anything": anything.flatmap(lambda mp: calls(mp[0], mp[1], objects(CompletionRequest, SANE_COMPLETION))),
    }


def _strict(raw: bytes) -> Any:
    """JSON as OpenAI's clients parse it: NaN and Infinity are not JSON."""
    def refuse(token: str) -> Any:
        raise ValueError(f"{token} is not JSON")

    return json.loads(raw, parse_constant=refuse)


UVICORN_REFUSAL = b"Invalid HTTP request received."


def _problem(call: Call, response: httpx.Response, raw: bytes) -> str | None:
    """What is wrong with `response` to `call`, if anything."""
    status, deadline = response.status_code, "x-request-timeout" in call.headers
    if status >= 500 and not (status == 504 and deadline):
        return f"status {status}: {raw[:300]!r}"
    kind = response.headers.get("content-type", "")
    if status == 400 and raw == UVICORN_REFUSAL:  # a request line h11/httptools cannot parse never reaches the app
        return None
    try:
        if status >= 400 and call.method != "HEAD":
            error = _strict(raw)["error"]
            if not (isinstance(error.get("message"), str) and error["message"] and isinstance(error.get("type"), str)
                    and {"param", "code"} <= set(error)):
                return f"status {status} without OpenAI's error shape: {raw[:300]!r}"
        elif kind.startswith("application/json") and call.method != "HEAD":
            _strict(raw)
        elif kind.startswith("text/event-stream"):
            for line in raw.decode().splitlines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    event = _strict(line[6:].encode())
                    if "error" in event and not (deadline and event["error"].get("code") == "deadline_exceeded"):
                        return f"an error event in a stream: {line[:300]}"
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"status {status}, {kind}, not as OpenAI's clients expect ({e}): {raw[:300]!r}"
    return None


@dataclass
class Fuzz:
    """The server under fuzz, what it served before any fuzzing, the errors it logged, examples run per test."""

    client: httpx.Client
    import_root: Path
    before: list[Any]  # what `_served` gave before any fuzzing
    log: BufferingHandler  # the server's ERROR records (it runs in this process), in `log.buffer`
    codes: dict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    seconds: dict[str, float] = field(default_factory=dict)

    def send(self, test: str, call: Call) -> None:
        """Send one call and read its whole answer (a stream to its end); fail on a 500, a hang, or a wrong shape."""
        try:
            content = iter([call.content]) if call.chunked and call.content is not None else call.content
            with self.client.stream(call.method, call.path, headers=call.headers, content=content) as response:
                raw = response.read()
        except httpx.TimeoutException:
            raise AssertionError(f"no answer within {TIMEOUT} s to {call!r}") from None
        self.codes[test][response.status_code] += 1
        if (problem := _problem(call, response, raw)) is not None:
            logged = self.log.buffer[-1].getMessage() if self.log.buffer else "nothing logged"
            raise AssertionError(f"{problem} for {call!r}; server log: {logged}")

    def run(self, test: str, fuzzer: Any) -> None:
        started = time.perf_counter()
        fuzzer()
        self.seconds[test] = time.perf_counter() - started
        print(f"HTTP fuzz {test}: {self.codes[test].total()} examples in {self.seconds[test]:.1f} s",
              dict(self.codes[test].most_common()))


AUTH_KEY = {"authorization": f"Bearer {KEY}"}


def _served(client: httpx.Client) -> list[Any]:
    """What must not change: the base model's greedy answer to a fixed prompt (its choices, text byte for byte, and
    usage), and each fixture adapter's model object."""
    body = {"model": BASE_ID, "prompt": "w1 w2 w3", "max_tokens": 16, "temperature": 0}
    reply = client.post("/v1/completions", json=body, headers=AUTH_KEY).raise_for_status().json()
    return [reply["choices"], reply["usage"],
            *(client.get(f"/v1/models/{name}", headers=AUTH_KEY).raise_for_status().json() for name in ADAPTERS)]


@pytest.fixture(scope="module")
def fuzz(loaded: Any, adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzz]:
    """One server (API key and admin token set) for the module, what it serves recorded before fuzzing."""
    server = start(loaded, tmp_path_factory.mktemp("fuzz-store"), adapter_dirs, engine=ENGINE, api_key=KEY)
    log = BufferingHandler(capacity=10**6)
    log.setLevel(logging.ERROR)
    logging.getLogger().addHandler(log)
    try:
        with httpx.Client(base_url=server.http, timeout=TIMEOUT) as client:
            yield Fuzz(client, next(iter(adapter_dirs.values())).parent, _served(client), log)
    finally:
        logging.getLogger().removeHandler(log)
        server.close()


@pytest.mark.parametrize("case", list(EXAMPLES))
def test_route(fuzz: Fuzz, case: str) -> None:
    """Each route with sane, half-sane and wild bodies, any encoding, content type and credentials."""

    @settings(FUZZ, max_examples=EXAMPLES[case])
    @given(_cases(fuzz.import_root)[case])
    def one(call: Call) -> None:
        fuzz.send(case, call)

    fuzz.run(case, one)


def test_zz_server_unharmed_after_fuzzing(fuzz: Fuzz) -> None:
    """Last in the module (pytest runs tests in file order): the server is ready, answers the base prompt byte for
    byte as before any fuzzing, keeps the fixture adapters, and logged no error along the way."""
    assert fuzz.client.get("/ready").status_code == 200
    assert fuzz.client.get("/health").status_code == 200
    assert _served(fuzz.client) == fuzz.before
    assert not fuzz.log.buffer, "\n".join(r.getMessage() for r in fuzz.log.buffer[:5])
    total = sum(c.total() for c in fuzz.codes.values())
    print(f"HTTP fuzz: {total} examples in {sum(fuzz.seconds.values()):.1f} s")
    if len(fuzz.codes) == len(EXAMPLES):  # the whole module ran
        assert total >= MIN_TOTAL
