"""`quiver serve` as a real process: what an orchestrator sees of it (early ports, readiness, the drain on
SIGTERM, a second signal, the exit status) and what its JSON logs hold. In-process servers (conftest's
ServerThread) cannot show any of this: signals, stdout lines and exit statuses belong to a process.

A server process takes seconds to import torch; each test starts one, so each takes ~10-20 s.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import LlamaConfig, LlamaForCausalLM

from quiver.v1 import generation_pb2 as pb
from quiver.v1 import generation_pb2_grpc as pb_grpc

START_TIMEOUT_S = 90.0  # importing torch on two busy cores; a healthy start takes ~8 s
LISTENING = re.compile(r"^quiver: listening on [\d.]+:(\d+) \(gRPC\), HTTP on [\d.]+:(\d+); loading the model$")
SERVING = "quiver: serving "
SERVING_STATUS = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CANARY = "zebra-canary-123"
ACCESS_KEYS = {"request_id", "method", "adapter", "status", "prompt_tokens", "generated_tokens", "queue_ms",
               "ttft_ms", "duration_ms"}
# Runs `quiver serve` with the model load held until the file $QUIVER_TEST_LOAD_GATE exists, so the loading
# phase lasts as long as the test needs (a tiny model loads in well under a second). Patched before
# quiver.server.app is imported, which binds load_base_model by name.
GATED_MAIN = """
import os, sys, time
import quiver.server.model.model_loader as loader
load = loader.load_base_model
def gated(config):
    end = time.monotonic() + 60
    while not os.path.exists(os.environ["QUIVER_TEST_LOAD_GATE"]) and time.monotonic() < end:
        time.sleep(0.02)
    return load(config)
loader.load_base_model = gated
from quiver.clients.cli import main
sys.exit(main(["serve", *sys.argv[1:]]))
"""


@pytest.fixture(scope="module")
def long_checkpoint(text_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """conftest's tiny Llama with a 4096-token context, on disk: thousands of tokens take it tens of seconds."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(text_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        eos_token_id=text_tokenizer.eos_token_id, bos_token_id=text_tokenizer.bos_token_id,
        pad_token_id=text_tokenizer.pad_token_id, tie_word_embeddings=True,
    ))
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20)
    out = tmp_path_factory.mktemp("serve-process") / "tiny-long"
    model.save_pretrained(out, safe_serialization=True)
    text_tokenizer.save_pretrained(out)
    return out


@dataclass
class ServeProcess:
    """A started server; stdout is read as it comes (with arrival times), stderr goes to a file."""

    process: subprocess.Popen[str]
    stderr_path: Path
    lines: list[tuple[float, str]] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)
    port: int = 0
    http_port: int = 0

    def read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self.changed:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self.changed.notify_all()

    def wait_line(self, prefix: str, timeout: float = START_TIMEOUT_S) -> tuple[float, str]:
        """The first stdout line starting with `prefix` and when it arrived; fails on exit or timeout."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                found = [(t, line) for t, line in self.lines if line.startswith(prefix)]
                if found:
                    return found[0]
                left = deadline - time.monotonic()
                if left <= 0 or self.process.poll() is not None:
                    pytest.fail(f"no {prefix!r} line (exit {self.process.poll()}); stdout {self.lines}; "
                                f"stderr:\n{self.stderr()[-4000:]}")
                self.changed.wait(min(left, 0.2))

    def wait_listening(self) -> None:
        match = LISTENING.match(self.wait_line("quiver: listening on ")[1])
        assert match is not None, self.lines
        self.port, self.http_port = int(match[1]), int(match[2])

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stdout(self) -> str:
        with self.changed:
            return "\n".join(line for _, line in self.lines)

    def exit_status(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {timeout}s later; stderr:\n{self.stderr()[-4000:]}")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


Launch = Callable[..., ServeProcess]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def launch(long_checkpoint: Path, tmp_path: Path) -> Iterator[Launch]:
    """Starts `quiver serve` over the long checkpoint with extra flags; every process is killed at teardown.
    `gate`: hold the model load until that file exists (GATED_MAIN) instead of the plain console script."""
    started: list[ServeProcess] = []

    def start(*flags: str, gate: Path | None = None) -> ServeProcess:
        cli = [sys.executable, "-c", GATED_MAIN] if gate else [str(Path(sys.executable).with_name("quiver")), "serve"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("QUIVER_")}  # no stray settings
        env["HF_HUB_OFFLINE"] = "1"
        if gate is not None:
            env["QUIVER_TEST_LOAD_GATE"] = str(gate)
        stderr_path = tmp_path / f"stderr-{len(started)}.txt"
        args = ["--model", str(long_checkpoint), "--host", "127.0.0.1", "--port", "0",
                "--http-port", str(_free_port()), "--metrics-port", "0", "--store", str(tmp_path / "store"),
                "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--quantize", "none", *flags]
        with stderr_path.open("w") as err:
            process = subprocess.Popen([*cli, *args], stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        server = ServeProcess(process, stderr_path)
        started.append(server)
        threading.Thread(target=server.read_stdout, daemon=True).start()
        server.wait_listening()
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
        server.process.wait(10)


def health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        status: int = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        return status


def generate_code(target: str, text: str = "hello", tokens: int = 4) -> grpc.StatusCode:
    """The status of one unary Generate."""
    request = pb.GenerateRequest(text=text, stopping=pb.StoppingCriteria(max_new_tokens=tokens))
    with grpc.insecure_channel(target) as channel:
        try:
            pb_grpc.GenerationServiceStub(channel).Generate(request, timeout=10)
        except grpc.RpcError as e:
            code: grpc.StatusCode = e.code()
            return code
    return grpc.StatusCode.OK


def completion_status(server: ServeProcess, prompt: str = "hello") -> int:
    body = {"model": "tiny-long", "prompt": prompt, "max_tokens": 4}
    return httpx.post(f"{server.http}/v1/completions", json=body, timeout=10).status_code


class Stream(threading.Thread):
    """One GenerateStream of `tokens` tokens (ignore_eos) in the background: what it received and how it ended."""

    def __init__(self, target: str, tokens: int, text: str = "hello there", request_id: str = "") -> None:
        super().__init__(daemon=True)
        self.target, self.tokens, self.text, self.request_id = target, tokens, text, request_id
        self.first = threading.Event()
        self.received = 0
        self.finish_reason = pb.FINISH_REASON_UNSPECIFIED
        self.code = grpc.StatusCode.OK
        self.ended_at = 0.0

    def run(self) -> None:
        request = pb.GenerateStreamRequest(
            text=self.text, stopping=pb.StoppingCriteria(max_new_tokens=self.tokens, ignore_eos=True))
        metadata = (("x-request-id", self.request_id),) if self.request_id else ()
        with grpc.insecure_channel(self.target) as channel:
            try:
                for message in pb_grpc.GenerationServiceStub(channel).GenerateStream(
                        request, timeout=120, metadata=metadata):
                    self.received += len(message.token_ids)
                    self.finish_reason = message.finish_reason or self.finish_reason
                    self.first.set()
            except grpc.RpcError as e:
                self.code = e.code()
            finally:
                self.ended_at = time.monotonic()
                self.first.set()  # never leave a waiter hanging

    @property
    def done(self) -> bool:
        return self.ended_at > 0


def start_streams(server: ServeProcess, count: int, tokens: int, **kwargs: str) -> list[Stream]:
    """`count` streams, each having received its first message (the engine runs them all)."""
    streams = [Stream(server.target, tokens, **kwargs) for _ in range(count)]
    for stream in streams:
        stream.start()
    for stream in streams:
        assert stream.first.wait(30), "no first message"
        assert not stream.done, (stream.code, stream.received)
    return streams


def join(streams: Sequence[Stream], timeout: float) -> None:
    for stream in streams:
        stream.join(timeout)
        assert stream.done, "stream still running"


def wait_health(target: str, want: int, deadline: float) -> float:
    """Poll health until `want`; when it came (monotonic), failing after `deadline`."""
    while (status := health(target)) != want:
        assert time.monotonic() < deadline, f"health still {status}"
        time.sleep(0.02)
    return time.monotonic()


def test_ports_answer_while_the_model_loads(launch: Launch, tmp_path: Path) -> None:
    """An orchestrator probes the process as soon as it listens: while the model loads, health must answer
    NOT_SERVING (not refuse the connection) and calls must be refused with UNAVAILABLE / 503, not queued; once it
    serves, all turn."""
    gate = tmp_path / "load-gate"
    server = launch(gate=gate)
    assert health(server.target) == NOT_SERVING
    assert httpx.get(f"{server.http}/health", timeout=5).status_code == 200
    assert httpx.get(f"{server.http}/ready", timeout=5).status_code == 503
    assert completion_status(server) == 503
    early = Stream(server.target, 4)
    early.run()  # UNAVAILABLE is what retry policies retry; UNIMPLEMENTED would say "never"
    assert (generate_code(server.target), early.code) == (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE)
    assert not any(line.startswith(SERVING) for _, line in server.lines), "the load did not wait for the gate"
    gate.touch()
    server.wait_line(SERVING)
    assert [line.split(" ")[1] for _, line in server.lines[:2]] == ["listening", "serving"]
    assert health(server.target) == SERVING_STATUS
    assert httpx.get(f"{server.http}/ready", timeout=5).status_code == 200
    assert generate_code(server.target) == grpc.StatusCode.OK
    assert completion_status(server) == 200
    server.process.send_signal(signal.SIGTERM)
    assert server.exit_status(30) == 0


def test_drain_lets_running_streams_finish(launch: Launch) -> None:
    """SIGTERM: readiness drops and new calls are refused at once on both fronts, while the streams already
    running finish whole; the process then exits 0 as soon as they are done, not at the drain's deadline."""
    server = launch("--drain-seconds", "30")  # 3 x 200 tokens take ~3 s, ~10 s on busy cores
    server.wait_line(SERVING)
    streams = start_streams(server, 3, 200)
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    not_serving = wait_health(server.target, NOT_SERVING, signalled + 1.0)
    assert not all(s.done for s in streams), "the streams ended before the drain could be seen"
    assert generate_code(server.target) == grpc.StatusCode.UNAVAILABLE
    late = Stream(server.target, 4)
    late.run()
    assert late.code == grpc.StatusCode.UNAVAILABLE
    assert completion_status(server) == 503
    assert httpx.get(f"{server.http}/health", timeout=5).status_code == 200  # alive: no restart wanted
    assert httpx.get(f"{server.http}/ready", timeout=5).status_code == 503
    checked = time.monotonic()
    assert not_serving - signalled < 1.0 and checked - signalled < 2.0, (not_serving - signalled, checked - signalled)
    join(streams, 30)
    for stream in streams:
        assert (stream.code, stream.finish_reason, stream.received) == (grpc.StatusCode.OK, pb.FINISH_REASON_LENGTH,
                                                                        200)
    assert server.exit_status(35) == 0
    last_stream = max(s.ended_at for s in streams)
    assert time.monotonic() - last_stream < 8, "the drain waited for its deadline although nothing was running"
    assert "still running after" not in server.stderr()


def test_drain_deadline_ends_long_streams_unavailable(launch: Launch) -> None:
    """Generations longer than --drain-seconds are cut at the deadline with UNAVAILABLE (the client may retry
    elsewhere), not left to run on nor cut at once; the exit is still a clean 0. 3 streams of 3,000 tokens take
    ~30 s on the tiny model on two cores."""
    server = launch("--drain-seconds", "1", "--max-new-tokens-limit", "4000")
    server.wait_line(SERVING)
    streams = start_streams(server, 3, 3000)
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    join(streams, 15)
    for stream in streams:
        ended = stream.ended_at - signalled
        assert stream.code == grpc.StatusCode.UNAVAILABLE, (stream.code, stream.received)
        assert 0 < stream.received < 3000
        assert 0.8 < ended < 3.0, ended
    assert server.exit_status(15) == 0
    assert "still running after" in server.stderr()


def test_second_signal_ends_the_drain_at_once(launch: Launch) -> None:
    """An operator's second Ctrl-C must not wait out a 60 s drain: the streams end UNAVAILABLE right after it
    and the process exits 0."""
    server = launch("--drain-seconds", "60", "--max-new-tokens-limit", "4000")
    server.wait_line(SERVING)
    streams = start_streams(server, 2, 3000)
    server.process.send_signal(signal.SIGTERM)
    wait_health(server.target, NOT_SERVING, time.monotonic() + 1.0)
    time.sleep(0.3)
    assert not any(s.done for s in streams), "the first signal alone ended streams"
    second = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    join(streams, 15)
    for stream in streams:
        assert stream.code == grpc.StatusCode.UNAVAILABLE, (stream.code, stream.received)
        assert stream.ended_at - second < 2.0, stream.ended_at - second
    assert server.exit_status(10) == 0
    assert time.monotonic() - second < 10


def test_json_logs_hold_one_access_line_per_call_and_no_prompt(launch: Launch) -> None:
    """Log pipelines parse each line as JSON and count calls from the access lines; prompts may hold user data,
    so without --log-prompts their text must appear nowhere, on stdout or stderr."""
    server = launch("--log-format", "json", "--drain-seconds", "0.5", "--max-new-tokens-limit", "4000")
    server.wait_line(SERVING)
    request = pb.GenerateRequest(text=f"{CANARY} one", stopping=pb.StoppingCriteria(max_new_tokens=5))
    with grpc.insecure_channel(server.target) as channel:
        pb_grpc.GenerationServiceStub(channel).Generate(request, timeout=30, metadata=(("x-request-id", "unary-1"),))
    short = Stream(server.target, 6, text=f"{CANARY} two", request_id="stream-short")
    short.run()
    assert short.code == grpc.StatusCode.OK
    assert completion_status(server, f"{CANARY} three") == 200
    (drained,) = start_streams(server, 1, 3000, text=f"{CANARY} four", request_id="stream-drained")
    server.process.send_signal(signal.SIGTERM)
    join([drained], 15)
    assert drained.code == grpc.StatusCode.UNAVAILABLE
    assert server.exit_status(15) == 0
    stderr = server.stderr()
    records = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert records, stderr[-2000:]
    access = [r for r in records if r["logger"] == "quiver.access"]
    grpc_lines = {r["request_id"]: r for r in access if r["method"] in ("Generate", "GenerateStream")}
    assert len(grpc_lines) == len([r for r in access if r["method"] in ("Generate", "GenerateStream")]) == 3
    for line in grpc_lines.values():
        assert line.keys() >= ACCESS_KEYS, line
    expected = {"unary-1": ("Generate", "OK", 5), "stream-short": ("GenerateStream", "OK", 6),
                "stream-drained": ("GenerateStream", "UNAVAILABLE", None)}
    for request_id, (method, status, generated) in expected.items():
        line = grpc_lines[request_id]
        assert (line["method"], line["status"]) == (method, status), line
        assert line["prompt_tokens"] > 0 and line["duration_ms"] > 0, line
        assert generated is None or line["generated_tokens"] == generated, line
    assert sum(r["method"] == "/v1/completions" for r in access) == 1
    assert CANARY not in stderr and CANARY not in server.stdout()
