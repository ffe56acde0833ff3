"""Tiny random Llama checkpoints with a word-level tokenizer: built in well under a second, no model package needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# Small enough to build and save in well under a second, large enough for bitsandbytes' 64-wide blocks.
TINY_LLAMA: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": True,
}
TINY_CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def write_tiny_tokenizer(out_dir: Path) -> None:
    """A word-level tokenizer over '<unk> <s> </s> w0 … w252' with a chat template and no pad token."""
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(TINY_LLAMA["vocab_size"] - 3)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)


def write_tiny_checkpoint(
    out_dir: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32, tokenizer: bool = True, **overrides: Any
) -> Path:
    """Save a random Llama (TINY_LLAMA updated with `overrides`) as safetensors, plus a tokenizer."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides}))
    torch.nn.Module.to(model, dtype)  # via Module: transformers' typed `to` wrapper confuses mypy
    model.save_pretrained(out_dir)
    if tokenizer:
        write_tiny_tokenizer(out_dir)
    return out_dir
