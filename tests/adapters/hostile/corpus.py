"""The hostile adapter corpus: each case a function that writes one adapter directory an attacker could upload,
and what Quiver must answer (the exact domain error class and words its message must contain).

Cases start from a pristine PEFT adapter (`Workshop.pristine`) and break one thing, so a refusal can only be due
to that thing. Nothing is committed as a binary: pickles, malformed safetensors and sparse files are written here.
The pickle payloads are armed: unpickling one creates `Workshop.marker` (test_corpus checks that they really do),
so a marker that never appears proves that no loader ran them.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from quiver.common.errors import FailedPrecondition, InvalidArgument, QuiverError, TooLarge

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
METADATA = "quiver_adapter.json"
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
SPARSE_BYTES = 10 * 2**30
"""A 10 GiB sparse file: truncate() allocates no disk blocks, so it costs nothing unless someone reads it."""


@dataclass(frozen=True)
class Workshop:
    """What case builders work from."""

    pristine: Mapping[str, Path]
    """Valid adapters ("lora": r=8 on q_proj/v_proj; "prompt": 4 virtual tokens) on the tiny base; copy, never edit."""
    outside: Path
    """A directory outside every adapter and store, holding canaries (a valid weights file, a valid config)."""
    marker: Path
    """The file an armed pickle payload creates when unpickled."""


Build = Callable[[Workshop, Path], None]


@dataclass(frozen=True)
class HostileCase:
    """One hostile adapter and the refusal it must get."""

    id: str
    build: Build
    """Writes the adapter directory (the Path, which does not exist yet)."""
    error: type[QuiverError]
    """The exact class of the error registration must raise."""
    named: tuple[str, ...]
    """Words the error message must contain: the file and the problem."""
    max_seconds: float = 10.0
    """Registration must refuse within this time (cases that must not read or backtrack set it low)."""


class ArmedPayload:
    """Unpickling calls Path.touch(marker): any loader that runs the pickle leaves the marker behind."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


# --- Building blocks -------------------------------------------------------------------------------------------


def copy_of(kind: str) -> Build:
    def build(ws: Workshop, out: Path) -> None:
        shutil.copytree(ws.pristine[kind], out)

    return build


def then(first: Build, edit: Callable[[Path], object]) -> Build:
    def build(ws: Workshop, out: Path) -> None:
        first(ws, out)
        edit(out)

    return build


def edit_config(**changes: Any) -> Build:
    def edit(out: Path) -> None:
        config = json.loads((out / CONFIG).read_text())
        (out / CONFIG).write_text(json.dumps({**config, **changes}))

    return then(copy_of("lora"), edit)


def write_config(text: str, kind: str = "lora") -> Build:
    return then(copy_of(kind), lambda out: (out / CONFIG).write_text(text))


def edit_tensors(change: Callable[[dict[str, torch.Tensor]], object], kind: str = "lora") -> Build:
    def edit(out: Path) -> None:
        tensors = load_file(out / WEIGHTS)
        change(tensors)
        save_file(tensors, out / WEIGHTS)

    return then(copy_of(kind), edit)


def raw_weights(header: bytes | dict[str, Any], data: bytes = b"", *, length: int | None = None) -> Build:
    """The LoRA adapter with its safetensors replaced by these exact bytes (8-byte LE length, header, data)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    prefix = struct.pack("<Q", len(raw) if length is None else length)
    return then(copy_of("lora"), lambda out: (out / WEIGHTS).write_bytes(prefix + raw + data))


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def pickled(name: str, *, zipped: bool, keep_weights: bool = False) -> Build:
    """The LoRA adapter with an armed pickle at `name` (raw pickle, or torch.save's zip of one)."""

    def build(ws: Workshop, out: Path) -> None:
        copy_of("lora")(ws, out)
        if not keep_weights:
            (out / WEIGHTS).unlink()
        if zipped:
            torch.save(ArmedPayload(ws.marker), out / name)
        else:
            (out / name).write_bytes(pickle.dumps(ArmedPayload(ws.marker)))

    return build


def sparse(name: str) -> Build:
    def make(out: Path) -> None:
        with open(out / name, "wb") as f:
            f.truncate(SPARSE_BYTES)

    return then(copy_of("lora"), make)


def linked(name: str, target: Callable[[Workshop], Path]) -> Build:
    """The LoRA adapter with `name` replaced by a symbolic link to `target` (outside the adapter)."""

    def build(ws: Workshop, out: Path) -> None:
        copy_of("lora")(ws, out)
        (out / name).unlink(missing_ok=True)
        os.symlink(target(ws), out / name)

    return build


def fifo_weights(ws: Workshop, out: Path) -> None:
    copy_of("lora")(ws, out)
    (out / WEIGHTS).unlink()
    os.mkfifo(out / WEIGHTS)  # opening it to read would block for ever


def rename_modules(old: str, new: str) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda t: t.update({k.replace(old, new): t.pop(k) for k in list(t) if old in k})


def gpt2_names(ws: Workshop, out: Path) -> None:
    """GPT-2's fused attention (transformer.h.N.attn.c_attn) in place of the Llama modules."""
    edit_tensors(rename_modules("model.layers.", "transformer.h."))(ws, out)
    tensors = load_file(out / WEIGHTS)
    renamed = {k.replace("self_attn.q_proj", "attn.c_attn").replace("self_attn.v_proj", "attn.c_proj"): v
               for k, v in tensors.items()}  # fmt: skip
    save_file(renamed, out / WEIGHTS)
    config = json.loads((out / CONFIG).read_text())
    (out / CONFIG).write_text(json.dumps({**config, "target_modules": ["c_attn", "c_proj"]}))


def zero_size(tensors: dict[str, torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        tensors[name] = tensor[:0].contiguous() if ".lora_A." in name else tensor[:, :0].contiguous()


def nested_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def zero_rank_everywhere(ws: Workshop, out: Path) -> None:
    edit_tensors(zero_size)(ws, out)
    config = json.loads((out / CONFIG).read_text())
    (out / CONFIG).write_text(json.dumps({**config, "r": 0}))


F32_8 = entry("F32", [2], 0, 8)
HUGE_NAME = "w" * 1_000_000

CASES: tuple[HostileCase, ...] = (
    # Pickles, whatever the extension: refused by name, never opened.
    *(HostileCase(f"pickle-as-{name}", pickled(name, zipped=zipped), InvalidArgument, (name, "pickle"))
      for name, zipped in [("adapter_model.bin", False), ("adapter_model.pt", True), ("adapter_model.pth", True),
                           ("adapter_model.ckpt", True), ("adapter_model.pkl", False)]),
    HostileCase("pickle-beside-safetensors", pickled("adapter_model.bin", zipped=False, keep_weights=True),
                InvalidArgument, ("adapter_model.bin", "pickle")),
    HostileCase("pickle-renamed-safetensors", pickled(WEIGHTS, zipped=False), InvalidArgument, (WEIGHTS, "pickle")),
    HostileCase("torch-zip-renamed-safetensors", pickled(WEIGHTS, zipped=True), InvalidArgument, (WEIGHTS, "zip")),
    # safetensors framing.
    HostileCase("header-length-2**62", raw_weights({"a": F32_8}, b"\0" * 8, length=2**62), InvalidArgument,
                (WEIGHTS, f"header length {2**62} exceeds")),
    HostileCase("header-length-past-eof", raw_weights({"a": F32_8}, b"\0" * 8, length=4096), InvalidArgument,
                (WEIGHTS, "runs past the end")),
    HostileCase("header-not-json", raw_weights(b"this is not json", b"\0" * 8), InvalidArgument,
                (WEIGHTS, "not valid UTF-8 JSON")),
    HostileCase("header-deeply-nested", raw_weights(nested_json(200_000).encode()), InvalidArgument,
                (WEIGHTS, "not valid UTF-8 JSON")),
    HostileCase("header-duplicate-keys",
                raw_weights(f'{{"a": {json.dumps(F32_8)}, "a": {json.dumps(F32_8)}}}'.encode(), b"\0" * 8),
                InvalidArgument, (WEIGHTS, "duplicate key 'a'")),
    HostileCase("offsets-overlap", raw_weights({"a": F32_8, "b": entry("F32", [2], 4, 12)}, b"\0" * 12),
                InvalidArgument, (WEIGHTS, "overlaps")),
    HostileCase("offsets-out-of-range", raw_weights({"a": entry("F32", [2], 2**40, 2**40 + 8)}, b"\0" * 8),
                InvalidArgument, (WEIGHTS, "run past the 8-byte data region")),
    HostileCase("offsets-not-dtype-times-shape", raw_weights({"a": entry("F32", [4], 0, 8)}, b"\0" * 8),
                InvalidArgument, (WEIGHTS, "spans 8 bytes but shape [4] of F32 needs 16")),
    HostileCase("header-megabyte-tensor-name", raw_weights({HUGE_NAME: entry("I64", [1], 0, 8)}, b"\0" * 8),
                InvalidArgument, (WEIGHTS, "'I64'")),
    # Values and dtypes.
    HostileCase("tensor-nan", edit_tensors(lambda t: t[Q_B].view(-1).__setitem__(0, float("nan"))),
                InvalidArgument, (WEIGHTS, Q_B, "1 NaN")),
    HostileCase("tensor-inf", edit_tensors(lambda t: t[Q_A].view(-1).__setitem__(5, float("-inf"))),
                InvalidArgument, (WEIGHTS, Q_A, "1 Inf")),
    HostileCase("dtype-int64", edit_tensors(lambda t: t.update({Q_A: t[Q_A].to(torch.int64)})), InvalidArgument,
                (WEIGHTS, Q_A, "'I64'")),
    HostileCase("dtype-bool", edit_tensors(lambda t: t.update({Q_B: t[Q_B] > 0})), InvalidArgument,
                (WEIGHTS, Q_B, "'BOOL'")),
    # Fit with the base.
    HostileCase("lora-a-in-features-not-hidden-size",
                edit_tensors(lambda t: t.update({Q_A: t[Q_A][:, :32].contiguous()})), FailedPrecondition,
                ("q_proj.lora_A has shape (8, 32), expected (8, 64)",)),
    HostileCase("zero-rank-config", edit_config(r=0), InvalidArgument, (CONFIG, "r must be a positive integer, got 0")),
    HostileCase("zero-size-tensors", edit_tensors(zero_size), FailedPrecondition,
                ("q_proj.lora_A has shape (0, 64), expected (8, 64)",)),
    HostileCase("zero-rank-config-and-tensors", zero_rank_everywhere, InvalidArgument,
                (CONFIG, "r must be a positive integer, got 0")),
    HostileCase("gpt2-module-names", gpt2_names, FailedPrecondition, ("unknown target module 'c_attn'",)),
    # adapter_config.json.
    HostileCase("config-unknown-path-field", edit_config(path_initial_model_for_weight_conversion="/etc/passwd"),
                FailedPrecondition, ("unknown field path_initial_model_for_weight_conversion",)),
    HostileCase("config-two-mebibytes", then(copy_of("lora"), lambda out: (out / CONFIG).write_text(
        (out / CONFIG).read_text() + " " * 2 * 2**20)), TooLarge, (CONFIG, "bytes")),
    HostileCase("config-sparse-10GiB", sparse(CONFIG), TooLarge, ("max_adapter_bytes",), max_seconds=2.0),
    HostileCase("config-not-json", write_config("peft_type = 'LORA'"), InvalidArgument, (CONFIG, "not readable JSON")),
    HostileCase("config-deeply-nested", write_config(nested_json(200_000)), InvalidArgument,
                (CONFIG, "not readable JSON")),
    HostileCase("config-r-string", edit_config(r="8"), InvalidArgument,
                (CONFIG, "r must be a positive integer, got '8'")),
    HostileCase("config-alpha-nan", edit_config(lora_alpha=float("nan")), InvalidArgument,
                (CONFIG, "lora_alpha must be a finite number, got nan")),
    HostileCase("config-unknown-peft-type", edit_config(peft_type="EVIL_LORA"), FailedPrecondition,
                ("peft_type EVIL_LORA is not supported",)),
    HostileCase("config-100k-field-value", edit_config(surprise="x" * 100_000), FailedPrecondition,
                ("unknown field surprise",)),
    HostileCase("config-redos-target-modules", edit_config(target_modules="(.*.*)*Z"), InvalidArgument,
                (CONFIG, "target_modules", "backtrack"), max_seconds=2.0),
    HostileCase("config-redos-rank-pattern", edit_config(rank_pattern={"(.|\\w)*Z": 8}), InvalidArgument,
                (CONFIG, "rank_pattern", "backtrack"), max_seconds=2.0),
    # Quiver's own quiver_adapter.json shipped with the adapter (read for its prompt template).
    HostileCase("metadata-sparse-10GiB", sparse(METADATA), TooLarge, ("max_adapter_bytes",), max_seconds=2.0),
    HostileCase("metadata-deeply-nested", then(copy_of("lora"), lambda out: (out / METADATA).write_text(
        nested_json(200_000))), InvalidArgument, (METADATA, "not valid JSON")),
    # Links and special files.
    HostileCase("link-weights-outside", linked(WEIGHTS, lambda ws: ws.outside / "secret.safetensors"),
                InvalidArgument, (WEIGHTS, "symbolic link")),
    HostileCase("link-config-outside", linked(CONFIG, lambda ws: ws.outside / "secret.json"), InvalidArgument,
                (CONFIG, "symbolic link")),
    HostileCase("link-readme-to-etc-passwd", linked("README.md", lambda ws: Path("/etc/passwd")), InvalidArgument,
                ("README.md", "symbolic link")),
    HostileCase("link-subdirectory-outside", linked("extra", lambda ws: ws.outside), InvalidArgument,
                ("extra", "symbolic link")),
    HostileCase("fifo-weights", fifo_weights, InvalidArgument, (WEIGHTS, "not a regular file"), max_seconds=2.0),
    HostileCase("weights-sparse-10GiB", sparse(WEIGHTS), TooLarge, ("max_adapter_bytes",), max_seconds=2.0),
)
"""Every hostile adapter; registering any of them must fail as the case says."""

PATH_FIELDS: tuple[tuple[str, str, Callable[[Workshop], str]], ...] = (
    ("lora", "base_model_name_or_path", lambda ws: "../../etc/passwd"),
    ("lora", "base_model_name_or_path", lambda ws: "/etc/passwd"),
    ("lora", "base_model_name_or_path", lambda ws: str(ws.outside / "secret.json")),
    ("lora", "base_model_name_or_path", lambda ws: os.path.relpath(ws.outside / "secret.json", ws.pristine["lora"])),
    ("prompt", "tokenizer_name_or_path", lambda ws: str(ws.outside)),
)
"""(adapter kind, config field, value): path-like fields that are only metadata. They are accepted and never
resolved: Quiver does not open what they name (test_corpus checks with an audit hook)."""
