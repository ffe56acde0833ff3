"""The metrics an operator runs on, read from a live server's /metrics after real traffic: queue waits, engine
forwards by phase, cold loads by tier, registrations and rejections, what runs where, memory, and per-adapter
series bounded by --metrics-max-adapters."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from quiver.clients.client import QuiverClient
from quiver.clients.errors import QuiverRpcError

from ...server_thread import ServerThread
from .conftest import ADMIN, start

CANARY = "zebra-canary-123"


def samples(srv: ServerThread) -> list[Sample]:
    text = httpx.get(f"http://127.0.0.1:{srv.running.metrics_port}/metrics").text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(all_samples: list[Sample], name: str, **labels: str) -> float:
    found = [s.value for s in all_samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert found, f"no {name}{labels}"
    return float(sum(found))


@pytest.fixture(scope="module")
def busy(loaded: Any, adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[ServerThread]:
    """A server with two adapters named in metrics, five LoRAs (copies) and the three kinds, after traffic."""
    srv = start(loaded, tmp_path_factory.mktemp("store"), adapter_dirs, metrics_max_adapters=2)
    try:
        with QuiverClient(srv.target, admin_token=ADMIN) as client:
            for name in ("hot-a", "hot-b", "cold-c", "cold-d", "cold-e"):
                client.register_adapter(adapter_dirs["lora"], name)
            with pytest.raises(QuiverRpcError):
                client.register_adapter(adapter_dirs["lora"].parent, "not-an-adapter")  # a directory of adapters
            for adapter in ["hot-a"] * 4 + ["hot-b"] * 4 + ["cold-c", "cold-d", "cold-e", "prompt", "prefix", ""]:
                client.generate(f"w1 w2 {CANARY}", adapter=adapter, max_new_tokens=3)
            with pytest.raises(QuiverRpcError):
                client.generate("w1", adapter="missing", max_new_tokens=1)
        yield srv
    finally:
        srv.close()


def test_engine_series_count_the_traffic(busy: ServerThread):
    s = samples(busy)
    requests = 14  # the generations that ran
    assert value(s, "quiver_queue_wait_seconds_count") == requests
    assert value(s, "quiver_step_rows_sum", phase="prefill") == requests  # each prompt prefilled once
    assert value(s, "quiver_step_rows_sum", phase="decode") == requests * 2  # tokens 2 and 3 of each
    assert value(s, "quiver_step_duration_seconds_count", phase="decode") >= 2
    assert value(s, "quiver_step_duration_seconds_sum", phase="prefill") > 0
    assert value(s, "quiver_step_tokens_sum", phase="decode") == requests * 2
    assert value(s, "quiver_step_tokens_sum", phase="prefill") > requests * 3  # prompts, soft prompts included


def test_cold_loads_by_tier_and_what_the_tiers_hold(busy: ServerThread):
    s = samples(busy)
    # Every adapter used loaded once into each tier (the device tier has room for all of them).
    assert value(s, "quiver_adapter_load_duration_seconds_count", tier="host") == 7
    assert value(s, "quiver_adapter_load_duration_seconds_count", tier="device") == 7
    assert value(s, "quiver_adapters_resident", tier="device") == 7
    assert value(s, "quiver_lora_slots_used") == 5
    assert value(s, "quiver_adapter_bytes", tier="host") > 0


def test_registrations_rejections_and_registered_adapters(busy: ServerThread):
    s = samples(busy)
    assert value(s, "quiver_adapter_registrations_total", kind="lora") == 6  # "lora" and the five copies
    assert value(s, "quiver_adapter_registrations_total", kind="prompt_tuning") == 1
    assert value(s, "quiver_adapter_rejections_total", reason="invalid_argument") == 1
    assert value(s, "quiver_adapters_registered") == 8


def test_model_info_readiness_and_memory(busy: ServerThread):
    s = samples(busy)
    [info] = [x for x in s if x.name == "quiver_model_info"]
    assert info.value == 1
    assert info.labels["model"] == "tiny" and info.labels["device"] == "cpu" and info.labels["dtype"] == "float32"
    assert info.labels["fingerprint"].startswith("sha256:") and info.labels["version"]
    assert value(s, "quiver_ready") == 1
    assert value(s, "process_resident_memory_bytes") > 10 * 2**20


def test_per_adapter_series_name_the_busiest_and_bound_the_rest(busy: ServerThread):
    s = samples(busy)
    per_adapter = [x for x in s if x.name.startswith("quiver_adapter_") and "adapter" in x.labels
                   and x.name != "quiver_adapter_resident"]  # the router's gauge names resident versions
    assert {x.labels["adapter"] for x in per_adapter} == {"hot-a", "hot-b", "other"}
    assert value(s, "quiver_adapter_requests_total", adapter="hot-a", code="OK") == 4
    assert value(s, "quiver_adapter_generation_tokens_total", adapter="hot-b") == 12
    # cold-c..e, prompt and prefix: five calls under "other"; the base call and the unknown adapter have none.
    assert value(s, "quiver_adapter_requests_total", adapter="other") == 5
    assert value(s, "quiver_adapter_request_duration_seconds_count", adapter="hot-a") == 4
    assert value(s, "quiver_adapter_time_to_first_token_seconds_count", adapter="other") == 5


def test_no_label_holds_a_prompt_or_a_path(busy: ServerThread, adapter_dirs: dict[str, Path]):
    text = httpx.get(busy.http + "/metrics").text
    assert CANARY not in text and str(adapter_dirs["lora"].parent) not in text
