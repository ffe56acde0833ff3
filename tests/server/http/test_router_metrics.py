"""The metrics inference routers read, on a live /metrics, while requests run and wait; the resident-adapter gauge
with its bounded series count; and every metric deploy/gateway/ names, checked against a live scrape."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from quiver.clients.client import QuiverClient

from ...server_thread import ServerThread, wait_for
from .conftest import ADMIN, BASE_ID, start

GATEWAY = Path(__file__).resolve().parents[3] / "deploy" / "gateway"
ROUTER_GAUGES = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                 "vllm:lora_requests_info")


def scrape(url: str) -> dict[str, tuple[str, list[Sample]]]:
    """Metric families by name: (type, samples)."""
    text = httpx.get(f"{url}/metrics").text
    return {f.name: (f.type, f.samples) for f in text_string_to_metric_families(text)}


def value(families: dict[str, tuple[str, list[Sample]]], name: str) -> float:
    samples = families[name][1]
    assert len(samples) == 1, samples
    return float(samples[0].value)


@pytest.fixture
def busy(loaded: Any, adapter_dirs: dict[str, Path], tmp_path: Path) -> Iterator[ServerThread]:
    """A server that runs one sequence at a time, with few resident names listed."""
    srv = start(loaded, tmp_path / "store", adapter_dirs, engine={"max_running": 1, "max_lora_slots": 4},
                metrics_max_resident_adapters=2)
    yield srv
    srv.close()


def _stream(url: str, model: str, tokens: int, done: list[str]) -> None:
    body = {"model": model, "prompt": "w1 w2", "max_tokens": tokens}
    done.append(httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]["finish_reason"])


def test_router_gauges_follow_running_and_waiting_requests(busy: ServerThread):
    idle = scrape(busy.http)
    for name in ROUTER_GAUGES:
        assert idle[name][0] == "gauge", name
    assert [value(idle, n) for n in ROUTER_GAUGES[:3]] == [0, 0, 0]
    done: list[str] = []
    threads = [threading.Thread(target=_stream, args=(busy.http, model, 1500, done)) for model in ("lora", "prefix")]
    threads[0].start()
    assert wait_for(lambda: value(scrape(busy.http), "vllm:num_requests_running") == 1)
    threads[1].start()
    assert wait_for(lambda: value(scrape(busy.http), "vllm:num_requests_waiting") == 1)
    # The adapter names are what the engine last published (at most 0.1 s before).
    assert wait_for(lambda: scrape(busy.http)["vllm:lora_requests_info"][1][0].labels["waiting_lora_adapters"] != "")
    for families in (scrape(busy.http), scrape(f"http://127.0.0.1:{busy.running.metrics_port}")):
        assert value(families, "vllm:num_requests_running") == 1
        assert 0 < value(families, "vllm:kv_cache_usage_perc") <= 1
        [info] = families["vllm:lora_requests_info"][1]
        assert info.labels == {"max_lora": "4", "running_lora_adapters": "lora", "waiting_lora_adapters": "prefix"}
        assert abs(info.value - time.time()) < 5  # a timestamp, by which routers pick the newest sample
        assert families["vllm:num_requests_running"][1][0].labels == {"model_name": BASE_ID}
    for thread in threads:
        thread.join()
    assert done == ["length", "length"]
    after = scrape(busy.http)
    assert [value(after, n) for n in ROUTER_GAUGES[:3]] == [0, 0, 0]
    [info] = after["vllm:lora_requests_info"][1]
    assert info.labels["running_lora_adapters"] == info.labels["waiting_lora_adapters"] == ""


def test_resident_adapters_gauge_is_bounded(busy: ServerThread, adapter_dirs: dict[str, Path]):
    with QuiverClient(busy.target, admin_token=ADMIN) as client:
        for i in range(3):
            client.register_adapter(adapter_dirs["lora"], f"extra-{i}")
        order = ["prompt", "lora", "extra-0", "extra-1", "extra-2", "prefix"]
        for model in order:
            client.generate("w1 w2", adapter=model, max_new_tokens=1)
    families = scrape(busy.http)
    resident = {s.labels["adapter"]: s.labels["kind"] for s in families["quiver_adapter_resident"][1]}
    # Four LoRA slots hold lora and the extras; with two series allowed, the two most recently used are named.
    assert resident == {"prefix@1": "prefix_tuning", "extra-2@1": "lora"}
    by_tier = {s.labels["tier"]: s.value for s in families["quiver_adapters_resident"][1]}
    assert by_tier["device"] == 6 and by_tier["host"] >= 4  # every adapter used is resident; the host holds the files
    assert value(families, "quiver_lora_slots_used") == 4 and value(families, "quiver_lora_slots") == 4
    assert all(s.value == 1 for s in families["quiver_adapter_resident"][1])


def gateway_metric_names() -> set[str]:
    """Every metric name deploy/gateway's YAML gives the endpoint picker: in values, and in `--*-metric=` flags."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for item in node.values():
                walk(item)
        elif isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, str):
            flag = re.fullmatch(r"--[a-z-]+-metric=(.*)", node.strip())
            candidate = (flag.group(1) if flag else node).strip()
            if re.fullmatch(r"(vllm:[a-z0-9_:]+|quiver_[a-z0-9_]+)(\{.*\})?", candidate):
                names.add(candidate.split("{", 1)[0])

    for path in sorted(GATEWAY.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            walk(document)
    return names


def test_every_metric_the_gateway_config_names_is_exported(server: ServerThread):
    names = gateway_metric_names()
    assert set(ROUTER_GAUGES) <= names  # the picker's inputs are configured, so this check is not empty
    families = scrape(server.http)
    for name in names:
        assert name in families, f"deploy/gateway names {name}, which /metrics does not export"
        assert families[name][0] == "gauge", name
