"""Per-adapter series stay bounded however many adapters there are, name the busiest, and never go backwards."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from quiver.common.errors import AlreadyExists, FailedPrecondition, TooLarge
from quiver.server.api.adapter_metrics import OTHER, AdapterSeries, BusiestAdapters
from quiver.server.api.metrics import ServerMetrics, rejection_reason

BUCKETS = (0.1, 1.0, float("inf"))
PER_ADAPTER = ("quiver_adapter_requests", "quiver_adapter_prompt_tokens", "quiver_adapter_generation_tokens",
               "quiver_adapter_request_duration_seconds", "quiver_adapter_time_to_first_token_seconds")


def series(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every per-adapter sample, by name and labels."""
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        if family.name in PER_ADAPTER:
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def adapters_named(registry: CollectorRegistry) -> set[str]:
    return {dict(labels)["adapter"] for (_, labels) in series(registry)}


def observe(metrics: AdapterSeries, name: str, code: str = "OK") -> None:
    metrics.observe(name, code, 0.05, prompt_tokens=10, generated_tokens=3, ttft=0.01)


def test_ten_thousand_adapters_keep_the_series_count_bounded_and_name_the_busiest():
    registry = CollectorRegistry()
    limit = 20
    metrics = AdapterSeries(registry, limit, BUCKETS)
    rng = random.Random(0)
    names = [f"adapter-{i}" for i in range(10_000)]
    hot = names[:5]
    bound = None
    for i, name in enumerate(names):  # every adapter gets requests; five get most of them
        observe(metrics, name, "OK" if i % 7 else "NOT_FOUND")
        observe(metrics, rng.choice(hot))
        observe(metrics, rng.choice(hot))
        if i % 1000 == 999:
            named = adapters_named(registry)
            assert len(named) <= limit + 1, len(named)
            count = len(series(registry))
            # Per label: requests (2 codes at most) + 2 token counters + 2 histograms of 3 buckets, count and sum.
            bound = (limit + 1) * (2 + 2 + 2 * (3 + 2))
            assert count <= bound, count
    named = adapters_named(registry)
    assert set(hot) <= named and OTHER in named  # the busiest are named, the long tail is "other"
    assert len(metrics.busiest.labelled) == limit and bound is not None


def test_counters_only_grow_while_a_series_exists():
    registry = CollectorRegistry()
    metrics = AdapterSeries(registry, 2, BUCKETS)
    before: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    rng = random.Random(1)
    for step in range(3000):
        observe(metrics, f"a{rng.randrange(50) if step % 3 else rng.randrange(3)}")
        now = series(registry) if step % 50 == 0 else None
        if now is None:
            continue
        for key, value in now.items():
            if key in before and key[0].endswith(("_total", "_count", "_sum", "_bucket")):
                assert value >= before[key], key
        before = now
    requests = sum(v for (n, _), v in series(registry).items() if n == "quiver_adapter_requests_total")
    assert requests <= 3000  # a demoted adapter's history leaves with its series; nothing is counted twice


def test_a_busier_adapter_takes_the_quietest_label_and_its_series_go():
    dropped: list[str] = []
    busiest = BusiestAdapters(2, dropped.append)
    assert [busiest.label(n) for n in ("a", "b", "c")] == ["a", "b", OTHER]  # the first two fill the labels
    for name, more in (("a", 4), ("b", 3)):  # a: 5 requests, b: 4
        for _ in range(more):
            busiest.label(name)
    for _ in range(6):  # c: 2..7 requests, under twice b's 4
        assert busiest.label("c") == OTHER
    assert busiest.label("c") == "c" and dropped == ["b"]  # 8 = twice the quietest label's count
    assert busiest.labelled == {"a", "c"}


def test_limit_zero_names_no_adapter():
    registry = CollectorRegistry()
    metrics = AdapterSeries(registry, 0, BUCKETS)
    for name in ("x", "y"):
        observe(metrics, name)
    assert adapters_named(registry) == {OTHER}


def test_removed_series_leave_the_exposition():
    registry = CollectorRegistry()
    metrics = AdapterSeries(registry, 1, BUCKETS)
    observe(metrics, "quiet")
    for _ in range(5):
        observe(metrics, "loud")
    assert adapters_named(registry) == {"loud", OTHER}


def test_registrations_and_rejections_are_labelled_by_kind_and_error_class():
    metrics = ServerMetrics()
    for _ in range(10_000):
        metrics.observe_registration("lora", None)
    metrics.observe_registration(None, FailedPrecondition("adapter does not fit", reasons=["rank 9 > 8"]))
    metrics.observe_registration(None, TooLarge("too big"))
    metrics.observe_registration(None, AlreadyExists("taken"))
    text = metrics.exposition().decode()
    assert 'quiver_adapter_registrations_total{kind="lora"} 10000.0' in text
    for reason in ("failed_precondition", "too_large", "already_exists"):
        assert f'quiver_adapter_rejections_total{{reason="{reason}"}} 1.0' in text
    assert "rank 9" not in text  # reasons' text (which may hold paths) never becomes a label
    assert rejection_reason(FailedPrecondition("x")) == "failed_precondition"
