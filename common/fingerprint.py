"""A base model's identity: what an adapter must match to be applied to it.

`fingerprint` hashes the architecture fields of config.json and every stored weight's name, shape and dtype,
read from the safetensors headers alone (8-byte little-endian header length, then a JSON header) so no
tensor is loaded. It depends only on the checkpoint on disk: not on quantization, device or runtime dtype
(those change how weights are held, not which weights they are), nor on file or key order.

Format: "sha256:" followed by the full 64-hex-digit SHA-256 of a canonical JSON document (sorted keys, no
whitespace) that starts with a scheme version, so a future change of what is hashed changes every digest.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from quiver.common.errors import ModelLoadError

FINGERPRINT_SCHEME = "quiver-fingerprint-v1"

# Fields that decide which modules exist and their shapes. Fields that only tune numerics (rope scaling,
# norm epsilon) are left out: they differ between transformers versions' spellings of the same checkpoint.
ARCHITECTURE_FIELDS = (
    "model_type",
    "architectures",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
)

# A header larger than this is corrupt, not a checkpoint; refusing it avoids reading gigabytes as JSON.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def fingerprint(checkpoint_dir: Path) -> str:
    """"sha256:<64 hex>" identifying the architecture and weight layout of the checkpoint in `checkpoint_dir`."""
    document = {
        "scheme": FINGERPRINT_SCHEME,
        "config": architecture_config(checkpoint_dir / "config.json"),
        "weights": weight_layout(checkpoint_dir),
    }
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def architecture_config(config_path: Path) -> dict[str, Any]:
    """The architecture fields of a config.json; multimodal configs contribute their text_config's too."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {config_path}: {e}") from e
    picked = _pick(config)
    if isinstance(config.get("text_config"), dict):
        picked["text_config"] = _pick(config["text_config"])
    return picked


def _pick(config: dict[str, Any]) -> dict[str, Any]:
    # Absent fields stay absent rather than null, so adding a field to the list later only affects configs
    # that actually carry it.
    return {key: config[key] for key in ARCHITECTURE_FIELDS if key in config}


def weight_layout(checkpoint_dir: Path) -> list[list[Any]]:
    """[name, shape, dtype] of every tensor in the directory's *.safetensors files, sorted by name."""
    files = sorted(checkpoint_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{checkpoint_dir} holds no *.safetensors weights")
    layout: dict[str, list[Any]] = {}
    for path in files:
        for name, entry in read_safetensors_header(path).items():
            if name in layout:
                raise ModelLoadError(f"tensor {name!r} appears in more than one file of {checkpoint_dir}")
            layout[name] = [name, list(entry["shape"]), entry["dtype"]]
    return [layout[name] for name in sorted(layout)]


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Tensor entries ({"dtype", "shape", "data_offsets"}) of a safetensors file, without its metadata."""
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > _MAX_HEADER_BYTES:
                raise ValueError(f"header length {length} is implausible")
            raw = f.read(length)
        if len(raw) != length:
            raise ValueError("file ends inside its header")
        header = json.loads(raw)
    except (OSError, ValueError, struct.error) as e:
        raise ModelLoadError(f"{path} is not a readable safetensors file: {e}") from e
    header.pop("__metadata__", None)
    return dict(header)
