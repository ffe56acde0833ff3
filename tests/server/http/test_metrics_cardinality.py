"""10,000 registrations and requests over them do not grow /metrics past --metrics-max-adapters' bound: a live
server, real registrations through gRPC, real generations."""

from __future__ import annotations

import concurrent.futures
import os
import random
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from quiver.clients.client import QuiverClient

from .conftest import ADMIN, start

ADAPTERS = int(os.environ.get("QUIVER_TEST_CARDINALITY_ADAPTERS", "10000"))
LIMIT = 5


def series_count(http: str) -> tuple[int, set[str]]:
    """Series (samples) on /metrics, and the adapter label values of the per-adapter families."""
    text = httpx.get(http + "/metrics", timeout=30).text
    count, named = 0, set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            count += 1
            per_adapter = family.name.startswith("quiver_adapter_") and family.name != "quiver_adapter_resident"
            if per_adapter and "adapter" in sample.labels:
                named.add(sample.labels["adapter"])
    return count, named


def test_ten_thousand_adapters_do_not_grow_the_series_count(loaded: Any, adapter_dirs: dict[str, Path],
                                                            tmp_path: Path):
    srv = start(loaded, tmp_path / "store", adapter_dirs, register=False, metrics_max_adapters=LIMIT,
                engine={"max_lora_slots": 8})
    try:
        with QuiverClient(srv.target, admin_token=ADMIN) as client:
            names = [f"a{i}" for i in range(ADAPTERS)]
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda n: client.register_adapter(adapter_dirs["lora"], n), names))
            rng = random.Random(0)
            traffic = names + [rng.choice(names[:3]) for _ in range(ADAPTERS // 2)]  # three hot adapters
            rng.shuffle(traffic)
            checkpoints = {len(traffic) // 4, len(traffic) // 2, len(traffic) - 1}
            counts = []

            def one(i: int) -> None:
                client.generate("w1 w2", adapter=traffic[i], max_new_tokens=1)

            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                done = 0
                for stop in sorted(checkpoints):
                    list(pool.map(one, range(done, stop + 1)))
                    done = stop + 1
                    counts.append(series_count(srv.http))
        for _, named in counts:
            assert len(named) <= LIMIT + 1, named
        totals = [count for count, _ in counts]
        assert max(totals) - min(totals) <= 2 * (LIMIT + 1) * 40, totals  # relabelling may swap series, never add
        assert {"a0", "a1", "a2"} <= counts[-1][1] and "other" in counts[-1][1]
        registered = next(line for line in httpx.get(srv.http + "/metrics").text.splitlines()
                          if line.startswith("quiver_adapters_registered "))
        assert float(registered.split()[-1]) == ADAPTERS
    finally:
        srv.close()
