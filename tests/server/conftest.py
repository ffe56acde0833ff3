"""Fixtures for engine and gRPC tests: a tiny random Llama that shares the default model's tokenizer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from quiver.server.config import EngineConfig
from quiver.server.engine.engine import Engine


@pytest.fixture(scope="session")
def smol_tokenizer(default_checkpoint: Path) -> Any:
    """The default model's tokenizer, from its converted checkpoint (parsing the GGUF again is slow)."""
    tok = AutoTokenizer.from_pretrained(default_checkpoint)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="session")
def tiny_model(smol_tokenizer: Any) -> LlamaForCausalLM:
    """Random 2-layer Llama over the real vocabulary, so real text round-trips through it."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smol_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=smol_tokenizer.eos_token_id,
        bos_token_id=smol_tokenizer.bos_token_id,
        pad_token_id=smol_tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    # Random init gives near-uniform logits; sharpen them so greedy ties cannot hide a bug.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20)
    return model.eval()


@pytest.fixture
def engine(tiny_model: Any, smol_tokenizer: Any) -> Iterator[Engine]:
    """A running engine over the tiny model, ending sequences at the tokenizer's end-of-sequence token."""
    eng = Engine(tiny_model, smol_tokenizer, frozenset({smol_tokenizer.eos_token_id}), EngineConfig(max_queued=8))
    eng.start()
    yield eng
    eng.stop()
