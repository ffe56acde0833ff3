"""Quiver's metrics as the real Prometheus scrapes and queries them, and as promtool lints them.

The exposition can look right to prometheus_client's own parser while Prometheus rejects the scrape (one malformed
line marks the whole target down) or stores series under other names than dashboards query (a counter's `_total`,
a histogram's `_bucket`); so these tests start the real `prometheus` binary against a live server on loopback,
make calls, and read the numbers back through Prometheus' HTTP query API. `prometheus` and `promtool` come from
Debian's package, which .ci/run installs: a missing binary fails these tests rather than skipping them, so a CI
machine without it cannot pass silently.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from quiver.v1 import generation_pb2 as pb
from quiver.v1 import generation_pb2_grpc as pb_grpc

from ...server_thread import ServerThread, _free_port

GENERATE_CALLS = 3
MAX_NEW_TOKENS = 4
# Prometheus scrapes every second: a few scrapes, plus its start, fit well within this.
QUERY_TIMEOUT_S = 20.0
# The names inference routers read (server/api/router_metrics.py, deploy/gateway/) are vLLM's, colon and all:
# a deliberate exception to the naming rule promtool applies (colons are meant for recording rules). Only this
# one complaint, about only these names, is accepted; any other finding fails.
ROUTER_NAME_LINT = re.compile(r"vllm:[a-z0-9_]+ metric names should not contain ':'")


def binary(name: str) -> str:
    """The path of a Prometheus binary; fails (not skips) without it, since CI installs it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not on PATH; .ci/run installs it: apt-get install --no-install-recommends prometheus")
    return path


@pytest.fixture
def server(loaded: Any, tmp_path: Path) -> Iterator[ServerThread]:
    srv = ServerThread(loaded, tmp_path / "store")
    yield srv
    srv.close()


@pytest.fixture
def prometheus(server: ServerThread, tmp_path: Path) -> Iterator[str]:
    """A Prometheus scraping the server's metrics port (job "quiver") and the HTTP front's /metrics (job
    "quiver-http") every second; yields its base URL and always stops the process."""
    exe = binary("prometheus")
    port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: quiver
    static_configs:
      - targets: ["127.0.0.1:{server.running.metrics_port}"]
  - job_name: quiver-http
    static_configs:
      - targets: ["127.0.0.1:{server.running.http_port}"]
""")
    log_path = tmp_path / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [exe, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + QUERY_TIMEOUT_S
        while not _ready(url):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prometheus did not become ready (exit {process.poll()}):\n{log_path.read_text()}")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def query(url: str, expr: str) -> float | None:
    """The single value of an instant query, or None while it has no result (not scraped yet)."""
    reply = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=5).json()
    assert reply["status"] == "success", (expr, reply)
    result = reply["data"]["result"]
    if not result:
        return None
    assert len(result) == 1, (expr, result)
    return float(result[0]["value"][1])


def poll(url: str, expr: str, accept: Callable[[float], bool]) -> float:
    """Query until the value passes `accept` (Prometheus needs a scrape or two after the calls)."""
    deadline = time.monotonic() + QUERY_TIMEOUT_S
    value = query(url, expr)
    while value is None or not accept(value):
        if time.monotonic() > deadline:
            targets = httpx.get(f"{url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
            health = [(t["labels"]["job"], t["health"], t["lastError"]) for t in targets]
            pytest.fail(f"{expr} = {value} after {QUERY_TIMEOUT_S} s; targets: {health}")
        time.sleep(0.2)
        value = query(url, expr)
    return value


def run_calls(server: ServerThread) -> int:
    """Generate calls, one stream and two HTTP completions, as clients make them; returns the tokens generated."""
    tokens = 0
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        stopping = pb.StoppingCriteria(max_new_tokens=MAX_NEW_TOKENS)
        for i in range(GENERATE_CALLS):
            reply = stub.Generate(pb.GenerateRequest(text=f"w1 w{i + 2}", stopping=stopping), timeout=60)
            tokens += reply.usage.completion_tokens
        chunks = list(stub.GenerateStream(pb.GenerateStreamRequest(text="w3 w4", stopping=stopping), timeout=60))
        tokens += chunks[-1].usage.completion_tokens
    for prompt in ("w5 w6", "w7"):
        body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_NEW_TOKENS}
        reply = httpx.post(f"{server.http}/v1/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        tokens += reply.json()["usage"]["completion_tokens"]
    return tokens


def test_prometheus_scrapes_and_queries_live_metrics(server: ServerThread, prometheus: str) -> None:
    assert poll(prometheus, 'up{job="quiver"}', lambda v: v == 1) == 1
    assert poll(prometheus, 'up{job="quiver-http"}', lambda v: v == 1) == 1
    tokens = run_calls(server)
    assert tokens > 0

    generate = 'quiver_requests_total{job="quiver",method="Generate",code="OK"}'
    assert poll(prometheus, generate, lambda v: v >= GENERATE_CALLS) == GENERATE_CALLS
    stream = 'quiver_requests_total{job="quiver",method="GenerateStream",code="OK"}'
    assert poll(prometheus, stream, lambda v: v >= 1) == 1
    durations = 'quiver_request_duration_seconds_count{job="quiver",method="Generate"}'
    assert poll(prometheus, durations, lambda v: v >= GENERATE_CALLS) == GENERATE_CALLS
    completions = 'quiver_http_requests_total{job="quiver",route="/v1/completions",status="200"}'
    assert poll(prometheus, completions, lambda v: v >= 2) == 2
    generated = 'sum(quiver_generation_tokens_total{job="quiver"})'
    assert poll(prometheus, generated, lambda v: v >= tokens) == tokens
    first_tokens = 'sum(quiver_time_to_first_token_seconds_count{job="quiver"})'
    assert poll(prometheus, first_tokens, lambda v: v >= GENERATE_CALLS + 3) == GENERATE_CALLS + 3

    # PromQL over the stored buckets, as a dashboard computes it: a median inside the buckets' range.
    median = 'histogram_quantile(0.5, sum by (le) (quiver_request_duration_seconds_bucket{job="quiver"}))'
    assert 0 < poll(prometheus, median, lambda v: v > 0) <= 300
    # Both endpoints expose the same registry: the same call count under either job.
    via_http = 'quiver_requests_total{job="quiver-http",method="Generate"}'
    assert poll(prometheus, via_http, lambda v: v >= GENERATE_CALLS) == GENERATE_CALLS
    assert poll(prometheus, 'quiver_cache_budget_bytes{job="quiver"}', lambda v: v > 0) > 0


@pytest.mark.parametrize("endpoint", ["metrics_port", "http_front"])
def test_promtool_finds_nothing_in_live_exposition(server: ServerThread, endpoint: str) -> None:
    promtool = binary("promtool")
    run_calls(server)  # so the labelled families have samples, and those get linted too
    base = f"http://127.0.0.1:{server.running.metrics_port}" if endpoint == "metrics_port" else server.http
    reply = httpx.get(f"{base}/metrics", timeout=10)
    assert reply.status_code == 200
    assert "quiver_requests_total{" in reply.text
    checked = subprocess.run([promtool, "check", "metrics"], input=reply.content, capture_output=True, timeout=30)
    findings = [line for line in (checked.stdout + checked.stderr).decode().splitlines() if line.strip()]
    unexpected = [line for line in findings if not ROUTER_NAME_LINT.fullmatch(line)]
    assert unexpected == [], f"promtool check metrics (exit {checked.returncode}):\n" + "\n".join(findings)
    # promtool exits 3 for lint findings only; anything else (1: unparseable input) is a failure.
    assert checked.returncode == (3 if findings else 0), findings
