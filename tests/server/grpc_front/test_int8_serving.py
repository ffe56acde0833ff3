"""A server over an int8 base (bitsandbytes' LLM.int8 on the CPU; the tiny served model's 64-wide layers fit its
blocks) generates PEFT's greedy tokens for the base and an adapter of each kind, over gRPC, alone and all at once
in one batch. The reference is PEFT (or transformers) over the very same quantized modules, taken back from the
server once it stopped, so both sides run the same int8 matmuls and differ only in how the adapter terms and the
batch are computed.

LLM.int8 quantizes activations per token at run time, so rounding-level differences can move an activation across
an int8 step (tests/server/engine/test_quantized_adapters.py states logit tolerances for the 30-layer default
model). On this 2-layer model with wide greedy margins the tokens are expected to be equal; each reference's
smallest top-2 gap is checked first, so a tie could not make the comparison meaningless.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel

from quiver.clients.client import QuiverClient
from quiver.server.config import ModelConfig

from ...served import start
from .peft_reference import greedy_to_length

NEW = 12
PROMPTS = {"": "w7 w5 w9 w11", "lora": "w9 w8 w7", "prompt": "w200 w201", "prefix": "w60 w61 w62 w63"}


@pytest.fixture(scope="module")
def int8(served_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from quiver.server.model.model_loader import load_base_model

    config = ModelConfig(model=str(served_base_dir), device="cpu", quantize="int8", dtype="float32",
                         cache_dir=str(tmp_path_factory.mktemp("int8-cache")))
    return load_base_model(config)


@pytest.fixture(scope="module")
def served_tokens(int8: Any, served_adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[dict[str, dict[str, list[int]]]]:
    """The server's tokens per adapter ("" = base): each request alone, then all four at once."""
    srv = start(int8, tmp_path_factory.mktemp("store"), served_adapter_dirs)
    try:
        with QuiverClient(srv.target, timeout=120) as client:
            assert client.model_info().quantization == "int8"
            alone = {name: client.generate(prompt, adapter=name, max_new_tokens=NEW, ignore_eos=True).token_ids
                     for name, prompt in PROMPTS.items()}
            engine, widest = srv.running.engine, 0
            with ThreadPoolExecutor(len(PROMPTS)) as pool:
                futures = {name: pool.submit(client.generate, prompt, adapter=name, max_new_tokens=NEW,
                                             ignore_eos=True) for name, prompt in PROMPTS.items()}
                while not all(future.done() for future in futures.values()):
                    widest = max(widest, engine.num_running)
                    time.sleep(0.001)
                mixed = {name: future.result().token_ids for name, future in futures.items()}
            assert widest >= 2  # they shared batches
    finally:
        srv.close()
    yield {"alone": alone, "mixed": mixed}


@pytest.fixture(scope="module")
def references(int8: Any, served_tokens: Any, served_adapter_dirs: dict[str, Path]
               ) -> dict[str, tuple[list[int], float]]:
    """PEFT's (transformers' for the base) greedy tokens over the server's own int8 modules, once it let go."""
    model = int8.model
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear8bitLt"
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear8bitLt"  # the engine's wrappers are gone
    ids = {name: list(int8.tokenizer(text, add_special_tokens=False)["input_ids"]) for name, text in PROMPTS.items()}
    base = {name: greedy_to_length(model, ids[name], NEW) for name in PROMPTS}
    out = {"": base[""]}
    for name in ("lora", "prompt", "prefix"):
        peft: Any = PeftModel.from_pretrained(model, served_adapter_dirs[name]).eval()  # wraps `model` in place
        out[name] = greedy_to_length(peft, ids[name], NEW)
        model = peft.unload() if name == "lora" else peft.get_base_model()
        assert out[name][0] != base[name][0], name  # the adapter changes the tokens
    return out


@pytest.mark.parametrize("batch", ["alone", "mixed"])
@pytest.mark.parametrize("adapter", list(PROMPTS))
def test_int8_server_generates_peft_tokens(served_tokens: dict[str, dict[str, list[int]]],
                                           references: dict[str, tuple[list[int], float]], adapter: str, batch: str):
    expected, margin = references[adapter]
    assert margin > 1e-2, margin
    assert served_tokens[batch][adapter] == expected


def test_int8_changes_the_model(int8: Any, served_loaded: Any):
    """The comparison above is over int8 weights, not full-precision ones that merely kept their name."""
    ids = torch.tensor([[3, 10, 11, 12]])
    with torch.inference_mode():
        quantized, full = int8.model(ids).logits, served_loaded.model(ids).logits
    assert 1e-3 < float((quantized - full).abs().max()) < float(full.abs().max())
