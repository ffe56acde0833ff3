"""The choices a user leaves unset are decided per method (training/method_defaults.py, measured in
training/README.md): soft prompts and prefixes start from the instruction's text, and each method has its own
learning rate. Pure configuration: no model is loaded."""

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


@pytest.mark.parametrize(("fields", "init_text", "learning_rate"), [
    ({"method": "prefix-tuning"}, INSTRUCTION, 1e-2),
    ({"method": "prefix-tuning", "init_text": "Sum up."}, "Sum up.", 1e-2),
    ({"method": "prefix-tuning", "init_from_instruction": False}, None, 1e-2),
    ({"method": "prefix-tuning", "prefix_projection": True}, None, 1e-3),
    ({"method": "prompt-tuning"}, INSTRUCTION, 3e-2),
    ({"method": "prompt-tuning", "init_text": "Sum up."}, "Sum up.", 3e-2),
    ({"method": "prompt-tuning", "init_from_instruction": False}, None, 3e-2),
    ({"method": "lora"}, None, 1e-3),
    ({"method": "qlora"}, None, 1e-3),
])
def test_unset_choices_are_decided_per_method(fields: dict[str, Any], init_text: str | None, learning_rate: float):
    method = resolved(**fields)
    assert method == MethodConfig(**{**fields, "init_text": init_text})  # nothing else changes
    assert method_for(method).learning_rate(method) == learning_rate
    assert with_defaults(method, DATA) == method  # deciding again changes nothing


def test_without_an_instruction_a_soft_prompt_starts_at_random():
    for data in (DataConfig(data=("chat.jsonl",)), DataConfig(data=("x.jsonl",), instruction="  ")):
        assert with_defaults(MethodConfig(method="prompt-tuning"), data).init_text is None


@pytest.mark.parametrize(("flags", "projection", "from_instruction"), [
    ([], False, True),
    (["--prefix-projection"], True, True),
    (["--no-prefix-projection", "--no-init-from-instruction"], False, False),
])
def test_the_cli_maps_the_flags(flags: list[str], projection: bool,
                                                          from_instruction: bool):
    args = build_parser().parse_args(["train", "--data", "train.jsonl", "--output", "out", "--method", "prefix-tuning",
                                      *flags])
    method = next(c for c in configs_from_args(args, CONFIGS) if isinstance(c, MethodConfig))
    assert (method.prefix_projection, method.init_from_instruction) == (projection, from_instruction)
