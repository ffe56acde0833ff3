"""Benchmarks of the Quiver engine against PEFT; run `python -m bench.bench_engine --help` (see bench/README.md)."""
