"""Property-based fuzzing of every gRPC method of quiver.v1 (GenerationService, AdapterService) on one real server.

Why: whatever a client sends must be served or refused as the client's mistake (INVALID_ARGUMENT, NOT_FOUND,
FAILED_PRECONDITION, RESOURCE_EXHAUSTED...), never INTERNAL or UNKNOWN (a bug), a hang, or a change to what others
are answered. Hand-written tests cover the rules we thought of; this covers the inputs we did not. Requests are
built from the message descriptors, so a field added to a proto is fuzzed without touching this file: every field,
nested messages, each oneof member, values at the edges (2**32-1, NaN, megabyte, control-character and non-ASCII
strings, names like `../x`, templates with braces and Jinja, 100,000-entry repeated fields), plus raw bytes no stub
sends: invalid UTF-8 in string fields, garbage as a whole message. Beside the HTTP tests, for their fixtures (a tiny
Llama, three adapters). Derandomized: CI runs the same ~2,900 examples each time; the last test checks health, the
base model's greedy output against the one taken before fuzzing, the fixture adapters, and the server's error log.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from logging.handlers import BufferingHandler
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quiver.adapters.names import encode_page_token, parse_ref
from quiver.common.errors import InvalidArgument
from quiver.v1 import adapters_pb2 as apb
from quiver.v1 import adapters_pb2_grpc as apb_grpc
from quiver.v1 import generation_pb2 as pb
from quiver.v1 import generation_pb2_grpc as pb_grpc

from .conftest import ADAPTERS, ADMIN, start

TIMEOUT = 10.0  # a call still running after this is a hang
FAILURES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}
# Small limits keep a valid generation to milliseconds on a CPU, so examples go to inputs, not to decoding.
ENGINE = {"max_new_tokens_limit": 64, "default_max_new_tokens": 8}
MAX_WIRE = 3_000_000  # bytes of one repeated field (the server takes messages of up to 4 MiB)
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=list(HealthCheck))
EXAMPLES = {"RegisterAdapter": 400, "ImportAdapter": 300, "Generate": 600, "GenerateStream": 400, "ModelInfo": 20,
            "ListAdapters": 200, "GetAdapter": 200, "DeleteAdapter": 200, "raw": 600}
MIN_TOTAL = 1_000


HOSTILE = ["", " ", "w1 w2 w3", "../x", "a@b@c", "%2e%2e", "..", ".", "/", "lora", "lora@1", "lora@0", "lora@01",
           "lora@2147483648", "prompt@1", "prefix@2", "LORA", "lora\n", " lora", "lor\u0430", "\x00", "a\x00b",
           "\r\n\t\x1b[31m", "\u202e\u200b\ufeff", "\ufffd", "\U0001d518\U0001d52b", "{input}", "{", "}", "{}", "{0}",
           "{input!r}", "{input:>9}", "{{input}}", "{input}{input}", "{% for m in messages %}{{ m }}{% endfor %}",
           "{{ self.__init__.__globals__ }}", "{# x #}", "<s>", "</s>", "<unk>", "/etc/passwd", "C:\\x", "~", "$HOME",
           "NaN", "-1", "1e999", "after:lora", "YWZ0ZXI6bG9yYQ==",  # and megabytes; the last is past the 4 MiB limit
           "w1 " * 10_000, "x" * 1_000_000, "\u00e9" * 200_000, "{input}" * 10_000, "\x00" * 10_000, "y" * 5_000_000]
WORDS = st.lists(st.integers(0, 260), min_size=1, max_size=12).map(lambda ids: " ".join(f"w{i}" for i in ids))
TEXT = st.one_of(st.sampled_from(HOSTILE), st.text(st.characters(codec="utf-8"), max_size=40),
                 st.text(st.characters(max_codepoint=0x7F), max_size=40), WORDS)


def _ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = (lo, -(2**31), -1, 0, 1, 2, 8, 16, 20, 21, 64, 65, 255, 256, 4095, 4096, 2**31 - 1, 2**31, 2**32 - 1,
             2**63 - 1, hi)
    return st.one_of(st.sampled_from(sorted({v for v in edges if lo <= v <= hi})), st.integers(lo, hi))


U32 = _ints(0, 2**32 - 1)
INT32 = _ints(-(2**31), 2**31 - 1)
FLOATS = st.one_of(st.sampled_from([0.0, -0.0, 1e-6, 1e-5, 0.01, 0.5, 1.0, 2.0, 100.0, 101.0, -1.0, math.nan,
                                    math.inf, -math.inf, 3.4e38, 1e-45]), st.floats(width=32))
SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_UINT32: U32, FieldDescriptor.TYPE_INT32: INT32,
    FieldDescriptor.TYPE_UINT64: _ints(0, 2**64 - 1), FieldDescriptor.TYPE_INT64: _ints(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_FLOAT: FLOATS, FieldDescriptor.TYPE_DOUBLE: FLOATS, FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_STRING: TEXT, FieldDescriptor.TYPE_BYTES: st.binary(max_size=64),
}
Overrides = Mapping[str, st.SearchStrategy[Any]]


@dataclass(frozen=True)
class _Plan:
    """How one message is drawn: its fields' strategies by path, and which fields a sane message always sets."""

    wild: Overrides
    sane: Overrides
    tame: bool  # sane strategies where given, but for `loose`
    loose: str | None

    def pick(self, path: str) -> st.SearchStrategy[Any] | None:
        return self.sane[path] if self.tame and path in self.sane and path != self.loose else self.wild.get(path)

    def required(self, path: str) -> bool:
        return self.tame and any(p == path or p.startswith(path + ".") for p in self.sane if p != self.loose)


def _value(draw: st.DrawFn, f: FieldDescriptor, path: str, plan: _Plan) -> Any:
    if (given := plan.pick(path)) is not None:
        return draw(given)
    if f.message_type is not None:
        return _fill(draw, f.message_type, path + ".", plan)
    if f.type == FieldDescriptor.TYPE_ENUM:
        return draw(st.one_of(st.sampled_from([v.number for v in f.enum_type.values]), INT32))
    return draw(SCALARS[f.type])


def _fill(draw: st.DrawFn, desc: Descriptor, prefix: str, plan: _Plan) -> Message:
    """A message of `desc`: each field set or not, at most one member of each oneof (exactly one when tame); a
    repeated field has 0-4 entries or, when wild, now and then 1,000 or 100,000."""
    message = GetMessageClass(desc)()
    groups = [list(o.fields) for o in desc.oneofs if len(o.fields) > 1]  # one-field oneofs are proto3 `optional`
    grouped = {f.name for g in groups for f in g}
    chosen = [f for g in groups if (f := draw(st.sampled_from(g if plan.tame else [None, *g]))) is not None]
    for f in [f for f in desc.fields if f.name not in grouped and (plan.required(prefix + f.name)
                                                                   or draw(st.booleans()))] + chosen:
        path = prefix + f.name
        if not f.is_repeated:
            value = _value(draw, f, path, plan)
            if f.message_type is not None:
                getattr(message, f.name).CopyFrom(value)
            else:
                setattr(message, f.name, value)
        elif not plan.tame and not draw(st.integers(0, 9)):  # one entry, repeated up to the wire's limit
            entry = _value(draw, f, path, plan)
            count = min(draw(st.sampled_from([1_000, 100_000])), MAX_WIRE // (len(repr(entry)) + 2))  # repr >= wire
            getattr(message, f.name).extend([entry] * count)
        else:
            getattr(message, f.name).extend(_value(draw, f, path, plan) for _ in range(draw(st.integers(0, 4))))
    return message


def messages(desc: Descriptor, wild: Overrides = {}, sane: Overrides = {},  # noqa: B006
             modes: tuple[str, ...] = ("sane", "one", "wild")) -> st.SearchStrategy[Message]:
    """Messages of `desc`, every field fuzzed (nested, oneofs, repeated), in one of `modes`: wild everywhere (`wild`
    strategies by dotted path, e.g. "stopping.max_new_tokens", else by type), sane (`sane` strategies) but for one
    field, or sane throughout: a request that fails one rule reaches the rules behind it."""

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        mode = draw(st.sampled_from(modes))
        loose = draw(st.sampled_from(sorted(sane))) if mode == "one" and sane else None
        return _fill(draw, desc, "", _Plan(wild, sane, mode != "wild", loose))

    return build()


def _guarded(ref: str) -> str:
    """A reference for an admin call that cannot touch the fixture adapters: their names move to `fz-<name>`."""
    with contextlib.suppress(InvalidArgument):
        return "fz-" + ref if parse_ref(ref).name in ADAPTERS else ref
    return ref


FZ_NAMES = st.one_of(st.sampled_from(["fz", "fz-a", "fz-b"]), st.from_regex(r"fz[a-z0-9._-]{0,8}", fullmatch=True))
FZ_REFS = st.one_of(FZ_NAMES, st.sampled_from(["fz-a@1", "fz-a@2", "fz-b@1", "fz@3"]))
REFS = st.one_of(st.sampled_from(["", *ADAPTERS, "lora@1", "prompt@1", "prefix@1", "lora@2"]), FZ_REFS, TEXT)
ADMIN_REFS = st.one_of(FZ_REFS, TEXT).map(_guarded)
TEMPLATES = st.sampled_from(["{input}", "Q: {input} A:", "w1 {input} w2", "{{ {input} }}", "{input}\x00",
                             "{% raw %}{input}{% endraw %}", "<s>{input}</s>", "w1 " * 20_000 + "{input}"])
WILD_GENERATE = {"adapter": REFS, "text": st.one_of(WORDS, TEXT), "tokens.ids": st.one_of(st.integers(0, 255), U32),
                 "chat.messages.role": st.one_of(st.sampled_from(["user", "system", "assistant", "tool"]), TEXT),
                 "chat.messages.content": st.one_of(WORDS, TEXT)}
SANE_GENERATE = {
    "adapter": st.sampled_from(["", "fz", *ADAPTERS, "lora@1", "fz-a", "fz-b", "fz@1", "fz@2"]), "text": WORDS,
    "tokens.ids": st.integers(0, 255), "chat.messages.role": st.sampled_from(["user", "system", "assistant"]),
    "chat.messages.content": WORDS, "sampling.temperature": st.floats(0, 2, width=32),
    "sampling.top_p": st.floats(0.0625, 1, width=32), "sampling.top_k": st.integers(0, 300),
    "sampling.repetition_penalty": st.floats(0.5, 2, width=32), "stopping.max_new_tokens": st.integers(1, 8),
    "stopping.stop_sequences": st.sampled_from(["w1", "w2 w3", "\n", "\u00e9"]), "logprobs": st.integers(0, 20),
    "prompt_logprobs": st.integers(0, 20),
}
WILD_OPTIONS = {"name": ADMIN_REFS, "prompt_template": st.one_of(TEMPLATES, TEXT)}
SANE_OPTIONS = {"name": FZ_NAMES, "prompt_template": TEMPLATES, "mode": st.sampled_from([0, 1, 2]),
                "description": WORDS}


def _prefixed(prefix: str, overrides: Overrides) -> Overrides:
    return {prefix + path: strategy for path, strategy in overrides.items()}


FILE_NAMES = st.one_of(st.sampled_from(["adapter_config.json", "adapter_model.safetensors", "README.md", "../x",
                                        ".hidden", "a/b", "", "x" * 129, "adapter_model.bin", "\u00e9.json"]), TEXT)
EXTREMES = [1e30, 3.4e38, 1e300, 2**70, 2**31, 0, -1, 1e-30, 0.5, 10**6]  # for a config's numbers
CONFIG_KEYS = ("lora_alpha", "r", "target_modules", "peft_type", "task_type", "num_virtual_tokens", "token_dim",
               "num_layers", "num_attention_heads", "encoder_hidden_size", "prefix_projection", "use_rslora",
               "layers_to_transform", "rank_pattern", "alpha_pattern", "modules_to_save", "bias", "use_dora",
               "prompt_template", "base_model_name_or_path")
JSON = st.recursive(st.none() | st.booleans() | _ints(-(2**70), 2**70) | FLOATS | TEXT,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=6)


def _mutations(name: str, data: bytes) -> st.SearchStrategy[bytes]:
    """`data` cut, bit-flipped, replaced, or (a JSON file) with one key set to any JSON value or removed."""
    flip = st.tuples(st.integers(0, max(len(data) - 1, 0)), st.integers(1, 255)).map(
        lambda t: data[: t[0]] + bytes([data[t[0]] ^ t[1]]) + data[t[0] + 1:] if data else data)
    found = [st.integers(0, len(data)).map(lambda n: data[:n]), flip, st.binary(max_size=64)]
    if name.endswith(".json"):
        doc = json.loads(data)
        keys = st.sampled_from(sorted({*doc, *CONFIG_KEYS}))
        edited = st.one_of(st.tuples(keys, JSON).map(lambda kv: {**doc, kv[0]: kv[1]}),
                           keys.map(lambda key: {k: v for k, v in doc.items() if k != key}))
        found += [edited.map(lambda d: json.dumps(d, allow_nan=True).encode())] * 3
    return st.one_of(*found)


@st.composite
def uploads(draw: st.DrawFn, files: dict[str, dict[str, bytes]]) -> list[Message]:
    """A RegisterAdapter stream: options (usually first), then one fixture adapter's files in chunks: all intact,
    a number of its config at an extreme, one file damaged (cut, flipped, edited, renamed, left out), or any
    damaged; now and then a stray message inside."""
    stream: list[Message] = []
    if draw(st.sampled_from([True, True, True, False])):
        modes = ("sane", "sane", "one", "wild")
        options = messages(apb.RegistrationOptions.DESCRIPTOR, WILD_OPTIONS, SANE_OPTIONS, modes)
        stream.append(apb.RegisterAdapterRequest(options=draw(options)))
    adapter = files[draw(st.sampled_from(sorted(files)))]
    mode = draw(st.sampled_from(["intact", "config", "one", "any"]))
    damaged = draw(st.sampled_from(sorted(adapter))) if mode == "one" else None
    for name, data in adapter.items():
        if mode == "config" and name == "adapter_config.json":  # one of its numbers (r, lora_alpha...) at an extreme
            doc = json.loads(data)
            key = draw(st.sampled_from(sorted(k for k, v in doc.items() if type(v) in (int, float))))
            data = json.dumps({**doc, key: draw(st.sampled_from(EXTREMES))}).encode()
        elif mode == "any" or name == damaged:
            if draw(st.sampled_from([False, False, False, True])):
                continue
            data = draw(st.one_of(st.just(data), _mutations(name, data)))
            name = draw(st.one_of(st.just(name), FILE_NAMES))
        step = max(1, -(-len(data) // draw(st.integers(1, 3))))
        stream.extend(apb.RegisterAdapterRequest(chunk=apb.FileChunk(file_name=name, data=data[i:i + step]))
                      for i in range(0, max(len(data), 1), step))
    strays = messages(apb.RegisterAdapterRequest.DESCRIPTOR,
                      {"chunk.file_name": FILE_NAMES, **_prefixed("options.", WILD_OPTIONS)})
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        stream.insert(draw(st.integers(0, len(stream))), draw(strays))
    return stream


def _paths(root: Path) -> tuple[st.SearchStrategy[str], st.SearchStrategy[str]]:
    """Adapter directories (sane: the fixtures' or a fixed hostile one; wild: also any text, in the root or not)."""
    r = str(root)
    fixed = st.sampled_from([f"{r}/" + "a" * 300, f"{r}/" + "a/" * 3000, f"{r}/lora/adapter_config.json", r, f"{r}/",
                             f"{r}/../..", f"{r}/lora/..", f"{r}/nope", f"{r}//lora", f"{r}/lora/../prompt",
                             f"{r}/lora\x00", f"{r}/%2e%2e", "lora", "", "/", "/etc", "/proc/self/root", "/dev/null"])
    sane = st.one_of(fixed, st.sampled_from([f"{r}/{kind}" for kind in ADAPTERS]))
    return sane, st.one_of(sane, TEXT, TEXT.map(lambda t: f"{r}/{t}"))


PAGE_TOKENS = st.one_of(st.sampled_from([encode_page_token(n) for n in ("fz", "lora", "a", "zzz")]), TEXT,
                        st.binary(max_size=40).map(lambda b: base64.urlsafe_b64encode(b"after:" + b).decode()))


def _varint(n: int) -> bytes:
    groups = range(max(1, -(-n.bit_length() // 7)))  # 7 bits each, low first, the high bit set on all but the last
    return bytes((n >> 7 * i & 0x7F) | (0x80 if n >> 7 * (i + 1) else 0) for i in groups)


def _wrap(path: tuple[int, ...], payload: bytes) -> bytes:
    """`payload` as the length-delimited field at `path` (field numbers, outermost first)."""
    for number in reversed(path):
        payload = _varint(number << 3 | 2) + _varint(len(payload)) + payload
    return payload


def _string_paths(desc: Descriptor, prefix: tuple[int, ...] = ()) -> list[tuple[int, ...]]:
    out = []
    for f in desc.fields:
        if f.type == FieldDescriptor.TYPE_STRING:
            out.append((*prefix, f.number))
        elif f.message_type is not None and len(prefix) < 3:
            out.extend(_string_paths(f.message_type, (*prefix, f.number)))
    return out


# (full name, input message, client streams, server streams) of every method of both services.
Method = tuple[str, Descriptor, bool, bool]
METHODS: list[Method] = [(f"/{s.full_name}/{m.name}", m.input_type, m.client_streaming, m.server_streaming)
                         for file in (pb.DESCRIPTOR, apb.DESCRIPTOR) for s in file.services_by_name.values()
                         for m in s.methods]
BAD_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf4\x90\x80\x80", b"\xc0\xaf",
            b"w1 \x80 w2", b"\xe2\x82", b"lora\xff", b"\xfe\xfe\xff\xff"]
WIRE_JUNK = [b"\x08", b"\x08\xff", b"\x12\xff\xff\xff\xff\x0f", b"\x0b" * 200, b"\x0c", b"\x0f", b"\x12\x05ab",
             b"\xff" * 10 + b"\x01", b"\x1d\x00\x00", _wrap((3,) * 150, b""), b"\x22\x02\x0d\x00\x2a\x02\x08\x00"]


def _wire(method: Method) -> st.SearchStrategy[bytes]:
    """Bytes for `method`: garbage, a wire-level trap, or a valid message with invalid UTF-8 in a string field."""
    valid = messages(method[1]).map(lambda m: m.SerializeToString())
    found = [st.binary(max_size=256), st.sampled_from(WIRE_JUNK), st.tuples(valid, st.sampled_from(WIRE_JUNK))
             .map(b"".join)]
    if paths := _string_paths(method[1]):
        bad = st.one_of(st.sampled_from(BAD_UTF8), st.binary(min_size=1, max_size=16))
        found.append(st.tuples(valid, st.sampled_from(paths), bad).map(lambda t: t[0] + _wrap(t[1], t[2])))
    return st.one_of(*found)


RAW = st.sampled_from(METHODS).flatmap(lambda m: st.tuples(st.just(m), st.lists(_wire(m), min_size=1, max_size=3)))


@dataclass
class Fuzz:
    """The server under fuzz, what it served before any fuzzing, the errors it logged, examples run per test."""

    channel: grpc.Channel
    files: dict[str, dict[str, bytes]]  # each fixture adapter's files
    import_root: Path
    before: list[bytes]  # what `_served` gave before any fuzzing
    log: BufferingHandler  # the server's ERROR records (it runs in this process), in `log.buffer`
    codes: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    seconds: dict[str, float] = field(default_factory=dict)

    def call(self, test: str, call: Callable[[], Any], what: object) -> None:
        """Run one call (draining a stream); fail on a forbidden status, quoting the server's last logged error."""
        try:
            result = call()
            for _ in result if isinstance(result, Iterator) else ():
                pass
            self.codes[test]["OK"] += 1
        except grpc.RpcError as e:
            code, details = e.code(), e.details()  # type: ignore[attr-defined]
            self.codes[test][code.name] += 1
            if code in FAILURES:
                logged = self.log.buffer[-1].getMessage() if self.log.buffer else "nothing logged"
                raise AssertionError(f"{code} ({details}) for {repr(what)[:1500]}; server log: {logged}") from None

    def run(self, test: str, fuzzer: Callable[[], None]) -> None:
        started = time.perf_counter()
        fuzzer()
        self.seconds[test] = time.perf_counter() - started
        print(f"gRPC fuzz {test}: {self.codes[test].total()} examples in {self.seconds[test]:.1f} s",
              dict(self.codes[test].most_common()))


def _served(channel: grpc.Channel) -> list[bytes]:
    """What must not change: the base model's greedy answer to a fixed prompt, and each fixture adapter's record."""
    request = pb.GenerateRequest(text="w1 w2 w3", sampling=pb.SamplingParameters(temperature=0),
                                 stopping=pb.StoppingCriteria(max_new_tokens=16))
    stub = apb_grpc.AdapterServiceStub(channel)
    return [pb_grpc.GenerationServiceStub(channel).Generate(request, timeout=TIMEOUT).SerializeToString(),
            *(stub.GetAdapter(apb.GetAdapterRequest(adapter=a), timeout=TIMEOUT).SerializeToString() for a in ADAPTERS)]


@pytest.fixture(scope="module")
def fuzz(loaded: Any, adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzz]:
    """One server (admin token set) for the module; its base output and fixture adapters recorded before fuzzing."""
    server = start(loaded, tmp_path_factory.mktemp("fuzz-store"), adapter_dirs, engine=ENGINE)
    log = BufferingHandler(capacity=10**6)
    log.setLevel(logging.ERROR)
    logging.getLogger().addHandler(log)
    files = {kind: {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}
             for kind, d in adapter_dirs.items()}
    try:
        with grpc.insecure_channel(server.target) as channel:
            yield Fuzz(channel, files, next(iter(adapter_dirs.values())).parent, _served(channel), log)
    finally:
        logging.getLogger().removeHandler(log)
        server.close()


Case = tuple[st.SearchStrategy[Any], Callable[..., Any]]


def _register_then_generate(adapters: Any, generation: Any) -> Callable[..., Any]:
    """RegisterAdapter, then a short generation with what it registered (whatever registration accepts must be
    served, or refused as a client error), then its deletion: a replayed example finds the store as it was."""
    def call(stream: list[Message], **kw: Any) -> Any:
        info = adapters.RegisterAdapter(iter(stream), **kw).adapter
        ref = f"{info.name}@{info.version}"
        try:
            return generation.Generate(pb.GenerateRequest(adapter=ref, text="w1 w2", stopping=pb.StoppingCriteria(
                max_new_tokens=2)), **kw)
        finally:
            adapters.DeleteAdapter(apb.DeleteAdapterRequest(adapter=ref), **kw)

    return call


# In this order: adapters registered (some with odd templates or configs) are then generated with, listed, deleted.
CASES: dict[str, Callable[[Fuzz, Any, Any], Case]] = {
    "RegisterAdapter": lambda f, g, a: (uploads(f.files), _register_then_generate(a, g)),
    "ImportAdapter": lambda f, g, a: (messages(
        apb.ImportAdapterRequest.DESCRIPTOR, {"path": _paths(f.import_root)[1], **_prefixed("options.", WILD_OPTIONS)},
        {"path": _paths(f.import_root)[0], **_prefixed("options.", SANE_OPTIONS)}), a.ImportAdapter),
    "Generate": lambda f, g, a: (messages(pb.GenerateRequest.DESCRIPTOR, WILD_GENERATE, SANE_GENERATE), g.Generate),
    "GenerateStream": lambda f, g, a: (messages(pb.GenerateStreamRequest.DESCRIPTOR, WILD_GENERATE, SANE_GENERATE),
                                       g.GenerateStream),
    "ModelInfo": lambda f, g, a: (messages(pb.ModelInfoRequest.DESCRIPTOR), g.ModelInfo),
    "ListAdapters": lambda f, g, a: (messages(apb.ListAdaptersRequest.DESCRIPTOR, {"page_token": PAGE_TOKENS}, {
        "page_size": st.integers(0, 1000)}), a.ListAdapters),
    "GetAdapter": lambda f, g, a: (messages(apb.GetAdapterRequest.DESCRIPTOR, {"adapter": REFS}), a.GetAdapter),
    "DeleteAdapter": lambda f, g, a: (messages(apb.DeleteAdapterRequest.DESCRIPTOR, {"adapter": ADMIN_REFS}, {
        "adapter": FZ_REFS}), a.DeleteAdapter),
}
TOKENS = st.sampled_from([ADMIN] * 6 + [None, "wrong"])


@pytest.mark.parametrize("rpc", list(CASES))
def test_rpc(fuzz: Fuzz, rpc: str) -> None:
    """Each RPC through its typed stub, with the admin token, none, or a wrong one."""
    strategy, method = CASES[rpc](fuzz, pb_grpc.GenerationServiceStub(fuzz.channel),
                                  apb_grpc.AdapterServiceStub(fuzz.channel))

    @settings(FUZZ, max_examples=EXAMPLES[rpc])
    @given(strategy, TOKENS)
    def one(request: Any, token: str | None) -> None:
        metadata = () if token is None else (("authorization", f"Bearer {token}"),)
        fuzz.call(rpc, lambda: method(request, timeout=TIMEOUT, metadata=metadata), request)

    fuzz.run(rpc, one)


def test_raw_bytes(fuzz: Fuzz) -> None:
    """Every method with bytes no typed stub would send: what cannot be parsed is the client's error too."""

    @settings(FUZZ, max_examples=EXAMPLES["raw"])
    @given(RAW)
    def one(case: tuple[Method, list[bytes]]) -> None:
        (path, _, client_streams, server_streams), payloads = case
        kind = "stream_unary" if client_streams else "unary_stream" if server_streams else "unary_unary"
        request = iter(payloads) if client_streams else payloads[0]  # no serializers: bytes go out as they are
        metadata = (("authorization", f"Bearer {ADMIN}"),)
        fuzz.call("raw", lambda: getattr(fuzz.channel, kind)(path)(request, timeout=TIMEOUT, metadata=metadata), case)

    fuzz.run("raw", one)


def test_zz_server_unharmed_after_fuzzing(fuzz: Fuzz) -> None:
    """Last in the module (pytest runs tests in file order): the server still serves, answers the base prompt byte
    for byte as before any fuzzing, keeps the fixture adapters, and logged no error along the way."""
    health = health_pb2_grpc.HealthStub(fuzz.channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert _served(fuzz.channel) == fuzz.before
    assert not fuzz.log.buffer, "\n".join(r.getMessage() for r in fuzz.log.buffer[:5])
    total = sum(c.total() for c in fuzz.codes.values())
    print(f"gRPC fuzz: {total} examples in {sum(fuzz.seconds.values()):.1f} s")
    if len(fuzz.codes) == len(EXAMPLES):  # the whole module ran
        assert total >= MIN_TOTAL
