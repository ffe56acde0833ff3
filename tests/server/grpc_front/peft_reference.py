"""PEFT's (or transformers') greedy tokens and log-probabilities for prompts given as token ids: the references the
user-level promise tests compare a live server's answers with."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import GenerationConfig


def greedy(model: Any, prompt_ids: Sequence[int], max_new_tokens: int, eos: Sequence[int] = (2,)) -> list[int]:
    """`model.generate` greedily from `prompt_ids` (a PeftModel or a plain causal LM): the new tokens, the end of
    sequence included when it came."""
    ids = torch.tensor([list(prompt_ids)], device=model.device)  # (1, T)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=list(eos), pad_token_id=eos[0])
    return list(out[0, ids.shape[1]:].tolist())


def prompt_logprobs(model: Any, prompt_ids: Sequence[int]) -> list[float]:
    """log p(prompt[i] | prompt[:i]) for i >= 1 under `model` (virtual tokens of a soft prompt, which PEFT puts
    before the prompt's positions in its logits, are cut off)."""
    ids = torch.tensor([list(prompt_ids)], device=model.device)  # (1, T)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -ids.shape[1]:].float()  # (T, V)
    logp = torch.log_softmax(logits[:-1], dim=-1)  # (T-1, V): position i predicts token i+1
    return logp.gather(1, ids[0, 1:, None]).squeeze(1).tolist()  # type: ignore[no-any-return]


def greedy_to_length(model: Any, prompt_ids: Sequence[int], new_tokens: int) -> tuple[list[int], float]:
    """Greedy tokens past any end of sequence (what `ignore_eos` asks of the server), and the smallest gap between
    the two most likely logits along the way: how far float rounding (another batch composition) is from flipping
    a token."""
    ids = torch.tensor([list(prompt_ids)], device=model.device)  # (1, T)
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=0, do_sample=False, eos_token_id=None,
                              pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    tokens = list(out.sequences[0, ids.shape[1]:].tolist())
    assert len(tokens) == new_tokens
    gaps = [float(top[0, 0] - top[0, 1]) for top in (scores.topk(2, dim=-1).values for scores in out.scores)]
    return tokens, min(gaps)
