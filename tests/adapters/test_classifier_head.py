"""A SEQ_CLS adapter's head is found under either name PEFT saves it by, and refused with a precise reason when it
cannot be this base's classifier."""

from __future__ import annotations

import torch

from quiver.adapters.classifier_head import HEAD_BIAS, HEAD_WEIGHT, head_problems, split_head

H = 8


def test_split_finds_the_head_beside_a_lora_or_a_soft_prompt():
    a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    head, rest = split_head({a: torch.zeros(2, H), "base_model.model.score.weight": torch.ones(3, H)})
    assert list(head) == [HEAD_WEIGHT] and list(rest) == [a]
    head, rest = split_head({"prompt_embeddings": torch.zeros(4, H), "base_model.classifier.weight": torch.ones(3, H),
                             "base_model.classifier.bias": torch.zeros(3)})
    assert sorted(head) == [HEAD_BIAS, HEAD_WEIGHT] and list(rest) == ["prompt_embeddings"]
    assert head_problems(head, H, 3) == []


def test_every_problem_is_named():
    assert "none saved" in head_problems({}, H, None)[0]
    assert "(num_labels, 8)" in head_problems({HEAD_WEIGHT: torch.ones(3, H + 1)}, H, None)[0]
    assert "bias has shape (2,)" in head_problems({HEAD_WEIGHT: torch.ones(3, H), HEAD_BIAS: torch.ones(2)}, H, None)[0]
    assert head_problems({HEAD_WEIGHT: torch.ones(3, H)}, H, 4) == ["4 labels given for a head of 3 outputs"]
    two, _ = split_head({"base_model.model.score.weight": torch.ones(3, H),
                         "base_model.model.classifier.weight": torch.ones(3, H)})
    assert "more than one classification head" in head_problems(two, H, None)[0]
