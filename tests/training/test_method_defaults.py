"""The choices a user leaves unset are decided per method (training/method_defaults.py, measured in
training/README.md): prefix tuning through its projection unless a text initialises it, soft prompts from the
instruction's text, and the learning rate that goes with each. Pure configuration: no model is loaded."""

from __future__ import annotations

from typing import Any

import pytest

from quiver.clients.cli import build_parser
from quiver.clients.cli.dataclass_args import configs_from_args
from quiver.clients.cli.train import CONFIGS
from quiver.training.config import DataConfig, MethodConfig
from quiver.training.method_defaults import with_defaults
from quiver.training.methods import method_for

INSTRUCTION = "Summarize the conversation."
DATA = DataConfig(data=("train.jsonl",), input_field="dialogue", output_field="summary", instruction=INSTRUCTION)


def resolved(**fields: Any) -> MethodConfig:
    return with_defaults(MethodConfig(**fields), DATA)


@pytest.mark.parametrize(("fields", "projection", "init_text", "learning_rate"), [
    ({"method": "prefix-tuning"}, True, None, 3e-3),
    ({"method": "prefix-tuning", "init_text": "Sum up."}, False, "Sum up.", 1e-2),
    ({"method": "prefix-tuning", "prefix_projection": False}, False, INSTRUCTION, 1e-2),
    ({"method": "prefix-tuning", "prefix_projection": False, "init_from_instruction": False}, False, None, 1e-2),
    ({"method": "prompt-tuning"}, False, INSTRUCTION, 3e-2),
    ({"method": "prompt-tuning", "init_text": "Sum up."}, False, "Sum up.", 3e-2),
    ({"method": "prompt-tuning", "init_from_instruction": False}, False, None, 3e-2),
    ({"method": "lora"}, False, None, 2e-4),
    ({"method": "qlora"}, False, None, 2e-4),
])
def test_unset_choices_are_decided_per_method(fields: dict[str, Any], projection: bool, init_text: str | None,
                                              learning_rate: float):
    method = resolved(**fields)
    assert (method.projects, method.init_text) == (projection, init_text)
    assert method.prefix_projection is (projection if method.method == "prefix-tuning" else fields.get(
        "prefix_projection"))
    assert method_for(method).learning_rate(method) == learning_rate
    assert with_defaults(method, DATA) == method  # deciding again changes nothing


def test_without_an_instruction_a_soft_prompt_starts_at_random():
    for data in (DataConfig(data=("chat.jsonl",)), DataConfig(data=("x.jsonl",), instruction="  ")):
        assert with_defaults(MethodConfig(method="prompt-tuning"), data).init_text is None


def test_a_hidden_size_needs_a_projection_given_or_decided():
    assert MethodConfig(method="prefix-tuning", prefix_hidden_size=64).projects
    with pytest.raises(ValueError, match="needs --prefix-projection"):
        MethodConfig(method="prefix-tuning", prefix_hidden_size=64, prefix_projection=False)
    with pytest.raises(ValueError, match="needs --prefix-projection"):
        MethodConfig(method="prefix-tuning", prefix_hidden_size=64, init_text="Sum up.")


@pytest.mark.parametrize(("flags", "projection", "from_instruction"), [
    ([], None, True),
    (["--prefix-projection"], True, True),
    (["--no-prefix-projection", "--no-init-from-instruction"], False, False),
])
def test_the_cli_leaves_the_projection_unset_unless_given(flags: list[str], projection: bool | None,
                                                          from_instruction: bool):
    args = build_parser().parse_args(["train", "--data", "train.jsonl", "--output", "out", "--method", "prefix-tuning",
                                      *flags])
    method = next(c for c in configs_from_args(args, CONFIGS) if isinstance(c, MethodConfig))
    assert (method.prefix_projection, method.init_from_instruction) == (projection, from_instruction)
