"""Soak test: streaming clients over many adapters on both fronts of a real `quiver serve`, with adapters registered
and deleted during the run, then thousands of register/delete cycles; it stops by itself, on loopback only.

A `quiver serve` subprocess (the default model, CPU, fp32, 127.0.0.1, free ports, an admin token) gets `--adapters`
LoRAs registered over gRPC before the clients start. Then `--clients` clients (half gRPC through
`AsyncQuiverClient.generate_stream`, half HTTP streaming `/v1/completions` through httpx, each on its own
connection) loop for `--warmup-seconds` plus `--minutes`: each request names a random adapter of the pool (or,
one in ten, the base model) and streams `--max-new-tokens` greedy tokens. Every `--churn-seconds` a side task
registers a new adapter and deletes the oldest. Then `--cycles` times one small LoRA (rank 2, q_proj) is registered
under a new name and deleted (every 100th also generates a token first). The server's RSS, open fds and threads
are read from /proc every few seconds; its /metrics request counts are scraped to cross-check the clients'.

    python -m bench.soak          # 32 clients, 50 adapters, 30 s + 5 min, 10,000 cycles -> bench/results/soak-cpu.json
    python -m bench.soak --quick  # ~1-minute smoke: 4 clients, 5 adapters, 10 s + 0.5 min, 200 cycles

Targets: no errors but deliberate ones (shedding, NOT_FOUND for a deleted adapter); RSS growth < 5 % from the end of
the warm-up to the end of the load; over the cycles no growth in open fds and RSS growth < 1 % after their warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import importlib.metadata
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from peft import LoraConfig
from prometheus_client.parser import text_string_to_metric_families

from bench.adapter_maker import ADAPTER_KINDS, CONFIG_FILE, WEIGHTS_FILE, AdapterMaker
from bench.bench_http import _free_port
from bench.soak_clients import (
    AdapterPool,
    Churn,
    Cycles,
    Done,
    Load,
    Sample,
    Sampler,
    churn,
    grpc_client,
    http_client,
    run_cycles,
    summarize,
)
from bench.workload import cache_dir, environment, load_bench_model
from quiver.clients.aio import AsyncQuiverClient

RESULTS = Path(__file__).resolve().parent / "results"
BASE_NAME = "soak-base"  # the base model's HTTP id (--served-model-name)
TINY_KIND = "lora2-q"
ADAPTER_KINDS.setdefault(TINY_KIND, lambda: LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4,
                                                       target_modules=["q_proj"]))
_SERVERS: list[subprocess.Popen[bytes]] = []  # killed by the hard timeout


@dataclass(frozen=True)
class Server:
    process: subprocess.Popen[bytes]
    target: str
    url: str
    token: str
    log: Path


def _die_with_parent() -> None:
    """In the server's process before exec: SIGKILL it if this script dies without cleaning up."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def quiver_server(checkpoint: Path, store: Path, log: Path, extra: list[str]) -> Iterator[Server]:
    """`quiver serve` on free loopback ports with a fresh admin token, its stderr into `log`; always stopped."""
    grpc_port, http_port, token = _free_port(), _free_port(), secrets.token_urlsafe(24)
    command = [sys.executable, "-c", "import sys; from quiver.clients.cli import main; sys.exit(main(sys.argv[1:]))",
               "serve", "--model", str(checkpoint), "--store", str(store), "--host", "127.0.0.1",
               "--port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", "0",
               "--served-model-name", BASE_NAME, "--drain-seconds", "5", "--log-level", "WARNING", *extra]
    with log.open("wb") as log_file:
        process = subprocess.Popen(command, env={**os.environ, "QUIVER_ADMIN_TOKEN": token}, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=log_file, preexec_fn=_die_with_parent)
    _SERVERS.append(process)
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 300
        while not _ready(url):
            if process.poll() is not None:
                raise RuntimeError(f"quiver serve exited with {process.returncode}: {log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("quiver serve did not become ready in 300 s")
            time.sleep(0.5)
        yield Server(process, f"127.0.0.1:{grpc_port}", url, token, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _ready(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/ready", timeout=1).status_code == 200
    return False


def make_sources(maker: AdapterMaker, kind: str, count: int, prefix: str, out: Path) -> list[Path]:
    """`count` PEFT adapter directories of `kind`, ready to upload (the two files PEFT writes)."""
    paths: list[Path] = []
    for made in maker.make(kind, count, prefix).adapters:
        source = out / made.stored.metadata.name
        source.mkdir(parents=True)
        for file_name in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copyfile(made.stored.path / file_name, source / file_name)
        paths.append(source)
    return paths


async def soak(server: Server, sources: list[Path], tiny: Path, args: argparse.Namespace) -> dict[str, Any]:
    sampler = Sampler(server.process.pid, args.sample_seconds)
    marks: dict[str, Sample] = {"ready": sampler.take("ready")}
    sampling = asyncio.create_task(sampler.run())
    try:
        async with AsyncQuiverClient(server.target, timeout=120, admin_token=server.token) as admin:
            t0 = time.monotonic()
            for source in sources:
                await admin.register_adapter(source, source.name)
            registration_s = time.monotonic() - t0
            marks["registered"] = sampler.take("registered")
            phase = await _load_phase(server, admin, sources, sampler, marks, args)
            scraped = await asyncio.to_thread(scrape_metrics, server.url)
            phase["cross_check"] = cross_check(phase["done"], {f: scraped[f] for f in ("grpc", "http")})
            phase["tiers"]["closed"] = scraped["state"]
            cycles = Cycles(args.cycles)
            await run_cycles(admin, tiny, cycles, sampler, args.cycle_use_every, args.cycles_minutes)
            phase["tiers"]["cycles_end"] = (await asyncio.to_thread(scrape_metrics, server.url))["state"]
    finally:
        sampling.cancel()
    return {**phase, "registration_s": round(registration_s, 2), "marks": marks, "cycles": cycles,
            "samples": sampler.samples}


async def _load_phase(server: Server, admin: AsyncQuiverClient, sources: list[Path], sampler: Sampler,
                      marks: dict[str, Sample], args: argparse.Namespace) -> dict[str, Any]:
    """The clients and the churn, for the warm-up and the measured window; then they stop and drain."""
    load = Load(AdapterPool([s.name for s in sources]), asyncio.Event(), args.max_new_tokens, args.base_fraction,
                BASE_NAME, args.request_timeout)
    n_grpc = (args.clients + 1) // 2
    clients = [asyncio.create_task(grpc_client(load, server.target, i)) for i in range(n_grpc)]
    clients += [asyncio.create_task(http_client(load, server.url, i)) for i in range(n_grpc, args.clients)]
    churning = asyncio.create_task(churn(load, admin, sources, args.churn_seconds, args.churn_grace_seconds))
    sampler.phase = "warmup"
    await asyncio.sleep(args.warmup_seconds)
    window_start, marks["warm"], sampler.phase = time.monotonic(), sampler.take("warm"), "load"
    tiers = {"warm": (await asyncio.to_thread(scrape_metrics, server.url))["state"]}
    await asyncio.sleep(window_start + args.minutes * 60 - time.monotonic())
    window_end, marks["end"], sampler.phase = time.monotonic(), sampler.take("end"), "drain"
    tiers["end"] = (await asyncio.to_thread(scrape_metrics, server.url))["state"]
    load.stop.set()
    _, pending = await asyncio.wait([*clients, churning], timeout=args.request_timeout)
    for task in pending:
        task.cancel()
    failures = [repr(t.exception()) for t in clients if t.done() and not t.cancelled() and t.exception()]
    await asyncio.sleep(2)  # let the server close the clients' connections
    marks["closed"] = sampler.take("closed")
    churned = churning.result() if churning.done() and not churning.cancelled() else Churn()
    return {"done": load.done, "window": (window_start, window_end), "churn": churned, "client_failures": failures,
            "tiers": tiers,
            "clients_cancelled": len(pending), "pool_at_end": len(load.pool.active)}


ENGINE_SERIES = {"quiver_step_rows": "decode_rows", "quiver_step_duration_seconds": "decode_step_s",
                 "quiver_queue_wait_seconds": "queue_wait_s"}


def scrape_metrics(url: str) -> dict[str, Any]:
    """The server's own counts of finished streaming calls (gRPC GenerateStream by code, /v1/completions by
    status), and its state: what the adapter tiers hold and have loaded and evicted, registered adapters, and
    the means since start of the decode batch, the decode step and the queue wait."""
    out: dict[str, Any] = {"grpc": {}, "http": {}, "state": {}}
    raw: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in family.samples:
            series = s.name.removesuffix("_sum").removesuffix("_count")
            if s.name == "quiver_requests_total" and "GenerateStream" in s.labels.get("method", ""):
                out["grpc"][s.labels["code"]] = out["grpc"].get(s.labels["code"], 0) + int(s.value)
            elif s.name == "quiver_http_requests_total" and s.labels.get("route") == "/v1/completions":
                out["http"][s.labels["status"]] = int(s.value)
            elif s.name == "quiver_adapter_bytes":
                out["state"][f"{s.labels['tier']}_mib"] = round(s.value / 2**20, 1)
            elif s.name in ("quiver_adapters_resident", "quiver_adapters_registered"):
                out["state"][s.labels.get("tier", "registered")] = int(s.value)
            elif s.name in ("quiver_adapter_loads_total", "quiver_adapter_evictions_total"):
                out["state"][f"{s.labels['tier']}_{s.name.split('_')[2]}"] = int(s.value)
            elif series in ENGINE_SERIES and s.labels.get("phase", "decode") == "decode":
                raw[ENGINE_SERIES[series] + s.name[len(series):]] = s.value
    for key in ENGINE_SERIES.values():
        if raw.get(f"{key}_count"):
            out["state"][f"{key}_mean"] = round(raw[f"{key}_sum"] / raw[f"{key}_count"], 3)
    return out


def cross_check(done: list[Done], server: dict[str, dict[str, int]]) -> dict[str, Any]:
    """The clients' outcomes in the server's terms (gRPC code; HTTP status, 200 for a stream that began) beside
    the server's /metrics counts of GenerateStream and /v1/completions."""
    clients: dict[str, Counter[str]] = {"grpc": Counter(), "http": Counter()}
    for d in done:
        if d.front == "grpc":
            code = "OK" if d.error in (None, "short") else d.error
        else:
            code = "200" if d.error is None or d.error == "short" or d.error.startswith("stream:") else d.error
        clients[d.front][code or "?"] += 1
    same = all(dict(clients[f]) == server.get(f, {}) for f in clients)
    return {"clients": {f: dict(sorted(c.items())) for f, c in clients.items()}, "server": server, "match": same}


def server_log_summary(log: Path) -> dict[str, Any]:
    """Warnings, errors and tracebacks the server wrote (it runs at --log-level WARNING)."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    errors = [line for line in lines if re.search(r"\b(ERROR|CRITICAL)\b|Traceback", line)]
    warnings = [line for line in lines if re.search(r"\bWARNING\b", line)]
    return {"lines": len(lines), "errors": len(errors), "warnings": len(warnings),
            "first_errors": errors[:20], "first_warnings": warnings[:20], "tail": lines[-20:]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    bm = load_bench_model("smollm2-135m", cache_dir(args.cache_dir), "cpu", "none", "float32")
    env = {**environment(bm, "none"), **_more_environment()}
    with tempfile.TemporaryDirectory(prefix="quiver-soak-") as tmp:
        work = Path(tmp)
        maker = AdapterMaker(bm, work / "made")
        sources = make_sources(maker, args.adapter_kind, args.adapters, "soak", work / "sources")
        tiny = make_sources(maker, TINY_KIND, 1, "tiny", work / "sources")[0]
        checkpoint = bm.loaded.checkpoint_dir
        del bm, maker  # the server loads its own copy
        extra = ["--threads", str(args.threads), *shlex.split(args.server_args)]
        with quiver_server(checkpoint, work / "store", work / "server.log", extra) as server:
            measured = asyncio.run(soak(server, sources, tiny, args))
        measured["server_exit_code"] = server.process.returncode
        measured["server_log"] = server_log_summary(server.log)
    env["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return {"environment": env, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            **summarize(measured, args)}


def _more_environment() -> dict[str, Any]:
    env: dict[str, Any] = {f"{p}_version": importlib.metadata.version(p)
                           for p in ("grpcio", "httpx", "prometheus_client", "quiver-serve")}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        status = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).resolve().parent, check=True).stdout
        env["git_uncommitted_paths"] = len(status.splitlines())
    return env


def _watchdog(seconds: float) -> None:
    """The hard overall timeout: kill the server and exit, whatever the event loop is doing."""
    def fire() -> None:
        print(f"soak: hard timeout ({seconds:.0f} s) reached: killing the server and exiting", file=sys.stderr,
              flush=True)
        for process in _SERVERS:
            with contextlib.suppress(OSError):
                process.kill()
        os._exit(124)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--clients", type=int, default=32, help="streaming clients, half gRPC and half HTTP")
    add("--adapters", type=int, default=50, help="LoRAs registered before the clients start")
    add("--minutes", type=float, default=5.0, help="measured load after the warm-up")
    add("--warmup-seconds", type=float, default=30.0, help="load before the measured window (RSS baseline at its end)")
    add("--max-new-tokens", type=int, default=32)
    add("--cycles", type=int, default=10_000, help="register/delete cycles of one small LoRA after the load")
    add("--cycles-minutes", type=float, default=15.0, help="stop the cycles after this long, however many ran")
    add("--cycle-use-every", type=int, default=100, help="every Nth cycle generates a token first (0: never)")
    add("--quick", action="store_true", help="smoke run: 4 clients, 5 adapters, 10 s + 0.5 min, 200 cycles")
    add("--adapter-kind", default="lora8-qv", choices=sorted(ADAPTER_KINDS), help="kind of the served LoRAs")
    add("--base-fraction", type=float, default=0.1, help="share of requests on the base model")
    add("--churn-seconds", type=float, default=5.0, help="a new adapter registered, the oldest deleted, this often")
    add("--churn-grace-seconds", type=float, default=1.0, help="from leaving the pool to the delete call")
    add("--sample-seconds", type=float, default=5.0, help="how often the server's RSS and fds are read")
    add("--request-timeout", type=float, default=300.0, help="deadline of each request (s)")
    add("--threads", type=int, default=0, help="the server's --threads")
    add("--server-args", default="", help="more `quiver serve` options, e.g. '--max-lora-rank 8'")
    add("--hard-timeout-minutes", type=float, default=0.0, help="kill everything after this (0: from the phases)")
    add("--cache-dir", default=None, help="model cache (default: as bench_engine)")
    add("--out", type=Path, default=None, help="JSON result (default: bench/results/soak-cpu[-quick].json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.adapters, args.minutes, args.warmup_seconds, args.cycles = 4, 5, 0.5, 10.0, 200
    if args.out is None:
        args.out = RESULTS / ("soak-cpu-quick.json" if args.quick else "soak-cpu.json")
    if not args.hard_timeout_minutes:
        args.hard_timeout_minutes = round(20 + args.warmup_seconds / 60 + args.minutes + args.cycles_minutes
                                          + args.request_timeout / 60, 1)
    return args


def report(r: dict[str, Any]) -> None:
    a = r["args"]
    print(f"\nsoak: {a['clients']} clients (gRPC and HTTP), {a['adapters']} adapters, {a['max_new_tokens']} tokens a "
          f"request; window {r['window_s']} s after {a['warmup_seconds']:g} s of warm-up")
    print(f"{'front':>5} {'requests':>8} {'tok/s':>7} {'req/s':>6} {'lat p50':>8} {'lat p99':>8} {'TTFT p50':>9} "
          f"{'TTFT p99':>9}  (ms)")
    for f in r["fronts"].values():
        print(f"{f['front']:>5} {f['requests']:>8} {f['tok_per_s']:>7} {f['req_per_s']:>6} {f['latency_ms_p50']!s:>8} "
              f"{f['latency_ms_p99']!s:>8} {f['ttft_ms_p50']!s:>9} {f['ttft_ms_p99']!s:>9}")
    e, x, c = r["errors"], r["cross_check"], r["churn"]
    print(f"requests {e['requests']} (warm-up and drain included), ok {e['ok']}; deliberate {e['deliberate'] or '-'}; "
          f"other {e['other'] or '-'}")
    print(f"server's /metrics {'match' if x['match'] else 'DIFFER FROM'} the clients: server {x['server']}, "
          f"clients {x['clients']}")
    print(f"churn: {c['registered']} registered, {c['deleted']} deleted, errors {c['errors'] or '-'}")
    res = r["resources"]
    print(f"{'server':>12} {'RSS MiB':>8} {'fds':>5} {'threads':>7}")
    for name, s in res["marks"].items():
        print(f"{name:>12} {s['rss_mib']:>8} {s['fds']:>5} {s['threads']:>7}")
    print(f"{'window max':>12} {res['rss_max_mib']:>8} {res['fds_max']:>5}; RSS growth after warm-up "
          f"{res['rss_growth_pct']} %, trend {res['rss_trend_mib_per_min']} MiB/min")
    cy = r["cycles"]
    print(f"cycles: {cy['done']} of {cy['asked']}{' (stopped by --cycles-minutes)' if cy['stopped_by_time'] else ''} "
          f"in {cy['wall_s']} s, {cy['per_s']}/s, p50 {cy['cycle_ms_p50']} ms, p99 {cy['cycle_ms_p99']} ms; errors "
          f"{cy['errors'] or '-'}; RSS {cy['rss_kib_per_cycle']} KiB a cycle after their warm-up")
    for name, s in cy["samples"].items():
        print(f"{name:>12} {s['rss_mib']:>8} {s['fds']:>5} {s['threads']:>7}")
    for name, state in r["server_state"].items():
        print(f"server state at {name}: {state}")
    log = r["server_log"]
    print(f"server log: {log['errors']} error lines, {log['warnings']} warnings; exit code {r['server_exit_code']}")
    for t in r["targets"]:
        print(f"{t['target']:<44} {t['measured']!s:>8}  goal {t['goal']:<6} {t['result']}")


def main() -> None:
    args = parse_args()
    _watchdog(args.hard_timeout_minutes * 60)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the server is stopped on the way out
    result = run(args)
    report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
