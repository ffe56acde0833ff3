"""What every scenario shares: the base model (real or random-weight), the prompts, and the environment record.

The default model is the converted SmolLM2-135M-Instruct from the model cache. `llama-8b` (and the small
`llama-tiny`, to exercise the same code path on a CPU) are random-weight Llama checkpoints written once into
the cache and then loaded through `load_base_model`, so quantization and placement go through the server's
own loader; they use the default model's tokenizer, whose ids are all inside their vocabularies.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from quiver.common.model_source import default_cache_dir, resolve_checkpoint
from quiver.server.config import EngineConfig, ModelConfig
from quiver.server.engine.engine import Engine
from quiver.server.model.model_loader import LoadedModel, load_base_model

# Everyday requests of 20-40 tokens each (SmolLM2 tokenizer), cycled when more requests than prompts are run.
PROMPTS = (
    "Write a short, friendly email to a colleague asking whether we can move tomorrow's design review to Thursday.",
    "Explain in two or three sentences why the sky looks blue during the day but red and orange at sunset, "
    "without using any equations.",
    "Summarize the main causes of the French Revolution for a high school student preparing for an exam next "
    "week. Keep it under two hundred words and use bullet points.",
    "Translate the following sentence into French: The train to Lyon leaves at half past eight from platform two.",
    "Give me three ideas for a quick vegetarian dinner that uses chickpeas, spinach and whatever is in the pantry. "
    "I have about thirty minutes and one pan.",
    "What is the difference between a list and a tuple in Python, and when should I prefer one over the other? "
    "Please include a short code example for each.",
    "Draft a polite reply to a customer whose package arrived damaged, offering a replacement or a full refund.",
    "List the steps to change a flat tire on a car safely, starting from pulling over to the side of the road.",
    "Write a haiku about the first snowfall of the winter in a quiet mountain village at night, in 5-7-5.",
    "My sourdough bread comes out dense and flat every time. What are the most likely reasons and how do I fix it?",
    "Classify the sentiment of this review as positive, negative or neutral: The battery lasts forever but the "
    "screen scratches easily.",
    "Suggest a name and a one-line slogan for a small bakery that specialises in gluten-free pastries.",
    "How does compound interest work? Show a simple example with 1,000 dollars at five percent over three years.",
    "Rewrite this sentence to sound more professional: hey, the report is gonna be late again, sorry about that.",
    "Explain what a hash table is to someone who has never programmed, using an everyday analogy such as a "
    "library, a coat check or a wall of mailboxes.",
    "Plan a relaxed one-day itinerary for a first visit to Kyoto in autumn, including lunch and an evening walk. "
    "We are two adults who love gardens, old temples and tea.",
)


@dataclass(frozen=True)
class RandomLlama:
    """Dimensions of a random-weight Llama checkpoint (weights drawn by transformers' own initialisation)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rope_theta: float = 500_000.0
    max_position_embeddings: int = 8192


# --model-config name -> random Llama dims; None = the default SmolLM2-135M-Instruct checkpoint.
MODEL_CONFIGS: dict[str, RandomLlama | None] = {
    "smollm2-135m": None,
    "llama-8b": RandomLlama(4096, 14336, 32, 32, 8, 128_256),  # Llama-3-8B's shapes
    "llama-tiny": RandomLlama(256, 512, 2, 4, 2, 49_152),  # the same path at toy size, for CPU smoke runs
}


@dataclass
class BenchModel:
    """The loaded base model plus what the scenarios need to know about it."""

    loaded: LoadedModel
    name: str
    device: torch.device
    lora_backend: str = "auto"
    """--lora-backend of every engine the scenarios start (server/engine/lora/backend.py)."""

    def engine(self, config: EngineConfig, eos_token_ids: frozenset[int] = frozenset()) -> Engine:
        """An engine (not started) over this model with `config` and the bench's LoRA backend."""
        return Engine(self.model, self.tokenizer, eos_token_ids, replace(config, lora_backend=self.lora_backend))

    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def checkpoint_dir(self) -> Path:
        return self.loaded.checkpoint_dir

    def sync(self) -> None:
        """Wait for queued device work, so wall-clock timings include it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def cache_dir(explicit: str | None) -> Path:
    """The model cache: --cache-dir, else $QUIVER_CACHE_DIR, else the test suite's cache if it exists."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("QUIVER_CACHE_DIR"):
        return default_cache_dir()
    tests_cache = Path(__file__).resolve().parents[1] / ".pytest_cache" / "quiver-models"
    return tests_cache if tests_cache.is_dir() else default_cache_dir()


def load_bench_model(
    config_name: str, cache: Path, device: str, quantize: str, dtype: str, lora_backend: str = "auto"
) -> BenchModel:
    """Load the base model named by --model-config through the server's loader."""
    dims = MODEL_CONFIGS[config_name]
    model_path = None if dims is None else str(_random_checkpoint(config_name, dims, cache))
    loaded = load_base_model(
        ModelConfig(model=model_path, quantize=quantize, device=device, dtype=dtype, cache_dir=str(cache))  # type: ignore[arg-type]
    )
    return BenchModel(loaded, config_name, next(loaded.model.parameters()).device, lora_backend)


def _random_checkpoint(name: str, dims: RandomLlama, cache: Path) -> Path:
    """A random-weight Llama with `dims`, saved once (bf16) under the cache with the default tokenizer."""
    target = cache / "bench-models" / f"{name}-random"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoTokenizer

    tokenizer_dir = resolve_checkpoint(None, cache)
    config = LlamaConfig(
        hidden_size=dims.hidden_size, intermediate_size=dims.intermediate_size,
        num_hidden_layers=dims.num_hidden_layers, num_attention_heads=dims.num_attention_heads,
        num_key_value_heads=dims.num_key_value_heads, vocab_size=dims.vocab_size,
        max_position_embeddings=dims.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": dims.rope_theta},
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
    )
    # Initialised where it will run: 8B parameters draw in seconds on a GPU, minutes on a CPU.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    staging = target.with_name(target.name + ".partial")
    model.save_pretrained(staging)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(staging)
    del model
    staging.rename(target)
    return target


def prompt_ids(tokenizer: Any, n: int) -> list[tuple[int, ...]]:
    """Token ids of `n` prompts (PROMPTS cycled), without special tokens, as the engine takes them."""
    return [tuple(tokenizer(PROMPTS[i % len(PROMPTS)], add_special_tokens=False)["input_ids"]) for i in range(n)]


def environment(bm: BenchModel, quantize: str) -> dict[str, Any]:
    """What the numbers depend on, recorded beside them."""
    info = bm.loaded.info
    env: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "git_commit": _git_commit(),
        "model_config": bm.name,
        "model": info.name,
        "architecture": info.architecture,
        "device": info.device,
        "dtype": info.dtype,
        "quantize": quantize,
        "resident_mib": round(info.resident_bytes / 2**20, 1),
    }
    for package in ("torch", "transformers", "peft", "safetensors"):
        env[f"{package}_version"] = importlib.metadata.version(package)
    if bm.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(bm.device)
    return env


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
