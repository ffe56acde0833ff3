"""A local Ray cluster on loopback serving Quiver's Ray Serve application: two engine replicas of a tiny Llama over
an S3 adapter store (moto's server), with 20 LoRAs registered, and Ray's metrics exported for the test to read."""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from quiver.adapters.registry import RegistrationOptions, open_registry
from quiver.server.config import AdapterConfig, EngineConfig, ModelConfig

from ...adapters.adapter_factory import make_lora
from ...conftest import write_tiny_checkpoint
from ...s3_server import CREDENTIALS, new_bucket

ADAPTERS = [f"task-{i:02d}" for i in range(20)]
ADMIN = "ray-admin"


def _free_port() -> int:
    """A free loopback port below the kernel's ephemeral range. Ray's processes open connections (each taking an
    ephemeral local port) between the moment a port is chosen here and the moment Serve's proxy binds it; a port
    from that range (what binding to port 0 gives) was taken that way once ("Failed to bind to address"), one
    outside it cannot be. Above Ray's worker ports (10002-19999 by default)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, low) if low > 21000 else 0  # an unusual range: any free port, as before
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            bound: int = s.getsockname()[1]
            return bound
    raise RuntimeError(f"no free loopback port in [20000, {low})")


@dataclass(frozen=True)
class Cluster:
    http: str  # the ingress's HTTP URL
    grpc: str  # the gRPC proxy's target
    metrics: str  # Ray's Prometheus endpoint
    base_dir: Path
    imports: Path  # an import root of the application


def replica_counts(cluster: Cluster, metric: str) -> dict[tuple[str, str], float]:
    """{(replica, label value): value} of one of the engine replicas' counters, as Ray exports it."""
    text = httpx.get(f"{cluster.metrics}/metrics", timeout=10).text
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"ray_{metric}_total":
                label = sample.labels.get("adapter_held", sample.labels.get("tier", ""))
                key = (sample.labels["replica"], label)
                out[key] = out.get(key, 0) + sample.value
    return out


@pytest.fixture(scope="package")
def cluster(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from quiver.server.ray_serve.app import APP_NAME, GRPC_SERVICERS, RayServeConfig, application

    root = tmp_path_factory.mktemp("ray")
    base_dir = write_tiny_checkpoint(root / "tiny", max_position_embeddings=4096, tie_word_embeddings=False)
    store = f"s3://{new_bucket(s3_endpoint)}/ray"
    os.environ["AWS_ENDPOINT_URL"] = s3_endpoint  # the test's own registry reaches the same store
    try:
        registry = open_registry(store, str(base_dir))
        for i, name in enumerate(ADAPTERS):
            registry.register(make_lora(base_dir, root / "made" / name, r=2, seed=100 + i), RegistrationOptions(name))
    finally:
        del os.environ["AWS_ENDPOINT_URL"]
    http_port, grpc_port, metrics_port = _free_port(), _free_port(), _free_port()
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
             _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 1000},
             runtime_env={"env_vars": dict(CREDENTIALS)})
    try:
        serve.start(http_options=HTTPOptions(host="127.0.0.1", port=http_port),
                    grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICERS))
        model = ModelConfig(model=str(base_dir), device="cpu", quantize="none", cache_dir=str(root / "models"))
        adapters = AdapterConfig(store=store, s3_endpoint_url=s3_endpoint, store_cache_dir=str(root / "cache"),
                                 admin_token=ADMIN, import_roots=(str(root / "imports"),))
        config = RayServeConfig(engine_replicas=2, engine_cpus=0.5)
        serve.run(application(model, EngineConfig(threads=1, max_running=8), adapters, config), name=APP_NAME,
                  route_prefix="/")
        yield Cluster(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}",
                      f"http://127.0.0.1:{metrics_port}", base_dir, root / "imports")
    finally:
        serve.shutdown()
        ray.shutdown()


def wait_for(predicate: object, timeout: float = 30.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.2)
    return False
