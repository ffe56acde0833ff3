"""What the scenarios share: options, the loaded model, pools of registered adapters, and the result record."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.adapter_maker import AdapterMaker, MadeAdapter
from bench.workload import BenchModel, prompt_ids


@dataclass(frozen=True)
class BenchOptions:
    """Sizes of the workload; the CLI maps 1:1 onto these fields."""

    n: int = 8
    """Concurrent requests (and distinct adapters) in scenarios a-e."""
    rounds: int = 3
    """Times scenarios a-e run, interleaved (a, b, c, d, e, a, b, ...); each ratio is the median of its rounds'
    ratios, so a slow spell of a shared CPU hits both sides of a ratio instead of one scenario."""
    engine_threads: int = 0
    """Torch CPU threads of the engine's thread in the Quiver scenarios (EngineConfig.threads; 0 = torch's default)."""
    peft_threads: int = 0
    """Torch CPU threads of the PEFT scenarios (c, d), each run on a thread of its own (0 = torch's default). The
    main thread (loading, making adapters) runs torch on one thread, so that only one thread's OpenMP team
    exists at a time (bench/README.md, "Threads")."""
    max_new_tokens: int = 64
    """Tokens every request generates; end-of-sequence is disabled, so every request generates exactly this."""
    f_adapters: int = 1000
    """Registered adapters the Zipf traffic of scenario f draws from."""
    f_requests: int = 64
    """Requests of scenario f (both the Zipf run and the single-adapter run)."""
    f_slots: int = 32
    """Device LoRA slots in scenario f (max_lora_slots): 3 % of f_adapters, and as many as the batch has rows, so
    a request never waits for a slot while the batch has room (with fewer slots than rows it may)."""
    f_max_running: int = 32
    """Batch limit (max_running) in scenario f; 32 is the server's default."""
    g_loads: int = 20
    """Distinct cold adapters loaded in scenario g."""
    ttft_loads: int = 5
    """Adapters whose cold and warm time-to-first-token scenario g measures."""
    h_requests: int = 16
    """Chat requests of scenario h (answers end at end-of-sequence, well before h_max_new_tokens)."""
    h_max_new_tokens: int = 512
    """New tokens each request of scenario h allows."""
    h_worst_case_rows: int = 4
    """Rows at their worst case (prompt + h_max_new_tokens) the key/value cache budget of scenario h holds."""
    s_requests: int = 32
    """Requests, each under its own LoRA r8 q/v, in scenario s (and the base batch it is compared with)."""
    s_peft_requests: int = 4
    """Of those, how many PEFT serves one at a time in scenario s (its tokens/s does not depend on the count)."""


@dataclass
class ScenarioResult:
    """One measured row: throughput rows have tokens and wall time; latency rows only details."""

    key: str
    title: str
    requests: int = 0
    tokens: int | None = None
    wall_s: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float | None:
        if self.tokens is None or not self.wall_s:
            return None
        return self.tokens / self.wall_s

    def as_json(self) -> dict[str, Any]:
        tps = self.tokens_per_s
        return {
            "title": self.title,
            "requests": self.requests,
            "tokens": self.tokens,
            "wall_s": None if self.wall_s is None else round(self.wall_s, 3),
            "tokens_per_s": None if tps is None else round(tps, 2),
            **self.details,
        }


class Context:
    """The model, the options, and adapters made on first use and shared between scenarios."""

    def __init__(self, bm: BenchModel, options: BenchOptions, work_dir: Path) -> None:
        self.bm = bm
        self.options = options
        self.maker = AdapterMaker(bm, work_dir)
        self._pools: dict[str, list[MadeAdapter]] = {}

    def prompts(self, count: int) -> list[tuple[int, ...]]:
        return prompt_ids(self.bm.tokenizer, count)

    def adapters(self, kind: str, count: int) -> list[MadeAdapter]:
        """The first `count` adapters of `kind`'s shared pool, made and registered as needed."""
        pool = self._pools.setdefault(kind, [])
        if len(pool) < count:
            made = self.maker.make(kind, count - len(pool), f"{kind}-{len(pool)}")
            pool.extend(made.adapters)
        return pool[:count]
