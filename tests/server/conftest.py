"""Fixtures for engine and gRPC tests: a tiny random Llama over a byte-level BPE like the default model's."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quiver.server.config import EngineConfig
from quiver.server.engine.engine import Engine

from ..text_tokenizer import build_text_tokenizer


@pytest.fixture(scope="session")
def text_tokenizer() -> Any:
    """A byte-level BPE shaped like the default model's tokenizer (tests/text_tokenizer.py), built once per session:
    real text round-trips through it without the default model's package."""
    return build_text_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(text_tokenizer: Any) -> LlamaForCausalLM:
    """Random 2-layer Llama over `text_tokenizer`'s vocabulary, so real text round-trips through it."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(text_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=text_tokenizer.eos_token_id,
        bos_token_id=text_tokenizer.bos_token_id,
        pad_token_id=text_tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    # Random init gives near-uniform logits; sharpen them so greedy ties cannot hide a bug.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20)
    return model.eval()


@pytest.fixture
def engine(tiny_model: Any, text_tokenizer: Any) -> Iterator[Engine]:
    """A running engine over the tiny model, ending sequences at the tokenizer's end-of-sequence token."""
    eng = Engine(tiny_model, text_tokenizer, frozenset({text_tokenizer.eos_token_id}), EngineConfig(max_queued=8))
    eng.start()
    yield eng
    eng.stop()
