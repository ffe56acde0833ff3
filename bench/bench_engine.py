"""Quiver's engine against PEFT, side by side in one process on one base model, with the same prompts and lengths.

Scenarios (bench/README.md explains each): a) base model only, batched; b) N distinct LoRAs in one batch;
c) PEFT one request at a time; d) PEFT's mixed-batch generate; e) LoRA, prompt and prefix adapters mixed;
f) Zipf traffic over 1,000 adapters with a few device slots vs one adapter; g) cold-adapter load and
time-to-first-token; h) preemption; s) 32 distinct LoRA r8 q/v at batch 32 vs the base and PEFT. Prints a
table and the targets, and writes everything to a JSON file.

    python -m bench.bench_engine                 # full CPU run, writes bench/results/engine-cpu.json
    python -m bench.bench_engine --quick         # smoke run, small sizes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench import peft_scenarios, preempt_scenario, quiver_scenarios, scale_scenario
from bench.context import BenchOptions, Context, ScenarioResult
from bench.workload import MODEL_CONFIGS, cache_dir, environment, load_bench_model

Scenario = Callable[[Context], list[ScenarioResult]]

# Scenario letter -> what it runs; run in this order.
SCENARIOS: dict[str, Scenario] = {
    "a": quiver_scenarios.scenario_a,
    "b": quiver_scenarios.scenario_b,
    "c": peft_scenarios.scenario_c,
    "d": peft_scenarios.scenario_d,
    "e": quiver_scenarios.scenario_e,
    "f": quiver_scenarios.scenario_f,
    "g": quiver_scenarios.scenario_g,
    "h": preempt_scenario.scenario_h,
    "s": scale_scenario.scenario_s,
}
QUICK = BenchOptions(n=4, rounds=1, max_new_tokens=8, f_adapters=40, f_requests=16, f_slots=4, g_loads=5, ttft_loads=2,
                     h_requests=6, h_max_new_tokens=128, h_worst_case_rows=2, s_requests=8, s_peft_requests=2)
REPEATED = "abcdes"  # throughput scenarios run once per round; f and g (with their own repetitions) once
RESULTS_DIR = Path(__file__).resolve().parent / "results"
Rounds = list[dict[str, ScenarioResult]]


@dataclass(frozen=True)
class Target:
    """A goal on one measured value: a ratio of two scenarios' tokens/s, or a latency."""

    label: str
    value: Callable[[dict[str, ScenarioResult]], float | None]
    goal: float
    unit: str = "x"
    higher_is_better: bool = True

    def check(self, rounds: Rounds) -> dict[str, Any]:
        values = [v for v in (self._value(results) for results in rounds) if v is not None]
        value = statistics.median(values) if values else None
        if value is None:
            verdict = "n/a"
        else:
            verdict = "PASS" if (value >= self.goal if self.higher_is_better else value <= self.goal) else "MISS"
        sign = ">=" if self.higher_is_better else "<="
        return {"target": self.label, "value": None if value is None else round(value, 3),
                "per_round": [round(v, 3) for v in values],
                "goal": f"{sign} {self.goal:g}{self.unit}", "result": verdict}

    def _value(self, results: dict[str, ScenarioResult]) -> float | None:
        try:
            return self.value(results)
        except KeyError:  # a scenario it needs was not run (in this round)
            return None


def _ratio(results: dict[str, ScenarioResult], top: str, bottom: str) -> float | None:
    a, b = results[top].tokens_per_s, results[bottom].tokens_per_s
    return None if a is None or not b else a / b


TARGETS = (
    Target("(b)/(a) tokens/s: distinct LoRAs vs base", lambda r: _ratio(r, "b", "a"), 0.85),
    Target("(b)/(c) tokens/s: vs PEFT one at a time", lambda r: _ratio(r, "b", "c"), 8.0),
    Target("(b)/(d) tokens/s: vs PEFT mixed batch", lambda r: _ratio(r, "b", "d"), 3.0),
    Target("(e)/(a) tokens/s: mixed kinds vs base", lambda r: _ratio(r, "e", "a"), 0.8),
    Target("(f)/(f1) tokens/s: Zipf vs one adapter", lambda r: _ratio(r, "f", "f1"), 0.7),
    Target("(s)/(s0) tokens/s: 32 LoRAs vs base, batch 32", lambda r: _ratio(r, "s", "s0"), 0.85),
    Target("(s)/(sp) tokens/s: 32 LoRAs vs PEFT one at a time", lambda r: _ratio(r, "s", "sp"), 20.0),
    Target("(g) cold load, LoRA r16 all-linear, median", lambda r: r["g"].details["cold_load_median_ms"], 50.0,
           unit=" ms", higher_is_better=False),
)


# Not targets: what the base model alone reaches against each PEFT baseline bounds what any LoRA serving on
# the same base can reach, since LoRA only adds work to the base's.
CEILINGS: tuple[tuple[str, Callable[[dict[str, ScenarioResult]], float | None]], ...] = (
    ("(a)/(c) base alone vs PEFT one at a time", lambda r: _ratio(r, "a", "c")),
    ("(a)/(d) base alone vs PEFT mixed batch", lambda r: _ratio(r, "a", "d")),
)


def _ceilings(rounds: Rounds) -> dict[str, float]:
    found = {}
    for label, value in CEILINGS:
        values = [v for v in (Target(label, value, 0.0)._value(r) for r in rounds) if v is not None]
        if values:
            found[label] = round(statistics.median(values), 3)
    return found


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated letters (default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run (flags still override)")
    parser.add_argument("--out", type=Path, help="JSON output (default: bench/results/engine-<device>.json, with "
                        "the model config, quantization, n and scenarios added where they differ from the defaults)")
    parser.add_argument("--model-config", choices=sorted(MODEL_CONFIGS), default="smollm2-135m",
                        help="base model: the default checkpoint, or a random-weight Llama of these shapes")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    parser.add_argument("--quantize", choices=("none", "nf4", "int8", "auto"), default="none")
    parser.add_argument("--lora-backend", choices=("auto", "torch", "triton"), default="auto",
                        help="the engines' LoRA backend (auto: triton on CUDA, torch on a CPU)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="compute dtype; auto = float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--cache-dir", help="model cache (default: $QUIVER_CACHE_DIR, else the test suite's cache)")
    parser.add_argument("--work-dir", type=Path,
                        help="keep adapters and the store here; a fresh directory (default: a temp dir)")
    parser.add_argument("--verbose", action="store_true", help="log Quiver's INFO messages")
    for option in dataclasses.fields(BenchOptions):
        parser.add_argument(f"--{option.name.replace('_', '-')}", type=int, dest=option.name,
                            help=f"{_doc(option.name)} (default {getattr(BenchOptions(), option.name)}, "
                                 f"--quick {getattr(QUICK, option.name)})")
    return parser.parse_args(argv)


def _doc(name: str) -> str:
    docs = {
        "n": "concurrent requests in a-e", "engine_threads": "torch threads of the engine thread (0: torch's default)",
        "peft_threads": "torch threads of the PEFT scenarios' thread (0: torch's default)",
        "rounds": "interleaved runs of a-e (ratios: median over rounds)",
        "max_new_tokens": "tokens every request generates",
        "f_adapters": "registered adapters in f", "f_requests": "requests in f",
        "f_slots": "device LoRA slots in f", "f_max_running": "batch limit in f",
        "g_loads": "cold loads timed in g", "ttft_loads": "adapters whose TTFT g measures",
        "h_requests": "chat requests in h", "h_max_new_tokens": "new tokens each request of h allows",
        "h_worst_case_rows": "rows at their worst case h's cache budget holds",
        "s_requests": "requests (distinct LoRA r8 q/v) in s", "s_peft_requests": "of them, served by PEFT in s",
    }
    return docs[name]


def _options(args: argparse.Namespace) -> BenchOptions:
    base = QUICK if args.quick else BenchOptions()
    fields = dataclasses.fields(BenchOptions)
    chosen = {f.name: getattr(args, f.name) for f in fields if getattr(args, f.name) is not None}
    return dataclasses.replace(base, **chosen)


def _table(results: list[ScenarioResult], checks: list[dict[str, Any]]) -> str:
    lines = [f"{'':3}{'scenario':<48}{'req':>5}{'tokens':>8}{'wall s':>9}{'tok/s':>9}"]
    for r in results:
        if r.tokens_per_s is None:
            continue
        assert r.wall_s is not None and r.tokens is not None  # set with tokens_per_s
        lines.append(f"{r.key:<3}{r.title:<48}{r.requests:>5}{r.tokens:>8}{r.wall_s:>9.2f}{r.tokens_per_s:>9.1f}")
    for r in results:
        extra = {k: v for k, v in r.details.items() if k not in ("ttft_median_s",)}
        if extra:
            lines.append(f"{r.key:<3}{json.dumps(extra)}")
    lines.append("")
    lines.append(f"{'target':<46}{'measured':>10}{'goal':>12}  result")
    for c in checks:
        value = "-" if c["value"] is None else f"{c['value']:g}"
        lines.append(f"{c['target']:<46}{value:>10}{c['goal']:>12}  {c['result']}")
    return "\n".join(lines)


def _timed(key: str, ctx: Context, number: int) -> list[ScenarioResult]:
    start = time.perf_counter()
    print(f"[bench] round {number}: scenario {key} ...", file=sys.stderr, flush=True)
    results = SCENARIOS[key](ctx)
    print(f"[bench] round {number}: scenario {key} done in {time.perf_counter() - start:.1f} s", file=sys.stderr,
          flush=True)
    return results


def _medians(rounds: Rounds) -> list[ScenarioResult]:
    """Per scenario, the round with the median wall time, recording every round's wall time beside it."""
    merged = []
    for key in rounds[0]:
        runs = [r[key] for r in rounds if key in r]
        if runs[0].wall_s is None or len(runs) == 1:
            merged.append(runs[0])
            continue
        median = sorted(runs, key=lambda r: r.wall_s or 0.0)[(len(runs) - 1) // 2]
        walls = [round(r.wall_s or 0.0, 3) for r in runs]
        merged.append(dataclasses.replace(median, details={**median.details, "rounds_wall_s": walls}))
    return merged


def _run(args: argparse.Namespace, options: BenchOptions, work_dir: Path) -> dict[str, Any]:
    selected = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(selected) - set(SCENARIOS))
    if unknown:
        raise SystemExit(f"--scenarios: unknown {unknown}; choose from {','.join(SCENARIOS)}")
    bm = load_bench_model(args.model_config, cache_dir(args.cache_dir), args.device, args.quantize, args.dtype,
                          args.lora_backend)
    env = environment(bm, args.quantize)
    env["lora_backend"] = args.lora_backend
    ctx = Context(bm, options, work_dir)
    rounds: Rounds = []
    for number in range(1, options.rounds + 1):
        keys = [k for k in SCENARIOS if k in selected and (number == 1 or k in REPEATED)]
        rounds.append({r.key: r for key in keys for r in _timed(key, ctx, number)})
    results = _medians(rounds)
    checks = [t.check(rounds) for t in TARGETS]
    ceilings = _ceilings(rounds)
    print(_table(results, checks))
    for label, value in ceilings.items():
        print(f"{label:<46}{value:>10g}  (for context: bounds the ratio above with (b) in place of (a))")
    env["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return {
        "command": " ".join(["python -m bench.bench_engine", *sys.argv[1:]]),
        "environment": env,
        "options": dataclasses.asdict(options),
        "scenarios": {r.key: r.as_json() for r in results},
        "targets": checks,
        "ceilings": ceilings,
    }


def _default_out_name(args: argparse.Namespace, options: BenchOptions) -> str:
    """engine-<device>.json for a full default run; anything else adds what differs, so split runs (e.g. a GPU
    run's scenarios in several commands) do not overwrite each other."""
    parts = [f"engine-{args.device}"]
    if args.model_config != "smollm2-135m":
        parts.append(args.model_config)
    if args.quantize != "none":
        parts.append(args.quantize)
    if options.n != (QUICK if args.quick else BenchOptions()).n:
        parts.append(f"n{options.n}")
    scenarios = "".join(s.strip() for s in args.scenarios.split(","))
    if sorted(scenarios) != sorted(SCENARIOS):
        parts.append(scenarios)
    if args.quick:
        parts.append("quick")
    return "-".join(parts) + ".json"


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations, raised inside PEFT
    torch.set_num_threads(1)  # before any torch work: the main thread never forms an OpenMP team (context.py)
    options = _options(args)
    out = args.out or RESULTS_DIR / _default_out_name(args, options)
    if args.work_dir:
        report = _run(args, options, args.work_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="quiver-bench-") as tmp:
            report = _run(args, options, Path(tmp))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
