"""Prefix tuning initialised from text: at the start the adapter is the base model reading that text first, in PEFT
and as Quiver serves the saved adapter."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from quiver.clients.client import QuiverClient
from quiver.server.config import AdapterConfig
from quiver.training.config import MethodConfig
from quiver.training.methods import BaseFacts, wrap_for_training
from quiver.training.prefix_init import text_token_ids

from ..server_thread import ServerThread

TOKEN = "prefix-init-token"
TEXT = "w5 w6 w7"  # 3 tokens, repeated to the prefix's 5: w5 w6 w7 w5 w6
PROMPT = "w1 w2 w3 w9"


def _initialised(base_dir: Path, num_virtual_tokens: int = 5) -> Any:
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    config = MethodConfig(method="prefix-tuning", num_virtual_tokens=num_virtual_tokens, init_text=TEXT)
    facts = BaseFacts(base_dir, model.config.hidden_size)
    return wrap_for_training(model, config, facts, gradient_checkpointing=False).eval()


def test_the_text_is_repeated_or_cut_to_the_prefix_length(base_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    five = [tokenizer.convert_tokens_to_ids(w) for w in ["w5", "w6", "w7", "w5", "w6"]]
    assert text_token_ids(tokenizer, TEXT, 5) == five
    assert text_token_ids(tokenizer, TEXT, 2) == five[:2]


def test_an_initialised_prefix_equals_the_base_reading_the_text_first(base_dir: Path):
    """The prefix's keys and values are the base's own for the text (grouped-query heads included: the tiny model has
    4 query and 2 key/value heads), so logits equal the base's on text + prompt, at the prompt's positions."""
    peft_model = _initialised(base_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    prefix = text_token_ids(tokenizer, TEXT, 5)
    prompt = tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt")["input_ids"]  # (1, T)
    with torch.no_grad():
        ours = peft_model(input_ids=prompt, attention_mask=torch.ones_like(prompt)).logits[0]  # (T, V)
        both = torch.cat([torch.tensor([prefix]), prompt], dim=1)
        base = peft_model.get_base_model()(input_ids=both).logits[0, len(prefix):]
        bare = peft_model.get_base_model()(input_ids=prompt).logits[0]
    torch.testing.assert_close(ours, base, atol=1e-4, rtol=1e-4)
    assert (ours - bare).abs().max().item() > 1e-2  # the prefix does change the output


def test_the_saved_adapter_is_served_as_the_base_reading_the_text_first(
    base_dir: Path, loaded: Any, tmp_path: Path, server: ServerThread
):
    _initialised(base_dir).save_pretrained(tmp_path / "prefix")
    with QuiverClient(server.target, timeout=60, admin_token=TOKEN) as client:
        client.register_adapter(tmp_path / "prefix", "from-text")
        served = client.generate(PROMPT, adapter="from-text", max_new_tokens=8, temperature=0)
        base = client.generate("w5 w6 w7 w5 w6 " + PROMPT, max_new_tokens=8, temperature=0)
        bare = client.generate(PROMPT, max_new_tokens=8, temperature=0)
    assert served.token_ids == base.token_ids
    assert served.token_ids != bare.token_ids


@pytest.fixture(scope="module")
def server(loaded: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    store = tmp_path_factory.mktemp("store")
    srv = ServerThread(loaded, store, adapter_config=AdapterConfig(store=str(store), admin_token=TOKEN), http_port=0)
    yield srv
    srv.close()


@pytest.mark.parametrize(("fields", "message"), [
    ({"method": "lora"}, "prompt-tuning or prefix-tuning only"),
    ({"method": "prefix-tuning", "prefix_projection": True}, "one or the other"),
])
def test_init_text_is_refused_where_it_cannot_apply(fields: dict[str, Any], message: str):
    with pytest.raises(ValueError, match=message):
        MethodConfig(init_text=TEXT, **fields)
