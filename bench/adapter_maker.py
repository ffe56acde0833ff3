"""Many real PEFT adapters, fast: one template per kind made by PEFT itself, then clones with fresh tensors.

The template is what a user uploads: `get_peft_model` on the resident base, every trainable parameter drawn at
random (PEFT zero-initialises LoRA's B, which would make every adapter a no-op), `save_pretrained`, and the
base is restored (`unload`) so the same model object serves every scenario. A clone copies the template's
adapter_config.json and writes new random tensors of the same names, shapes and dtypes, so it is a distinct
but equally valid adapter. Every adapter is registered, i.e. fully validated, into a LocalAdapterStore.
"""

from __future__ import annotations

import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file, save_file

from bench.workload import BenchModel
from quiver.adapters.base_spec import base_spec_from_checkpoint
from quiver.adapters.registry import AdapterRegistry, RegistrationOptions
from quiver.adapters.store import LocalAdapterStore, StoredAdapter
from quiver.adapters.validation import ValidationLimits

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Scale of the random adapter weights: enough to change outputs, small enough to stay finite in bf16.
RANDOM_SCALE = 0.02
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VIRTUAL_TOKENS = 20  # soft prompt / prefix length (PEFT's documentation examples use 20-30)

# Adapter kind -> its PEFT config.
ADAPTER_KINDS: dict[str, Callable[[], PeftConfig]] = {
    "lora16-all": lambda: LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules=list(ALL_LINEAR)),
    "lora8-qv": lambda: LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS),
    "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS),
}


@dataclass(frozen=True)
class MadeAdapter:
    """One adapter, registered: what Quiver serves. PEFT loads the same directory (`peft_dir`): a stored
    version keeps PEFT's own files, so the written source is removed once registered (disk: for an 8B base a
    rank-16 all-linear adapter is 168 MB)."""

    stored: StoredAdapter

    @property
    def peft_dir(self) -> Path:
        return self.stored.path


@dataclass
class MadeBatch:
    """Adapters made in one call, and where the time went."""

    adapters: list[MadeAdapter]
    write_s: float  # making and saving the PEFT directories
    register_s: float  # AdapterRegistry.register of all of them (validation + store)

    @property
    def stored(self) -> list[StoredAdapter]:
        return [a.stored for a in self.adapters]



def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


def _randomized(tensors: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        key: (torch.randn(t.shape, generator=generator, dtype=torch.float32) * RANDOM_SCALE).to(t.dtype)
        for key, t in sorted(tensors.items())
    }


class AdapterMaker:
    """Makes, clones and registers adapters for one base model under one work directory."""

    def __init__(self, bm: BenchModel, work_dir: Path) -> None:
        self._bm = bm
        self._sources = work_dir / "sources"
        store = LocalAdapterStore(work_dir / "store")
        self.registry = AdapterRegistry(store, base_spec_from_checkpoint(bm.checkpoint_dir), ValidationLimits())
        self._templates: dict[str, tuple[Path, dict[str, torch.Tensor]]] = {}

    def make(self, kind: str, count: int, prefix: str) -> MadeBatch:
        """`count` distinct adapters of `kind`, named `<prefix>-<i>`, each written and registered."""
        template, tensors = self._template(kind)
        made: list[MadeAdapter] = []
        write_s = register_s = 0.0
        for i in range(count):
            name = f"{prefix}-{i:04d}"
            t0 = time.perf_counter()
            source = self._sources / name
            source.mkdir(parents=True)
            shutil.copyfile(template / CONFIG_FILE, source / CONFIG_FILE)
            save_file(_randomized(tensors, _seed(name)), str(source / WEIGHTS_FILE))
            t1 = time.perf_counter()
            stored = self.registry.register(source, RegistrationOptions(name=name))
            register_s += time.perf_counter() - t1
            write_s += t1 - t0
            shutil.rmtree(source)
            made.append(MadeAdapter(stored))
        return MadeBatch(made, write_s, register_s)

    def _template(self, kind: str) -> tuple[Path, dict[str, torch.Tensor]]:
        if kind not in self._templates:
            out_dir = self._sources / f"template-{kind}"
            self._save_with_peft(ADAPTER_KINDS[kind](), out_dir)
            self._templates[kind] = (out_dir, load_file(str(out_dir / WEIGHTS_FILE)))
        return self._templates[kind]

    def _save_with_peft(self, config: PeftConfig, out_dir: Path) -> None:
        """get_peft_model + random trainable weights + save_pretrained, then give the base model back."""
        model = self._bm.model
        peft_model: Any = get_peft_model(model, config)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for _, param in sorted(peft_model.named_parameters()):
                if param.requires_grad:
                    noise = torch.randn(param.shape, generator=generator) * RANDOM_SCALE
                    param.copy_(noise.to(param.dtype))
        peft_model.save_pretrained(out_dir)
        if isinstance(config, LoraConfig):
            peft_model.unload()  # puts the original linears back, unmerged
        restore_base(model)


def restore_base(model: Any) -> None:
    """Leave `model` as the server loaded it after PEFT used it: no adapter layers, inference mode."""
    leftovers = [name for name, _ in model.named_modules() if "lora_" in name]
    if leftovers:
        raise RuntimeError(f"PEFT left adapter layers in the base model: {leftovers[:3]}")
    for attribute in ("peft_config", "_hf_peft_config_loaded"):
        if attribute in vars(model):
            delattr(model, attribute)
    model.eval()
