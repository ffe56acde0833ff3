"""What bounds a decode step on a CPU: the base model's linears, kernel by kernel, against the memory bandwidth.

One pass runs every linear of the model once (7 per layer plus the output head, as a decode step does) on
random inputs of R rows. It is timed with torch's default CPU kernel (MKL's sgemm, which transformers and
PEFT use) and with the engine's prepacked oneDNN linears (server/platform/cpu_linear.py), on one thread and on more.
Beside it are the two ceilings a pass could hit: the bandwidth of a streaming read of a buffer far larger than
the caches (reading the weights), and the arithmetic rate of one large square matmul. Prints a table and
writes JSON.

    python -m bench.bench_cpu_linear                     # writes bench/results/cpu-linear.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.workload import MODEL_CONFIGS, cache_dir, environment, load_bench_model
from quiver.server.platform.cpu_linear import PackedLinear, can_pack

MATMUL_SIZE = 1024  # the square matmul that gives the arithmetic ceiling
RESULTS = Path(__file__).resolve().parent / "results" / "cpu-linear.json"


@dataclass(frozen=True)
class LinearBenchOptions:
    """What is measured; the CLI maps 1:1 onto these fields."""

    rows: tuple[int, ...] = (1, 8, 32)
    """Rows of every input: 1 is one sequence's decode step, 8 the engine's batch in bench_engine's a-e."""
    threads: tuple[int, ...] = (1, 0)
    """torch thread counts to measure on (0 = torch's default, one per physical core)."""
    repeats: int = 10
    """Timed passes per measurement (after two warm-up passes); the median is reported."""
    read_mib: int = 1024
    """Size of the buffer the bandwidth read streams through (well above any cache)."""


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_bandwidth(mib: int, repeats: int) -> float:
    """GB/s of summing a float32 buffer of `mib` MiB: one streaming read, almost no arithmetic."""
    buffer = torch.ones(mib * 2**20 // 4)
    return buffer.nbytes / _median_s(buffer.sum, repeats) / 1e9


def matmul_throughput(size: int, repeats: int) -> float:
    """GFLOP/s of one large square fp32 matmul: about what the CPU's arithmetic allows."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / _median_s(lambda: torch.mm(a, b), repeats) / 1e9


def one_pass(linears: list[nn.Module], in_features: list[int], rows: int) -> Callable[[], None]:
    """Every linear once on (rows, 1, in) inputs, in model order, as a decode step runs them."""
    inputs = {n: torch.randn(rows, 1, n) for n in set(in_features)}

    def run() -> None:
        for module, n in zip(linears, in_features, strict=True):
            module(inputs[n])

    return run


def _linears(model: nn.Module) -> list[nn.Linear]:
    """The linears the engine packs: every plain fp32 one, the output head included."""
    return [m for m in model.modules() if isinstance(m, nn.Linear) and can_pack(m)]


def measure(model: nn.Module, options: LinearBenchOptions) -> list[dict[str, Any]]:
    plain = _linears(model)
    kernels: dict[str, list[nn.Module]] = {"mkl": list(plain), "onednn-packed": [PackedLinear(m) for m in plain]}
    in_features = [m.in_features for m in plain]
    weight_bytes = sum(m.weight.nbytes for m in plain)
    flops_per_row = 2 * sum(m.weight.numel() for m in plain)
    default_threads = torch.get_num_threads()
    results = []
    with torch.inference_mode():
        for threads in options.threads:
            count = threads or default_threads
            torch.set_num_threads(count)
            bandwidth = read_bandwidth(options.read_mib, options.repeats)
            arithmetic = matmul_throughput(MATMUL_SIZE, options.repeats)
            for rows in options.rows:
                for kernel, linears in kernels.items():
                    seconds = _median_s(one_pass(linears, in_features, rows), options.repeats)
                    results.append({
                        "threads": count, "rows": rows, "kernel": kernel, "linears": len(linears),
                        "pass_ms": round(seconds * 1e3, 2),
                        "weights_gb_per_s": round(weight_bytes / seconds / 1e9, 1),
                        "gflop_per_s": round(flops_per_row * rows / seconds / 1e9, 1),
                        "read_bandwidth_gb_per_s": round(bandwidth, 1),
                        "matmul_gflop_per_s": round(arithmetic, 1),
                    })
                    print(_row(results[-1]), flush=True)
    torch.set_num_threads(default_threads)
    return results


def _row(r: dict[str, Any]) -> str:
    return (f"{r['threads']:>7}{r['rows']:>6}  {r['kernel']:<15}{r['pass_ms']:>9.1f}{r['weights_gb_per_s']:>9.1f}"
            f"{r['gflop_per_s']:>9.1f}{r['read_bandwidth_gb_per_s']:>11.1f}{r['matmul_gflop_per_s']:>13.1f}")


HEADER = (f"{'threads':>7}{'rows':>6}  {'kernel':<15}{'pass ms':>9}{'GB/s':>9}{'GFLOP/s':>9}{'read GB/s':>11}"
          f"{'mm GFLOP/s':>13}")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _parse(argv: list[str] | None) -> argparse.Namespace:
    defaults = LinearBenchOptions()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=_ints, default=defaults.rows, help="comma-separated input rows (1,8,32)")
    parser.add_argument("--threads", type=_ints, default=defaults.threads,
                        help="comma-separated torch thread counts, 0 = torch's default (1,0)")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="timed passes per measurement (10)")
    parser.add_argument("--read-mib", type=int, default=defaults.read_mib, help="bandwidth buffer in MiB (1024)")
    parser.add_argument("--model-config", choices=sorted(MODEL_CONFIGS), default="smollm2-135m")
    parser.add_argument("--cache-dir", help="model cache (default: $QUIVER_CACHE_DIR, else the test suite's cache)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    options = LinearBenchOptions(args.rows, args.threads, args.repeats, args.read_mib)
    bm = load_bench_model(args.model_config, cache_dir(args.cache_dir), "cpu", "none", "float32")
    print(HEADER)
    results = measure(bm.model, options)
    report = {
        "command": " ".join(["python -m bench.bench_cpu_linear", *sys.argv[1:]]),
        "environment": environment(bm, "none"),
        "options": asdict(options),
        "weights_mib": round(sum(m.weight.nbytes for m in _linears(bm.model)) / 2**20, 1),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
