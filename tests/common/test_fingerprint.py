"""The base-model fingerprint: stable, header-only, sensitive to architecture and layout, blind to order."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from quiver.common.errors import ModelLoadError
from quiver.common.fingerprint import fingerprint, read_safetensors_header

from ..conftest import write_tiny_checkpoint


def test_format_and_stability(tiny_checkpoint: Path):
    first = fingerprint(tiny_checkpoint)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", first)
    assert fingerprint(tiny_checkpoint) == first


def test_same_architecture_same_fingerprint_whatever_the_weights(tmp_path: Path):
    # By design: the fingerprint names the weight layout an adapter was built for, not the values.
    a = write_tiny_checkpoint(tmp_path / "a", seed=0, tokenizer=False)
    b = write_tiny_checkpoint(tmp_path / "b", seed=1, tokenizer=False)
    assert fingerprint(a) == fingerprint(b)


@pytest.mark.parametrize(
    "overrides",
    [{"intermediate_size": 96}, {"num_hidden_layers": 3}, {"vocab_size": 300}, {"num_key_value_heads": 4}],
)
def test_changes_with_the_architecture(tmp_path: Path, overrides: dict[str, Any]):
    base = write_tiny_checkpoint(tmp_path / "base", tokenizer=False)
    other = write_tiny_checkpoint(tmp_path / "other", tokenizer=False, **overrides)
    assert fingerprint(base) != fingerprint(other)


def test_changes_with_stored_dtype(tmp_path: Path):
    f32 = write_tiny_checkpoint(tmp_path / "f32", tokenizer=False)
    bf16 = write_tiny_checkpoint(tmp_path / "bf16", tokenizer=False, dtype=torch.bfloat16)
    assert fingerprint(f32) != fingerprint(bf16)


def test_changes_when_one_weight_shape_changes(tiny_checkpoint: Path, tmp_path: Path):
    tensors = load_file(tiny_checkpoint / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = tensors[name][:-1].clone()  # (intermediate - 1, hidden)
    other = _copy_config(tiny_checkpoint, tmp_path / "other")
    save_file(tensors, other / "model.safetensors")
    assert fingerprint(other) != fingerprint(tiny_checkpoint)


def test_independent_of_tensor_and_file_order(tiny_checkpoint: Path, tmp_path: Path):
    tensors = load_file(tiny_checkpoint / "model.safetensors")
    names = sorted(tensors)
    reversed_dir = _copy_config(tiny_checkpoint, tmp_path / "reversed")
    save_file({n: tensors[n] for n in reversed(names)}, reversed_dir / "model.safetensors")
    sharded = _copy_config(tiny_checkpoint, tmp_path / "sharded")
    # Odd-indexed names in the first shard, even-indexed in the second: no relation to name order.
    save_file({n: tensors[n] for n in names[1::2]}, sharded / "model-00001-of-00002.safetensors")
    save_file({n: tensors[n] for n in names[0::2]}, sharded / "model-00002-of-00002.safetensors")
    expected = fingerprint(tiny_checkpoint)
    assert fingerprint(reversed_dir) == expected
    assert fingerprint(sharded) == expected


def test_independent_of_config_key_order_and_irrelevant_fields(tiny_checkpoint: Path, tmp_path: Path):
    other = tmp_path / "other"
    shutil.copytree(tiny_checkpoint, other)
    config = json.loads((other / "config.json").read_text())
    config["transformers_version"] = "0.0.0"
    config["rms_norm_eps"] = 1e-3
    (other / "config.json").write_text(json.dumps(dict(reversed(list(config.items())))))
    assert fingerprint(other) == fingerprint(tiny_checkpoint)


def test_reads_headers_only(tiny_checkpoint: Path, tmp_path: Path):
    # Cut every byte after the header: a reader that touched tensor data would fail or differ.
    other = _copy_config(tiny_checkpoint, tmp_path / "headers-only")
    raw = (tiny_checkpoint / "model.safetensors").read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    (other / "model.safetensors").write_bytes(raw[:header_end])
    assert fingerprint(other) == fingerprint(tiny_checkpoint)


def test_header_entries(tiny_checkpoint: Path):
    header = read_safetensors_header(tiny_checkpoint / "model.safetensors")
    assert "__metadata__" not in header
    entry = header["model.layers.0.mlp.up_proj.weight"]
    assert entry["shape"] == [128, 64] and entry["dtype"] == "F32"


def test_corrupt_or_missing_weights_are_load_errors(tiny_checkpoint: Path, tmp_path: Path):
    empty = _copy_config(tiny_checkpoint, tmp_path / "empty")
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors"):
        fingerprint(empty)
    (empty / "model.safetensors").write_bytes((2**40).to_bytes(8, "little") + b"{}")
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        fingerprint(empty)
    (empty / "model.safetensors").write_bytes((5).to_bytes(8, "little") + b"{not")
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        fingerprint(empty)


def _copy_config(src: Path, dst: Path) -> Path:
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    return dst
