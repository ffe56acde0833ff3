"""A sequence-classification adapter's head: the output layer PEFT trains beside a SEQ_CLS adapter.

PEFT saves the head (its `modules_to_save`, `score` for Llama-style models, `classifier` for others) in the same
safetensors file as the adapter, as `base_model.model.score.weight` beside a LoRA's weights and
`base_model.score.weight` beside a soft prompt's: a (num_labels, hidden_size) matrix, and a bias (num_labels,)
where the head has one. transformers' `*ForSequenceClassification` apply it to the last token's final hidden state
(after the model's final norm), which is what Quiver serves: a classification row is an embedding row pooled at
its last token, then multiplied by its adapter's head, per row (server/engine/pooling.py).
"""

from __future__ import annotations

import re

import torch

from quiver.adapters.peft_config import HEAD_MODULES

_HEAD_KEY = re.compile(r"^base_model\.(?:model\.)?(?P<module>" + "|".join(sorted(HEAD_MODULES))
                       + r")(?:\.modules_to_save\.default)?\.(?P<part>weight|bias)$")
HEAD_WEIGHT = "head.weight"
HEAD_BIAS = "head.bias"


def split_head(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the head's tensors as {HEAD_WEIGHT, HEAD_BIAS?}, every other tensor). Several heads, or a part saved twice,
    keep every match in the head dict under its original name too, for `head_problems` to report."""
    head: dict[str, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        match = _HEAD_KEY.match(key)
        if match is None:
            rest[key] = tensor
            continue
        name = HEAD_WEIGHT if match["part"] == "weight" else HEAD_BIAS
        head[key if name in head else name] = tensor
    return head, rest


def head_problems(head: dict[str, torch.Tensor], hidden_size: int, labels: int | None) -> list[str]:
    """Everything wrong with a classification head for a base of `hidden_size` and `labels` names (None: not
    given, any count), [] when it fits."""
    extra = sorted(set(head) - {HEAD_WEIGHT, HEAD_BIAS})
    if extra:
        return [f"more than one classification head: {', '.join(extra)}"]
    weight = head.get(HEAD_WEIGHT)
    if weight is None:
        return ["a SEQ_CLS adapter needs its classification head (score.weight or classifier.weight); none saved"]
    if weight.dim() != 2 or weight.shape[1] != hidden_size or weight.shape[0] < 1:
        return [f"classification head weight has shape {tuple(weight.shape)}; this base needs (num_labels, "
                f"{hidden_size})"]
    problems = []
    bias = head.get(HEAD_BIAS)
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        problems.append(f"classification head bias has shape {tuple(bias.shape)}; the weight needs "
                        f"({weight.shape[0]},)")
    if labels is not None and labels != weight.shape[0]:
        problems.append(f"{labels} labels given for a head of {weight.shape[0]} outputs")
    return problems
