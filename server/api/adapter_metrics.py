"""Per-adapter series with bounded cardinality: the busiest adapters get a label of their own, the rest share
`adapter="other"`.

A store may hold thousands of adapters; a label per adapter would grow the series count (and every dashboard
query) without bound, which is why LoRAX exports none and vLLM packs names into one string. Here at most
`limit` adapters are labelled at any time. Which ones is decided by a decayed request count, kept for a bounded
set of candidates (the Space-Saving heavy-hitters sketch: a new adapter replaces the least busy unlabelled
candidate and inherits its count, so a burst of one-off adapters cannot push out the busy ones). A candidate
replaces the least busy labelled adapter once it is clearly busier (twice its count), so labels do not flap;
the replaced adapter's series are removed (its later requests count under "other"). Every counter only grows
while its series exists. Base-model requests have no adapter and are not counted here (they are the
`kind="base"` series). An adapter literally named "other" shares the bucket's label.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram

OTHER = "other"
_HALF_LIFE_PER_LABEL = 64  # counts halve every `limit * this` requests: "busiest" means recently busiest
_PROMOTE_FACTOR = 2.0


class BusiestAdapters:
    """Which adapter names are labelled: at most `limit` of them, by decayed request count. Not thread-safe: its
    owner serialises calls (AdapterSeries)."""

    def __init__(self, limit: int, on_unlabel: Callable[[str], None]) -> None:
        self._limit = limit
        self._capacity = 4 * limit + 16  # candidates tracked; beyond them Space-Saving replaces the least busy
        self._counts: dict[str, float] = {}
        self._labelled: set[str] = set()
        self._on_unlabel = on_unlabel
        self._seen = 0

    @property
    def labelled(self) -> frozenset[str]:
        return frozenset(self._labelled)

    def label(self, adapter: str) -> str:
        """Count one request of `adapter`; the label its series use now (`adapter`, or "other")."""
        if self._limit == 0:
            return OTHER
        self._count(adapter)
        if adapter not in self._labelled:
            self._maybe_promote(adapter)
        return adapter if adapter in self._labelled else OTHER

    def _count(self, adapter: str) -> None:
        self._seen += 1
        if self._seen % (self._limit * _HALF_LIFE_PER_LABEL) == 0:
            self._counts = {name: count / 2 for name, count in self._counts.items()}
        if adapter in self._counts:
            self._counts[adapter] += 1
            return
        inherited = 0.0
        if len(self._counts) >= self._capacity:
            victim = min((n for n in self._counts if n not in self._labelled), key=self._counts.__getitem__)
            inherited = self._counts.pop(victim)
        self._counts[adapter] = inherited + 1

    def _maybe_promote(self, adapter: str) -> None:
        if len(self._labelled) < self._limit:
            self._labelled.add(adapter)
            return
        quietest = min(self._labelled, key=self._counts.__getitem__)
        if self._counts[adapter] >= _PROMOTE_FACTOR * self._counts[quietest]:
            self._labelled.discard(quietest)
            self._labelled.add(adapter)
            self._on_unlabel(quietest)


class AdapterSeries:
    """Request, token and latency series by adapter, over `BusiestAdapters`."""

    def __init__(self, registry: CollectorRegistry, limit: int, latency_buckets: tuple[float, ...]) -> None:
        self.requests = Counter(
            "quiver_adapter_requests", "Generation calls finished, by adapter (the busiest; the rest are \"other\") "
            "and status code", ["adapter", "code"], registry=registry,
        )
        self.prompt_tokens = Counter(
            "quiver_adapter_prompt_tokens", "Prompt tokens of generation calls, by adapter", ["adapter"],
            registry=registry,
        )
        self.generation_tokens = Counter(
            "quiver_adapter_generation_tokens", "Tokens generated, by adapter", ["adapter"], registry=registry,
        )
        self.duration = Histogram(
            "quiver_adapter_request_duration_seconds", "End-to-end generation call latency, by adapter",
            ["adapter"], buckets=latency_buckets, registry=registry,
        )
        self.ttft = Histogram(
            "quiver_adapter_time_to_first_token_seconds", "From submission to the first generated token, by adapter",
            ["adapter"], buckets=latency_buckets, registry=registry,
        )
        self._codes: dict[str, set[str]] = {}  # label -> codes it has series for (to remove them all)
        self._lock = threading.RLock()  # one call's label choice and series updates are one step
        self.busiest = BusiestAdapters(limit, self._remove)

    def observe(self, adapter: str, code: str, seconds: float, prompt_tokens: int, generated_tokens: int,
                ttft: float | None) -> None:
        """One finished generation call of `adapter`."""
        with self._lock:
            label = self.busiest.label(adapter)
            self._codes.setdefault(label, set()).add(code)
            self.requests.labels(adapter=label, code=code).inc()
            self.prompt_tokens.labels(adapter=label).inc(prompt_tokens)
            self.generation_tokens.labels(adapter=label).inc(generated_tokens)
            self.duration.labels(adapter=label).observe(seconds)
            if ttft is not None:
                self.ttft.labels(adapter=label).observe(ttft)

    def _remove(self, label: str) -> None:
        """Drop every series of an adapter that lost its label (called from `observe`, under the lock)."""
        for code in self._codes.pop(label, ()):
            self.requests.remove(label, code)
        for metric in (self.prompt_tokens, self.generation_tokens, self.duration, self.ttft):
            with contextlib.suppress(KeyError):  # never observed (a histogram without a ttft)
                metric.remove(label)
