"""The parts of bench/soak.py that run inside its event loop: streaming clients of each front, the adapter churn,
the register/delete cycles, the server's resources read from /proc, and its /metrics request counts.

Every request is one `Done` record. Its `error` is None, or a code: the gRPC status name (`NOT_FOUND`), the HTTP
status of a refused request (`404`), `stream:<code>` for an error event inside an HTTP stream, `transport:<type>`
for a failure below either protocol, or `short` for a stream that ended without error but with fewer tokens than
asked (every request sets ignore_eos). Shedding (RESOURCE_EXHAUSTED / 429) is deliberate, and so is NOT_FOUND / 404
for an adapter the churn deleted; everything else counts against the soak.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.workload import PROMPTS
from quiver.clients.aio import AsyncQuiverClient
from quiver.clients.errors import QuiverRpcError

SHEDDING = frozenset({"RESOURCE_EXHAUSTED", "429", "stream:resource_exhausted"})
NOT_FOUND = frozenset({"NOT_FOUND", "404", "stream:not_found", "stream:model_not_found"})


@dataclass(frozen=True)
class Done:
    """One finished request, timed with time.monotonic()."""

    front: str
    adapter: str  # "" = the base model
    start: float
    end: float
    ttft_s: float | None
    tokens: int
    error: str | None = None
    deliberate: bool = False


@dataclass
class AdapterPool:
    """The adapters clients may name (oldest first), and those the churn took out of it."""

    active: list[str]
    deleted: set[str] = field(default_factory=set)

    def pick(self, rng: random.Random, base_fraction: float) -> str:
        if not self.active or rng.random() < base_fraction:
            return ""
        return rng.choice(self.active)

    def retire_oldest(self) -> str:
        """Take the oldest adapter out of the pool before it is deleted, so clients stop picking it."""
        name = self.active.pop(0)
        self.deleted.add(name)
        return name


@dataclass
class Load:
    """What every client shares: the pool, the stop signal, the request shape and the records."""

    pool: AdapterPool
    stop: asyncio.Event
    max_new_tokens: int
    base_fraction: float
    base_model: str  # the HTTP `model` of the base
    request_timeout: float
    done: list[Done] = field(default_factory=list)

    def record(self, front: str, adapter: str, start: float, ttft: float | None, tokens: int,
               error: str | None) -> None:
        if error is None and tokens != self.max_new_tokens:
            error = "short"
        deliberate = error is not None and (
            error in SHEDDING or (error in NOT_FOUND and adapter in self.pool.deleted))
        self.done.append(Done(front, adapter, start, time.monotonic(), ttft, tokens, error, deliberate))


async def grpc_client(load: Load, target: str, index: int) -> None:
    """One gRPC client on its own channel: stream requests one after another until `load.stop`."""
    rng = random.Random(index)
    async with AsyncQuiverClient(target, timeout=load.request_timeout) as client:
        for n in itertools.count():
            if load.stop.is_set():
                return
            adapter = load.pool.pick(rng, load.base_fraction)
            start, ttft, tokens, error = time.monotonic(), None, 0, None
            try:
                async for chunk in client.generate_stream(
                        PROMPTS[(index + n) % len(PROMPTS)], adapter=adapter, max_new_tokens=load.max_new_tokens,
                        temperature=0.0, ignore_eos=True):
                    if ttft is None and chunk.token_ids:
                        ttft = time.monotonic() - start
                    tokens += len(chunk.token_ids)
            except QuiverRpcError as e:
                error = e.code.name
            except Exception as e:  # a soak keeps going: anything else is counted, by type
                error = f"transport:{type(e).__name__}"
            load.record("grpc", adapter, start, ttft, tokens, error)


async def http_client(load: Load, url: str, index: int) -> None:
    """One HTTP client on its own connection: stream /v1/completions one after another until `load.stop`."""
    rng = random.Random(index)
    limits = httpx.Limits(max_connections=1)
    async with httpx.AsyncClient(base_url=url, timeout=load.request_timeout, limits=limits) as client:
        for n in itertools.count():
            if load.stop.is_set():
                return
            adapter = load.pool.pick(rng, load.base_fraction)
            start = time.monotonic()
            try:
                ttft, tokens, error = await _http_stream(client, adapter or load.base_model,
                                                         PROMPTS[(index + n) % len(PROMPTS)], load.max_new_tokens)
            except Exception as e:
                ttft, tokens, error = None, 0, f"transport:{type(e).__name__}"
            load.record("http", adapter, start, ttft, tokens, error)


async def _http_stream(client: httpx.AsyncClient, model: str, prompt: str,
                       max_tokens: int) -> tuple[float | None, int, str | None]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    start = time.monotonic()
    ttft: float | None = None
    tokens, error = 0, None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return None, 0, str(response.status_code)
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = f"stream:{chunk['error'].get('code')}"
            elif chunk.get("choices"):
                if ttft is None:
                    ttft = time.monotonic() - start
            elif chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft, tokens, error


@dataclass
class Churn:
    """Adapters registered and deleted while the clients run."""

    registered: int = 0
    deleted: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    register_s: list[float] = field(default_factory=list)
    delete_s: list[float] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"registered": self.registered, "deleted": self.deleted, "errors": dict(self.errors),
                "register_ms_p50": _ms(_pct(self.register_s, 50)), "delete_ms_p50": _ms(_pct(self.delete_s, 50))}


async def churn(load: Load, admin: AsyncQuiverClient, sources: list[Path], every_s: float,
                grace_s: float) -> Churn:
    """Every `every_s`: register a new adapter (the next source under a new name), take the oldest out of the pool,
    and delete it `grace_s` later (requests that picked it just before are already in the engine by then)."""
    out = Churn()
    for i in itertools.count():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(load.stop.wait(), every_s)
        if load.stop.is_set():
            return out
        name = f"churn-{i:05d}"
        t0 = time.monotonic()
        try:
            await admin.register_adapter(sources[i % len(sources)], name)
            out.register_s.append(time.monotonic() - t0)
            out.registered += 1
            load.pool.active.append(name)
        except QuiverRpcError as e:
            out.errors[f"register:{e.code.name}"] += 1
        old = load.pool.retire_oldest()
        await asyncio.sleep(grace_s)
        t0 = time.monotonic()
        try:
            await admin.delete_adapter(old)
            out.delete_s.append(time.monotonic() - t0)
            out.deleted += 1
        except QuiverRpcError as e:
            out.errors[f"delete:{e.code.name}"] += 1
    return out


@dataclass(frozen=True)
class Sample:
    """The server process at one moment: resident memory, open file descriptors, threads."""

    t: float  # seconds since the sampler started
    phase: str
    rss_mib: float
    fds: int
    threads: int

    def as_json(self) -> dict[str, Any]:
        return {"t": round(self.t, 1), "phase": self.phase, "rss_mib": round(self.rss_mib, 1), "fds": self.fds,
                "threads": self.threads}


class Sampler:
    """Reads /proc/PID every `every_s` seconds (and on demand, with a label), into `samples`."""

    def __init__(self, pid: int, every_s: float) -> None:
        self.pid, self.every_s, self.phase = pid, every_s, "start"
        self.samples: list[Sample] = []
        self._t0 = time.monotonic()

    def take(self, label: str | None = None) -> Sample:
        status = Path(f"/proc/{self.pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        sample = Sample(time.monotonic() - self._t0, label or self.phase, int(fields["VmRSS"].split()[0]) / 1024,
                        len(os.listdir(f"/proc/{self.pid}/fd")), int(fields["Threads"]))
        self.samples.append(sample)
        return sample

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            self.take()


@dataclass
class Cycles:
    """The register/delete cycles of one small adapter (a new name each time)."""

    asked: int
    done: int = 0
    used: int = 0  # cycles that also generated one token with the adapter before deleting it
    errors: Counter[str] = field(default_factory=Counter)
    cycle_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    stopped_by_time: bool = False
    samples: dict[str, Sample] = field(default_factory=dict)


async def run_cycles(admin: AsyncQuiverClient, source: Path, cycles: Cycles, sampler: Sampler,
                     use_every: int, minutes: float) -> None:
    """Register `source` under a new name and delete it, `cycles.asked` times or until `minutes` pass. Samples
    are taken before the first cycle, after a warm-up of a tenth of them, and after the last."""
    warm = max(1, cycles.asked // 10)
    sampler.phase = "cycles"
    cycles.samples["before"] = sampler.take("cycles")
    t0 = time.monotonic()
    for i in range(cycles.asked):
        if time.monotonic() - t0 > minutes * 60:
            cycles.stopped_by_time = True
            break
        start = time.monotonic()
        await _cycle(admin, source, f"cycle-{i:05d}", use_every > 0 and i % use_every == 0, cycles)
        cycles.cycle_s.append(time.monotonic() - start)
        cycles.done += 1
        if cycles.done == warm:
            cycles.samples["after_warmup"] = sampler.take("cycles")
    cycles.wall_s = time.monotonic() - t0
    await asyncio.sleep(1)  # let the server close what the last cycle opened
    cycles.samples["after"] = sampler.take("cycles-end")


async def _cycle(admin: AsyncQuiverClient, source: Path, name: str, use: bool, cycles: Cycles) -> None:
    try:
        await admin.register_adapter(source, name)
    except QuiverRpcError as e:
        cycles.errors[f"register:{e.code.name}"] += 1
        return
    if use:
        try:
            await admin.generate("Hello", adapter=name, max_new_tokens=1, temperature=0.0)
            cycles.used += 1
        except QuiverRpcError as e:
            cycles.errors[f"generate:{e.code.name}"] += 1
    try:
        await admin.delete_adapter(name)
    except QuiverRpcError as e:
        cycles.errors[f"delete:{e.code.name}"] += 1


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 1)


# --- summary of one run --------------------------------------------------------------------------------------------

RSS_GROWTH_GOAL = 5.0  # % from the end of the warm-up to the end of the load
CYCLES_RSS_GOAL = 1.0  # % over the cycles, after their warm-up


def summarize(m: dict[str, Any], args: Any) -> dict[str, Any]:
    """The JSON of a run from what `soak` measured (`m`): per-front figures over the window, errors, resources,
    churn, cycles, the server's own counts and the targets."""
    done: list[Done] = m["done"]
    w0, w1 = m["window"]
    errors = _errors(done)
    resources = _resources(m["marks"], m["samples"], w1 - w0)
    cycles = _cycles(m["cycles"])
    targets = [
        _target("errors other than deliberate", sum(errors["other"].values()), "== 0",
                not errors["other"] and not m["client_failures"]),
        _target("RSS growth after warm-up, %", resources["rss_growth_pct"], f"< {RSS_GROWTH_GOAL:g}",
                resources["rss_growth_pct"] < RSS_GROWTH_GOAL),
        _target("cycles: fd growth after their warm-up", cycles["fds_growth"], "<= 0", cycles["fds_growth"] <= 0),
        _target("cycles: RSS growth after their warm-up, %", cycles["rss_growth_pct"], f"< {CYCLES_RSS_GOAL:g}",
                cycles["rss_growth_pct"] < CYCLES_RSS_GOAL),
        _target("cycles: errors", sum(cycles["errors"].values()), "== 0", not cycles["errors"]),
    ]
    return {
        "window_s": round(w1 - w0, 1),
        "fronts": {front: _front(done, front, w0, w1) for front in ("grpc", "http", None)},
        "errors": errors,
        "cross_check": m["cross_check"],
        "server_state": m["tiers"],
        "resources": resources,
        "registration_s": m["registration_s"],
        "churn": m["churn"].as_json(),
        "cycles": cycles,
        "targets": targets,
        "client_failures": m["client_failures"],
        "clients_cancelled": m["clients_cancelled"],
        "server_exit_code": m["server_exit_code"],
        "server_log": m["server_log"],
        "samples": [s.as_json() for s in m["samples"]],
    }


def _target(name: str, measured: float, goal: str, ok: bool) -> dict[str, Any]:
    return {"target": name, "measured": measured, "goal": goal, "result": "PASS" if ok else "MISS"}


def _front(done: list[Done], front: str | None, w0: float, w1: float) -> dict[str, Any]:
    """Requests that finished without error inside the window: throughput, latency and time to first token."""
    ok = [d for d in done if d.error is None and w0 <= d.end <= w1 and front in (None, d.front)]
    seconds = max(w1 - w0, 1e-6)
    latency = [d.end - d.start for d in ok]
    ttft = [d.ttft_s for d in ok if d.ttft_s is not None]
    return {"front": front or "all", "requests": len(ok), "tokens": sum(d.tokens for d in ok),
            "req_per_s": round(len(ok) / seconds, 2), "tok_per_s": round(sum(d.tokens for d in ok) / seconds, 1),
            "latency_ms_p50": _ms(_pct(latency, 50)), "latency_ms_p99": _ms(_pct(latency, 99)),
            "ttft_ms_p50": _ms(_pct(ttft, 50)), "ttft_ms_p99": _ms(_pct(ttft, 99))}


def _pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


def _errors(done: list[Done]) -> dict[str, Any]:
    """Every request of the run (warm-up and drain included), failed ones by front and code."""
    deliberate = Counter(f"{d.front} {d.error}" for d in done if d.error and d.deliberate)
    other = Counter(f"{d.front} {d.error}" for d in done if d.error and not d.deliberate)
    return {"requests": len(done), "ok": sum(d.error is None for d in done),
            "deliberate": dict(sorted(deliberate.items())), "other": dict(sorted(other.items()))}


def _growth(before: Sample, after: Sample) -> dict[str, Any]:
    return {"rss_mib": [round(before.rss_mib, 1), round(after.rss_mib, 1)], "fds": [before.fds, after.fds],
            "threads": [before.threads, after.threads],
            "rss_growth_pct": round(100 * (after.rss_mib - before.rss_mib) / before.rss_mib, 2),
            "fds_growth": after.fds - before.fds}


def _resources(marks: dict[str, Sample], samples: list[Sample], window_s: float) -> dict[str, Any]:
    """The server's RSS and fds: ready, adapters registered, end of warm-up (the baseline), end of load, after the
    clients closed, the maximum over the window, growth, and the trend of RSS over the window."""
    start, end = marks["warm"], marks["end"]
    window = [s for s in samples if start.t <= s.t <= end.t]
    slope = statistics.linear_regression([s.t for s in window], [s.rss_mib for s in window]).slope \
        if len(window) > 2 else 0.0
    return {**_growth(start, end), "marks": {k: s.as_json() for k, s in marks.items()},
            "rss_max_mib": round(max(s.rss_mib for s in window), 1), "fds_max": max(s.fds for s in window),
            "rss_trend_mib_per_min": round(60 * slope, 2), "window_s": round(window_s, 1)}


def _cycles(c: Cycles) -> dict[str, Any]:
    """Counts, rate and per-cycle times; RSS, fds and threads from the end of the cycles' warm-up to the end."""
    base = c.samples.get("after_warmup", c.samples["before"])
    measured = c.done - (max(1, c.asked // 10) if "after_warmup" in c.samples else 0)
    return {"asked": c.asked, "done": c.done, "used": c.used, "stopped_by_time": c.stopped_by_time,
            "wall_s": round(c.wall_s, 1), "per_s": round(c.done / c.wall_s, 1) if c.wall_s else None,
            "cycle_ms_p50": _ms(_pct(c.cycle_s, 50)), "cycle_ms_p99": _ms(_pct(c.cycle_s, 99)),
            "errors": dict(c.errors), "samples": {k: s.as_json() for k, s in c.samples.items()},
            **_growth(base, c.samples["after"]),
            "rss_kib_per_cycle": round(1024 * (c.samples["after"].rss_mib - base.rss_mib) / max(1, measured), 2),
            "from_before": _growth(c.samples["before"], c.samples["after"])}
