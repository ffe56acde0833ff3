"""`quiver generate` and `quiver info` against the fake in-process GenerationService."""

from __future__ import annotations

import argparse
import io
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from quiver.clients.cli import generate, info, main

from .fake_server import MISSING_ADAPTER, FakeServer

# The client subcommands, registered as quiver.clients.cli registers them, without `serve` (and torch).
COMMANDS = {"generate": generate, "info": info}


@pytest.fixture(scope="module")
def server() -> Iterator[FakeServer]:
    with FakeServer() as srv:
        yield srv


@pytest.fixture
def fake(server: FakeServer) -> FakeServer:
    server.servicer.reset()
    return server


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="quiver")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        command = sub.add_parser(name, help=module.HELP)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    code: int = args._run(args)
    return code


def unused_target() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def last_request(fake: FakeServer) -> Any:
    return fake.servicer.calls[-1].request


# --- quiver generate ----------------------------------------------------------------------------------


def test_generate_prints_only_the_text(fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("generate", "--server", fake.target, "hello") == 0
    assert capsys.readouterr() == ("olleh\n", "")
    assert fake.servicer.calls[-1].method == "Generate"


def test_generate_is_greedy_and_leaves_the_rest_to_the_server(fake: FakeServer) -> None:
    cli("generate", "--server", fake.target, "hello")
    request = last_request(fake)
    assert request.WhichOneof("input") == "text" and request.text == "hello"
    assert request.adapter == ""
    assert [f.name for f, _ in request.sampling.ListFields()] == ["temperature"]
    assert request.sampling.temperature == 0
    assert not request.HasField("stopping")


def test_generate_flags_map_onto_the_request(fake: FakeServer) -> None:
    flags = ["--adapter", "summarize", "--max-new-tokens", "9", "--temperature", "0.7", "--top-p", "0.5"]
    flags += ["--top-k", "4", "--repetition-penalty", "1.2", "--seed", "7", "--stop", "a", "--stop", "END"]
    assert cli("generate", "--server", fake.target, *flags, "hello") == 0
    request = last_request(fake)
    assert request.adapter == "summarize"
    s = request.sampling
    assert (s.temperature, s.top_p, s.repetition_penalty) == pytest.approx((0.7, 0.5, 1.2))
    assert (s.top_k, s.seed) == (4, 7)
    assert request.stopping.max_new_tokens == 9
    assert list(request.stopping.stop_sequences) == ["a", "END"]


def test_generate_chat_sends_one_user_message(fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("generate", "--server", fake.target, "--chat", "hi there") == 0
    request = last_request(fake)
    assert request.WhichOneof("input") == "chat"
    assert [(m.role, m.content) for m in request.chat.messages] == [("user", "hi there")]
    assert capsys.readouterr().out == "user:hi there"[::-1] + "\n"


def test_generate_stream_prints_the_chunks(fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("generate", "--server", fake.target, "--stream", "a prompt of several chunks") == 0
    assert capsys.readouterr() == ("a prompt of several chunks"[::-1] + "\n", "")
    assert fake.servicer.calls[-1].method == "GenerateStream"


def test_generate_stream_flushes_each_chunk(fake: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[str] = []

    class Recorder(io.StringIO):
        def flush(self) -> None:
            writes.append(self.getvalue())

    monkeypatch.setattr(sys, "stdout", Recorder())
    assert cli("generate", "--server", fake.target, "--stream", "abcdefg") == 0
    assert writes[:3] == ["gfe", "gfedcb", "gfedcba"]


def test_generate_reads_a_dash_prompt_from_stdin(fake: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("line one\nline two\n"))
    assert cli("generate", "--server", fake.target, "-") == 0
    assert last_request(fake).text == "line one\nline two\n"


@pytest.mark.parametrize("stream", [[], ["--stream"]])
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--adapter", MISSING_ADAPTER], "error: NOT_FOUND: adapter 'missing' not found\n"),
        (["--max-new-tokens", "0"], "error: INVALID_ARGUMENT: stopping.max_new_tokens: must be >= 1\n"),
    ],
)
def test_generate_failure_exits_1_with_the_status_on_stderr(
    fake: FakeServer, capsys: pytest.CaptureFixture[str], stream: list[str], flags: list[str], message: str
) -> None:
    assert cli("generate", "--server", fake.target, *stream, *flags, "hello") == 1
    assert capsys.readouterr() == ("", message)


def test_generate_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("generate", "--server", unused_target(), "hello") == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: UNAVAILABLE: ")


def test_generate_arguments_the_wire_cannot_carry_exit_2(fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("generate", "--server", fake.target, "--max-new-tokens", "-1", "hello") == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: stopping.max_new_tokens: ")
    assert fake.servicer.calls == []


# --- quiver info --------------------------------------------------------------------------------------

INFO_LINES = """\
model_name: fake-model
fingerprint: f1ngerpr1nt
quantization: none
device: cpu
context_length: 2048
resident_bytes: 123456789
dtype: float32
architecture: FakeForCausalLM
max_new_tokens_limit: 512
has_chat_template: true
"""


def test_info_prints_key_value_lines(fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("info", "--server", fake.target) == 0
    assert capsys.readouterr() == (INFO_LINES, "")


def test_info_json(fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("info", "--server", fake.target, "--json") == 0
    values = json.loads(capsys.readouterr().out)
    assert values["model_name"] == "fake-model"
    assert values["has_chat_template"] is True
    assert values["resident_bytes"] == 123_456_789
    assert len(values) == len(INFO_LINES.splitlines())


def test_info_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("info", "--server", unused_target()) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: UNAVAILABLE: ")


def test_server_defaults_to_the_environment(
    fake: FakeServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("QUIVER_SERVER", fake.target)
    assert cli("info") == 0
    assert capsys.readouterr().out == INFO_LINES


# --- through the real `quiver` entry point ------------------------------------------------------------


def test_main_runs_generate_and_info(fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--server", fake.target, "hello"]) == 0
    assert capsys.readouterr() == ("olleh\n", "")
    assert main(["info", "--server", fake.target]) == 0
    assert capsys.readouterr() == (INFO_LINES, "")
    assert main(["generate", "--server", fake.target, "--adapter", MISSING_ADAPTER, "hello"]) == 1
    assert capsys.readouterr() == ("", "error: NOT_FOUND: adapter 'missing' not found\n")


def test_client_commands_import_neither_torch_nor_transformers() -> None:
    code = (
        "import sys; from quiver.clients.cli import build_parser; build_parser(); "
        "heavy = {'torch', 'transformers'} & set(sys.modules); assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("stream", [False, True])
def test_generate_logprobs_go_to_stderr(fake: FakeServer, capsys: pytest.CaptureFixture[str], stream: bool) -> None:
    flags = ["--stream"] if stream else []
    assert cli("generate", "--server", fake.target, "--logprobs", "2", *flags, "abc") == 0
    assert last_request(fake).logprobs == 2
    out, err = capsys.readouterr()
    assert out == "cba\n"  # stdout still holds only the text
    ids = [ord(c) for c in "cba"]
    assert err.splitlines() == [
        f"{t}\t{-(i + 1):.4f}\t{t}:{-(i + 1):.4f}\t{t - 1}:{-(i + 2):.4f}" for i, t in enumerate(ids)
    ]
