"""`quiver generate`, `info`, `embed` and `classify` against a real Quiver server, through the real `quiver` entry
point: each prints what the Python client gets for the same request (that client is checked against
transformers/PEFT in test_client.py), and a failed call exits 1 with the server's status on stderr."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from quiver.clients import QuiverClient
from quiver.clients.cli import main

from ..server_thread import ServerThread
from .conftest import CLASSIFIER, unused_target

PROMPT = "w1 w2 w3"
QUIVER = Path(sys.executable).with_name("quiver")  # the console script of this environment


@pytest.fixture
def client(server: ServerThread) -> Iterator[QuiverClient]:
    with QuiverClient(server.target, timeout=60) as c:
        yield c


@pytest.fixture
def quiver(server: ServerThread, monkeypatch: pytest.MonkeyPatch) -> Any:
    """`quiver ARGV` in this process, the server given by $QUIVER_SERVER (as a user would set it)."""
    monkeypatch.setenv("QUIVER_SERVER", server.target)
    return lambda *argv: main(list(argv))


# --- quiver generate ----------------------------------------------------------------------------------


def test_generate_prints_only_the_greedy_text(quiver: Any, client: QuiverClient,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert quiver("generate", "--max-new-tokens", "6", PROMPT) == 0
    expected = client.generate(PROMPT, max_new_tokens=6, temperature=0).text
    assert capsys.readouterr() == (expected + "\n", "")


def test_generate_flags_map_onto_the_request(quiver: Any, client: QuiverClient,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Seeded sampling with every option set prints exactly the client's sample with the same options."""
    flags = ["--adapter", "lora", "--max-new-tokens", "9", "--temperature", "3", "--top-p", "0.9", "--top-k", "50",
             "--repetition-penalty", "1.2", "--seed", "7"]
    assert quiver("generate", *flags, PROMPT) == 0
    expected = client.generate(PROMPT, adapter="lora", max_new_tokens=9, temperature=3, top_p=0.9, top_k=50,
                               repetition_penalty=1.2, seed=7)
    assert capsys.readouterr().out == expected.text + "\n"
    assert expected.text != client.generate(PROMPT, adapter="lora", max_new_tokens=9, temperature=0).text


def test_generate_stop_flags(quiver: Any, client: QuiverClient, capsys: pytest.CaptureFixture[str]) -> None:
    full = client.generate(PROMPT, adapter="lora", max_new_tokens=6, temperature=0).text
    stop = f" {full.split()[3]}"
    assert quiver("generate", "--adapter", "lora", "--max-new-tokens", "6", "--stop", " w999", "--stop", stop,
                  PROMPT) == 0
    assert capsys.readouterr().out == full[: full.index(stop)] + "\n"


def test_generate_chat_sends_one_user_message(quiver: Any, client: QuiverClient,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert quiver("generate", "--chat", "--max-new-tokens", "5", "w4 w5") == 0
    expected = client.generate(messages=[{"role": "user", "content": "w4 w5"}], max_new_tokens=5, temperature=0)
    assert capsys.readouterr().out == expected.text + "\n"
    assert expected.prompt_tokens == 2


def test_generate_reads_a_dash_prompt_from_stdin(quiver: Any, client: QuiverClient, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("w6 w7\nw8\n"))
    assert quiver("generate", "--max-new-tokens", "4", "-") == 0
    assert capsys.readouterr().out == client.generate("w6 w7\nw8\n", max_new_tokens=4, temperature=0).text + "\n"


def test_generate_stream_prints_and_flushes_each_chunk(quiver: Any, client: QuiverClient,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    flushed: list[str] = []

    class Recorder(io.StringIO):
        def flush(self) -> None:
            flushed.append(self.getvalue())

    recorder = Recorder()
    monkeypatch.setattr(sys, "stdout", recorder)
    assert quiver("generate", "--stream", "--adapter", "prefix", "--max-new-tokens", "5", PROMPT) == 0
    chunks = [c.text for c in client.generate_stream(PROMPT, adapter="prefix", max_new_tokens=5, temperature=0)]
    assert flushed == ["".join(chunks[: i + 1]) for i in range(len(chunks))]
    assert recorder.getvalue() == "".join(chunks) + "\n"


@pytest.mark.parametrize("stream", [[], ["--stream"]])
def test_generate_logprobs_go_to_stderr(quiver: Any, client: QuiverClient, capsys: pytest.CaptureFixture[str],
                                        stream: list[str]) -> None:
    assert quiver("generate", "--logprobs", "2", "--max-new-tokens", "4", *stream, PROMPT) == 0
    expected = client.generate(PROMPT, max_new_tokens=4, temperature=0, logprobs=2)
    out, err = capsys.readouterr()
    assert out == expected.text + "\n"  # stdout still holds only the text
    assert err.splitlines() == [
        "\t".join([str(e.token_id), f"{e.logprob:.4f}", *(f"{t}:{lp:.4f}" for t, lp in e.top)])
        for e in expected.logprobs]


@pytest.mark.parametrize("stream", [[], ["--stream"]])
@pytest.mark.parametrize(("flags", "message"), [
    (["--adapter", "nope"], "error: NOT_FOUND: adapter nope not found"),
    (["--adapter", "lora@9"], "error: NOT_FOUND: adapter lora@9 not found"),
    (["--max-new-tokens", "0"], "error: INVALID_ARGUMENT: stopping.max_new_tokens: must be in [1, "),
])
def test_generate_failure_exits_1_with_the_status_on_stderr(quiver: Any, capsys: pytest.CaptureFixture[str],
                                                            stream: list[str], flags: list[str], message: str) -> None:
    assert quiver("generate", *stream, *flags, PROMPT) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(message) and err.count("\n") == 1


def test_generate_arguments_the_wire_cannot_carry_exit_2(quiver: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert quiver("generate", "--max-new-tokens", "-1", PROMPT) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: stopping.max_new_tokens: ")


@pytest.mark.parametrize("command", [["generate", PROMPT], ["info"], ["embed", "w1"], ["classify", "--adapter", "x",
                                                                                     "w1"]])
def test_unreachable_server_exits_1(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*command, "--server", unused_target()]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: UNAVAILABLE: ")


def test_the_console_script_exits_with_the_status(server: ServerThread, client: QuiverClient) -> None:
    """The installed `quiver` script, in its own process: the text on stdout and 0, or the status and 1."""
    ok = subprocess.run([QUIVER, "generate", "--server", server.target, "--max-new-tokens", "3", PROMPT],
                        capture_output=True, text=True, timeout=120)
    assert (ok.returncode, ok.stdout) == (0, client.generate(PROMPT, max_new_tokens=3, temperature=0).text + "\n")
    bad = subprocess.run([QUIVER, "generate", "--server", server.target, "--adapter", "nope", PROMPT],
                         capture_output=True, text=True, timeout=120)
    assert (bad.returncode, bad.stdout) == (1, "") and bad.stderr.startswith("error: NOT_FOUND: adapter nope")


def test_client_commands_import_neither_torch_nor_transformers() -> None:
    code = (
        "import sys; from quiver.clients.cli import build_parser; build_parser(); "
        "heavy = {'torch', 'transformers'} & set(sys.modules); assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- quiver info --------------------------------------------------------------------------------------


def test_info_prints_key_value_lines(quiver: Any, client: QuiverClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert quiver("info") == 0
    info = dataclasses.asdict(client.model_info())
    expected = [f"{k}: {json.dumps(v) if isinstance(v, bool) else v}" for k, v in info.items()]
    assert capsys.readouterr() == ("\n".join(expected) + "\n", "")
    assert "has_chat_template: true" in expected and "architecture: LlamaForCausalLM" in expected


def test_info_json(quiver: Any, client: QuiverClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert quiver("info", "--json") == 0
    assert json.loads(capsys.readouterr().out) == dataclasses.asdict(client.model_info())


def test_server_flag_beats_the_environment(server: ServerThread, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("QUIVER_SERVER", unused_target())
    assert main(["info", "--server", server.target]) == 0
    assert capsys.readouterr().out.startswith("model_name: ")


# --- quiver embed and classify ------------------------------------------------------------------------


def test_embed_prints_json_lines(quiver: Any, client: QuiverClient, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("w3 w4\n\nw5\n"))
    assert quiver("embed", "w1 w2", "-", "--adapter", "prompt", "--pooling", "last", "--no-normalize") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = client.embed(["w1 w2", "w3 w4", "w5"], adapter="prompt", pooling="last", normalize=False)
    assert [(r["index"], r["prompt_tokens"]) for r in rows] == list(enumerate(expected.prompt_tokens))
    for row, vector in zip(rows, expected.vectors, strict=True):
        assert row["embedding"] == pytest.approx(vector, abs=1e-5)


def test_classify_prints_json_lines(quiver: Any, client: QuiverClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert quiver("classify", "--adapter", CLASSIFIER, "w1 w2", "w9") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = client.classify(["w1 w2", "w9"], adapter=CLASSIFIER)
    assert [(r["index"], r["label"], r["prompt_tokens"]) for r in rows] == [
        (i, e.label, e.prompt_tokens) for i, e in enumerate(expected)]
    for row, result in zip(rows, expected, strict=True):
        assert row["probabilities"] == pytest.approx(result.probabilities, abs=1e-5)


@pytest.mark.parametrize(("argv", "message"), [
    (["embed", "--adapter", "nope", "w1"], "error: NOT_FOUND: adapter nope not found"),
    (["classify", "--adapter", "nope", "w1"], "error: NOT_FOUND: adapter nope not found"),
    (["classify", "--adapter", "lora", "w1"], "error: FAILED_PRECONDITION: adapter 'lora' is not a classification"),
])
def test_embed_and_classify_failures_exit_1(quiver: Any, capsys: pytest.CaptureFixture[str], argv: list[str],
                                            message: str) -> None:
    assert quiver(*argv) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(message)
