"""Safe inspection of an uploaded safetensors file, and refusal of pickle-based weight files.

An adapter arrives from a client, so its bytes are untrusted. Pickle formats (.bin, .pt, ...) can run code
when loaded and are refused by name, never opened. A safetensors file is checked by hand before the library
reads it (format: 8-byte little-endian header length N, N bytes of JSON header, then the data region, see
https://github.com/huggingface/safetensors): the header length is capped and must fit the file; duplicate JSON
keys are refused (two parsers could otherwise disagree on which tensor a name means); every entry needs dtype,
shape and data_offsets; the offsets must tile the data region exactly (in bounds, no overlap, no gap) and match
shape x dtype size; only float dtypes are accepted. Only then is the file loaded, and every value must be finite.
A pickle or torch.save archive renamed to .safetensors is recognised by its first bytes and named as such.
All problems found are reported together as one InvalidArgument naming the file; reasons echo attacker-chosen
names, so each is shortened (`capped_reasons`) to keep the gRPC status message small.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

from quiver.common.errors import InvalidArgument

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""A larger header is corrupt or hostile, not an adapter; refusing it avoids parsing gigabytes of JSON."""

FLOAT_DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
"""Accepted safetensors dtypes and their element sizes."""

PICKLE_SUFFIXES = frozenset(
    {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz", ".h5", ".msgpack", ".gguf", ".onnx"}
)
"""Weight formats that are refused unopened: pickles can run code on load, the rest are not safetensors."""

MAX_REASONS = 20
"""Problems beyond this many are summarised in one last reason, keeping the gRPC status message small."""
MAX_REASON_CHARS = 300
"""A longer reason (one naming a megabyte-long tensor name, say) keeps its start and end, the middle elided."""

_FOREIGN_MAGIC = (
    (b"\x80\x02", "a pickle"), (b"\x80\x03", "a pickle"), (b"\x80\x04", "a pickle"), (b"\x80\x05", "a pickle"),
    (b"PK\x03\x04", "a zip archive (torch.save writes pickles in one)"),
)
"""First bytes of files that are not safetensors and are dangerous to load: named, never unpickled."""

_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


def capped_reasons(reasons: list[str]) -> list[str]:
    """`reasons` each cut to MAX_REASON_CHARS; beyond MAX_REASONS, the first MAX_REASONS - 1 and a count of the rest."""
    if len(reasons) > MAX_REASONS:
        reasons = [*reasons[: MAX_REASONS - 1], f"... and {len(reasons) - MAX_REASONS + 1} more problems"]
    half = MAX_REASON_CHARS // 2
    return [r if len(r) <= MAX_REASON_CHARS else f"{r[:half]} ... {r[-half:]}" for r in reasons]


def foreign_weight_files(directory: Path) -> list[str]:
    """Names (relative to `directory`) of every non-safetensors weights file under it, sorted."""
    return sorted(
        str(path.relative_to(directory))
        for path in directory.rglob("*")
        if path.suffix.lower() in PICKLE_SUFFIXES and not path.is_dir()
    )


def load_checked_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of `path` once its header and values pass every check; InvalidArgument listing all problems."""
    reasons = header_problems(path)
    if not reasons:
        try:
            tensors = load_safetensors(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise InvalidArgument(path.name, f"cannot be loaded: {e}") from e
        reasons = list(_non_finite(tensors))
    if reasons:
        raise InvalidArgument(path.name, "; ".join(capped_reasons(reasons)))
    return tensors


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, read whole and parsed from memory. Not `load_file`/`safe_open`: in
    safetensors 0.8 each tensor taken from an opened file keeps about 56 bytes for the life of the process, which a
    server that validates and loads adapters all day turns into a leak (bench/soak.py); parsing bytes keeps
    nothing. Adapters are small, so the transient second copy does not matter."""
    return load_safetensors_bytes(path.read_bytes())


def header_problems(path: Path) -> list[str]:
    """Everything wrong with the framing and header of a safetensors file, [] when it is sound."""
    problems = _framing_problems(path)
    if problems and (what := _foreign_format(path)) is not None:
        # Sniffed only once the framing failed: a sound header's length field may start with the same bytes.
        return [f"is {what}, not a safetensors file (refused without loading it)"]
    return problems


def _foreign_format(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            start = f.read(4)
    except OSError:
        return None
    return next((what for magic, what in _FOREIGN_MAGIC if start.startswith(magic)), None)


def _framing_problems(path: Path) -> list[str]:
    try:
        file_size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                return [f"file is {file_size} bytes, shorter than the 8-byte header length"]
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                return [f"header length {length} exceeds the {MAX_HEADER_BYTES}-byte cap"]
            if 8 + length > file_size:
                return [f"header length {length} runs past the end of the {file_size}-byte file"]
            raw = f.read(length)
    except OSError as e:
        return [f"cannot be read: {e}"]
    header, reasons = _parse_header(raw)
    if header is None:
        return reasons
    return reasons + _entry_problems(header, data_size=file_size - 8 - length)


def _parse_header(raw: bytes) -> tuple[dict[str, Any] | None, list[str]]:
    duplicates: list[str] = []

    def refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                duplicates.append(key)
            seen[key] = value
        return seen

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=refuse_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        return None, [f"header is not valid UTF-8 JSON: {e}"]
    if not isinstance(header, dict):
        return None, ["header is not a JSON object"]
    reasons = [f"header has duplicate key {key!r}" for key in sorted(set(duplicates))]
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        reasons.append("__metadata__ must map strings to strings")
    return header, reasons


def _entry_problems(header: dict[str, Any], *, data_size: int) -> list[str]:
    if not header:
        return ["holds no tensors"]
    reasons: list[str] = []
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        span, problems = _check_entry(name, entry, data_size)
        reasons += problems
        if span is not None:
            spans.append((*span, name))
    if not reasons:
        reasons += _tiling_problems(sorted(spans), data_size)
    return reasons


def _check_entry(name: str, entry: Any, data_size: int) -> tuple[tuple[int, int] | None, list[str]]:
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        return None, [f"tensor {name!r} must have exactly dtype, shape and data_offsets"]
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    problems: list[str] = []
    if not _int_list(shape):
        problems.append(f"tensor {name!r} has invalid shape {shape!r}")
    if not (_int_list(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
        problems.append(f"tensor {name!r} has invalid data_offsets {offsets!r}")
    if dtype not in FLOAT_DTYPE_BYTES:
        problems.append(f"tensor {name!r} has dtype {dtype!r}; only float dtypes {sorted(FLOAT_DTYPE_BYTES)} allowed")
    if problems:
        return None, problems
    begin, end = offsets
    if end > data_size:
        problems.append(f"tensor {name!r} data_offsets {offsets} run past the {data_size}-byte data region")
    expected = math.prod(shape) * FLOAT_DTYPE_BYTES[dtype]
    if end - begin != expected:
        problems.append(f"tensor {name!r} spans {end - begin} bytes but shape {shape} of {dtype} needs {expected}")
    return (begin, end), problems


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _tiling_problems(spans: list[tuple[int, int, str]], data_size: int) -> list[str]:
    # Sorted by start, the spans must follow each other with no gap and no overlap and end at the data's end.
    reasons: list[str] = []
    position, previous = 0, "the header"
    for begin, end, name in spans:
        if begin < position:
            reasons.append(f"tensor {name!r} overlaps {previous!r}")
        elif begin > position:
            reasons.append(f"{begin - position} unused bytes before tensor {name!r}")
        position, previous = max(position, end), name
    if position != data_size:
        reasons.append(f"data region is {data_size} bytes but tensors cover {position}")
    return reasons


def _non_finite(tensors: dict[str, torch.Tensor]) -> Iterable[str]:
    for name, tensor in sorted(tensors.items()):
        nan = int(torch.isnan(tensor).sum())
        inf = int(torch.isinf(tensor).sum())
        if nan or inf:
            yield f"tensor {name!r} has {nan} NaN and {inf} Inf values (all values must be finite)"
