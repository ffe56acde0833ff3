"""README promises about load and lifecycle, checked where users meet them, on real servers over the tiny served
model:

- a full queue is RESOURCE_EXHAUSTED for the client library (unary and stream) and exit 1 with the status from
  `quiver generate`, and only while the queue is full;
- calls still waiting when the server stops end with UNAVAILABLE (gRPC; 503 over HTTP), none hangs;
- a cold adapter loads in the background while the running batch keeps decoding, and both outputs are PEFT's;
- `--max-running 1` (through `quiver serve`'s own config building) never runs two sequences at once: the second
  request's first token comes only after the first request is (nearly) done, where `--max-running 2` interleaves.

Timing is never measured against fixed budgets: each check waits on an event of the other stream (generous
timeouts only bound a failure).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from quiver.clients.cli import main as cli
from quiver.clients.client import QuiverClient
from quiver.clients.errors import QuiverRpcError
from quiver.server.engine.kinds import KINDS
from quiver.v1 import generation_pb2 as pb
from quiver.v1 import generation_pb2_grpc as pb_grpc

from ...adapters.adapter_factory import load_peft_model, make_lora
from ...served import ADMIN, start
from ...server_thread import wait_for
from .cli_served import start_as_cli
from .peft_reference import greedy, greedy_to_length

WAIT_S = 60.0  # bounds a failure only
LONG = pb.StoppingCriteria(max_new_tokens=3000, ignore_eos=True)
BIG_LIMIT = {"max_new_tokens_limit": 4000}


class Stream(threading.Thread):
    """One GenerateStream in the background: its tokens as they arrive (appended to a log shared with other
    streams, in the order this process saw them), and how it ended."""

    def __init__(self, target: str, request: pb.GenerateStreamRequest, name: str = "",
                 log: list[tuple[str, int]] | None = None, lock: threading.Lock | None = None) -> None:
        super().__init__(daemon=True)
        self.target, self.request, self.label = target, request, name
        self.log = log if log is not None else []
        self.lock = lock or threading.Lock()
        self.tokens: list[int] = []
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.call: Any = None

    def run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            self.call = pb_grpc.GenerationServiceStub(channel).GenerateStream(self.request, timeout=120)
            try:
                for message in self.call:
                    with self.lock:
                        self.tokens.extend(message.token_ids)
                        self.log.append((self.label, len(self.tokens)))
                self.code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                self.code, self.details = e.code(), e.details() or ""

    def cancel(self) -> None:
        if self.call is not None:
            self.call.cancel()


def running_stream(target: str, request: pb.GenerateStreamRequest) -> Stream:
    stream = Stream(target, request)
    stream.start()
    assert wait_for(lambda: len(stream.tokens) > 0, WAIT_S), "the stream never started"
    return stream


# -- a full queue --------------------------------------------------------------------------------------------------


def test_a_full_queue_is_resource_exhausted_for_the_client_and_the_cli(
        served_loaded: Any, served_adapter_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    srv = start(served_loaded, tmp_path / "store", served_adapter_dirs, register=False,
                engine={"max_running": 1, "max_queued": 1, **BIG_LIMIT})
    pool = ThreadPoolExecutor(2)
    busy = Stream(srv.target, pb.GenerateStreamRequest(text="w1 w2", stopping=LONG))
    try:
        busy.start()
        assert wait_for(lambda: len(busy.tokens) > 0, WAIT_S), "the stream never started"
        with QuiverClient(srv.target, timeout=60) as client:
            queued = pool.submit(client.generate, "w3 w4", max_new_tokens=3)
            engine = srv.running.engine
            assert wait_for(lambda: engine.num_waiting == 1, WAIT_S), engine.num_waiting
            with pytest.raises(QuiverRpcError) as unary:
                client.generate("w5", max_new_tokens=2)
            assert unary.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "waiting" in unary.value.details
            with pytest.raises(QuiverRpcError) as streamed:
                list(client.generate_stream("w5", max_new_tokens=2))
            assert streamed.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            capsys.readouterr()
            assert cli(["generate", "--server", srv.target, "--max-new-tokens", "2", "w5"]) == 1
            out = capsys.readouterr()
            assert out.out == "" and out.err.startswith("error: RESOURCE_EXHAUSTED: "), out.err
            assert not queued.done()  # refusals took no place: the queued call still waits, unharmed
            busy.cancel()
            assert queued.result(WAIT_S).completion_tokens == 3
            assert client.generate("w5", max_new_tokens=2).completion_tokens == 2  # room again: served
            assert cli(["generate", "--server", srv.target, "--max-new-tokens", "2", "w5"]) == 0
            assert capsys.readouterr().out.strip()
    finally:
        busy.cancel()
        srv.close()  # answers anything still waiting, so the pool's call returns
        pool.shutdown()


# -- shutdown ------------------------------------------------------------------------------------------------------


def test_calls_waiting_when_the_server_stops_end_unavailable(served_loaded: Any, served_adapter_dirs: dict[str, Path],
                                                             tmp_path: Path):
    srv = start(served_loaded, tmp_path / "store", served_adapter_dirs, register=False,
                engine={"max_running": 1, **BIG_LIMIT})
    pool = ThreadPoolExecutor(2)
    channel = grpc.insecure_channel(srv.target)
    try:
        running = running_stream(srv.target, pb.GenerateStreamRequest(text="w1 w2", stopping=LONG))
        stub = pb_grpc.GenerationServiceStub(channel)
        short = pb.StoppingCriteria(max_new_tokens=3)
        unary = stub.Generate.future(pb.GenerateRequest(text="w3 w4", stopping=short), timeout=WAIT_S)
        waiting_stream = Stream(srv.target, pb.GenerateStreamRequest(text="w5 w6", stopping=short))
        waiting_stream.start()
        body = {"model": "tiny", "prompt": "w7 w8", "max_tokens": 3}
        http: Future[httpx.Response] = pool.submit(httpx.post, f"{srv.http}/v1/completions", json=body,
                                                   timeout=WAIT_S)
        engine = srv.running.engine
        assert wait_for(lambda: engine.num_waiting == 3, WAIT_S), engine.num_waiting
        assert not unary.done() and not http.done() and not waiting_stream.tokens
        srv.close()  # the drain of `stop(0)`: no grace for anyone

        with pytest.raises(grpc.RpcError) as ended:
            unary.result(timeout=WAIT_S)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in ended.value.details()
        waiting_stream.join(WAIT_S)
        assert (waiting_stream.code, waiting_stream.tokens) == (grpc.StatusCode.UNAVAILABLE, [])
        assert "shutting down" in waiting_stream.details
        answer = http.result(WAIT_S)
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "unavailable", answer.text
        running.join(WAIT_S)
        assert running.code == grpc.StatusCode.UNAVAILABLE and 0 < len(running.tokens) < 3000
    finally:
        channel.close()
        pool.shutdown(wait=False, cancel_futures=True)
        srv.close()


# -- a cold load while the batch decodes ---------------------------------------------------------------------------


def test_a_cold_adapter_loads_while_the_batch_keeps_decoding(
        served_loaded: Any, served_adapter_dirs: dict[str, Path], served_base_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch):
    """The cold load is held (a slow store) until the test releases it. Meanwhile a stream that was running before
    it started keeps receiving tokens, and a request on a warm adapter sent during it runs to its end; only then
    is the load released, and the cold adapter's request completes. Both finished outputs are PEFT's."""
    warm_prompt, cold_prompt, warm_tokens, cold_tokens = "w7 w5 w9 w11", "w9 w8 w7", 60, 12
    cold_dir = make_lora(served_base_dir, tmp_path / "cold", r=4, target_modules="all-linear", seed=11)
    ids = {p: list(served_loaded.tokenizer(p, add_special_tokens=False)["input_ids"])
           for p in (warm_prompt, cold_prompt)}
    expected_warm, margin = greedy_to_length(load_peft_model(served_base_dir, served_adapter_dirs["lora"]),
                                             ids[warm_prompt], warm_tokens)
    assert margin > 1e-3, margin  # no near-tie that batch composition could flip
    expected_cold = greedy(load_peft_model(served_base_dir, cold_dir), ids[cold_prompt], cold_tokens)

    srv = start(served_loaded, tmp_path / "store", served_adapter_dirs, engine=BIG_LIMIT)
    pool = ThreadPoolExecutor(1)
    entered, release = threading.Event(), threading.Event()
    load_host = KINDS["lora"].load_host

    def slow_load(path: Path) -> Any:  # a store that takes as long as the test wants
        entered.set()
        release.wait(WAIT_S)
        return load_host(path)

    before: Stream | None = None
    try:
        before = running_stream(srv.target, pb.GenerateStreamRequest(text="w1 w2", adapter="prompt", stopping=LONG))
        with QuiverClient(srv.target, admin_token=ADMIN, timeout=120) as client:
            client.register_adapter(cold_dir, "cold")
            client.generate("w1", adapter="lora", max_new_tokens=1)  # "lora" is warm: only "cold" loads below
            monkeypatch.setattr(KINDS["lora"], "load_host", slow_load)
            cold = pool.submit(client.generate, cold_prompt, adapter="cold", max_new_tokens=cold_tokens)
            assert entered.wait(WAIT_S), "the cold load never started"
            during = len(before.tokens)
            warm = client.generate(warm_prompt, adapter="lora", max_new_tokens=warm_tokens, ignore_eos=True)
            assert not release.is_set() and not cold.done()  # all of it happened while the load was held
            # It shared those steps (a token each) with the warm request: about warm_tokens more, less client lag.
            assert len(before.tokens) >= during + warm_tokens // 2 and before.code is None, (during, len(before.tokens))
            release.set()
            assert cold.result(WAIT_S).token_ids == expected_cold
            assert warm.token_ids == expected_warm
    finally:
        release.set()
        if before is not None:
            before.cancel()
        pool.shutdown(cancel_futures=True)
        srv.close()


# -- --max-running -------------------------------------------------------------------------------------------------


@pytest.fixture
def store_flag(tmp_path: Path) -> list[str]:
    return ["--store", str(tmp_path / "store")]


@pytest.mark.parametrize("max_running", [1, 2])
def test_max_running_from_the_command_line_bounds_the_running_sequences(served_loaded: Any, store_flag: list[str],
                                                                        max_running: int):
    new = 300
    srv = start_as_cli(served_loaded, ["--max-running", str(max_running), *store_flag])
    engine = srv.running.engine
    seen: dict[str, int] = {"running": 0, "waiting": 0}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen["running"] = max(seen["running"], engine.num_running)
            seen["waiting"] = max(seen["waiting"], engine.num_waiting)
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    log: list[tuple[str, int]] = []
    lock = threading.Lock()
    streams = [Stream(srv.target, pb.GenerateStreamRequest(text=text, stopping=pb.StoppingCriteria(
        max_new_tokens=new, ignore_eos=True)), name, log, lock) for name, text in (("a", "w1 w2"), ("b", "w3 w4"))]
    try:
        watcher.start()
        for stream in streams:
            stream.start()
        for stream in streams:
            stream.join(WAIT_S)
            assert stream.code == grpc.StatusCode.OK and len(stream.tokens) == new, (stream.code, stream.details)
    finally:
        stop.set()
        watcher.join(5)
        srv.close()
    assert seen["running"] == max_running, seen
    # When the later stream's first token arrived, how far was the earlier one?
    first = log[0][0]
    second_start = next(i for i, (name, _) in enumerate(log) if name != first)
    earlier_done = max(count for name, count in log[:second_start] if name == first)
    if max_running == 1:
        assert seen["waiting"] >= 1
        assert earlier_done > new // 2, earlier_done  # it waited for the first (exactly `new` less client jitter)
    else:
        assert earlier_done < new // 2, earlier_done  # both ran in the same batch

