"""adapter_config.json parsing: PEFT's own configs read back, per-module rank/alpha/targets as PEFT resolves them,
every unsupported feature refused at once, malformed fields refused as InvalidArgument."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from peft import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from peft.tuners.lora import LoraLayer

from quiver.adapters.peft_config import (
    LoraSpec,
    PrefixTuningSpec,
    PromptTuningSpec,
    PTuningSpec,
    parse_peft_config,
    read_peft_config,
)
from quiver.common.errors import FailedPrecondition, InvalidArgument

from ..conftest import write_tiny_checkpoint
from .adapter_factory import peft_model_for


def saved_config(config: Any, tmp_path: Path) -> dict[str, Any]:
    """The adapter_config.json PEFT writes for `config` (no model needed)."""
    config.save_pretrained(tmp_path)
    return json.loads((tmp_path / "adapter_config.json").read_text())


def lora_config(**overrides: Any) -> dict[str, Any]:
    base = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}
    return {**base, **overrides}


@pytest.mark.parametrize(("r", "alpha", "rslora", "scaling"), [(4, 8, False, 2.0), (16, 32, True, 8.0)])
def test_lora_from_peft_saved_config(tmp_path: Path, r: int, alpha: int, rslora: bool, scaling: float) -> None:
    raw = saved_config(LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=["v_proj", "q_proj"]),
                       tmp_path)  # fmt: skip
    parsed = parse_peft_config(raw)
    assert parsed.peft_type == "LORA"
    spec = parsed.spec
    assert isinstance(spec, LoraSpec)
    assert (spec.r, spec.lora_alpha, spec.use_rslora) == (r, alpha, rslora)
    assert spec.target_modules == ("q_proj", "v_proj")
    assert spec.scaling == pytest.approx(scaling)
    assert spec.kind == "lora"


@pytest.mark.parametrize(
    ("config", "spec"),
    [
        (PromptTuningConfig(num_virtual_tokens=5, token_dim=64), PromptTuningSpec(5, 64)),
        (PromptEncoderConfig(num_virtual_tokens=3, token_dim=64, encoder_hidden_size=16), PTuningSpec(3, 64)),
        (
            PrefixTuningConfig(num_virtual_tokens=2, token_dim=32, num_layers=2, num_attention_heads=2,
                               prefix_projection=True),
            PrefixTuningSpec(2, 2, 32, 2, True),
        ),
    ],
)  # fmt: skip
def test_prompt_kinds_from_peft_saved_config(tmp_path: Path, config: Any, spec: Any) -> None:
    config.task_type = "CAUSAL_LM"
    parsed = parse_peft_config(saved_config(config, tmp_path))
    assert parsed.spec == spec


def test_read_from_directory(tmp_path: Path) -> None:
    saved_config(LoraConfig(r=2, target_modules=["q_proj"]), tmp_path)
    assert read_peft_config(tmp_path).spec == LoraSpec(r=2, lora_alpha=8, use_rslora=False, target_modules=("q_proj",))


def test_per_module_rank_alpha_and_targets_match_peft(tmp_path: Path) -> None:
    """rank_pattern, alpha_pattern, regex targets, exclude_modules and layers_to_transform, resolved as PEFT does."""
    base = write_tiny_checkpoint(tmp_path / "base", tokenizer=False)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=r".*\.(q_proj|v_proj|down_proj)",
        exclude_modules=["model.layers.0.mlp.down_proj"],
        rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
        alpha_pattern={"q_proj": 3},
    )
    model = peft_model_for(base, config)
    spec = parse_peft_config(saved_config(config, tmp_path / "cfg")).spec
    assert isinstance(spec, LoraSpec)
    wrapped = {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }
    linear = [name.removeprefix("base_model.model.").removesuffix(".base_layer") for name, _ in
              model.named_modules() if name.endswith(".base_layer")]  # fmt: skip
    assert {name for name in linear if spec.targets(name)} == set(wrapped)
    for name, layer in wrapped.items():
        assert spec.rank_for(name) == layer.r["default"], name
        assert spec.scaling_for(name) == pytest.approx(layer.scaling["default"]), name
    assert spec.max_rank == 6


def test_layers_to_transform_parsed(tmp_path: Path) -> None:
    spec = parse_peft_config(saved_config(LoraConfig(target_modules=["q_proj"], layers_to_transform=1), tmp_path)).spec
    assert isinstance(spec, LoraSpec)
    assert spec.layers_to_transform == (1,)


def test_rslora_scaling_uses_sqrt() -> None:
    spec = parse_peft_config(lora_config(r=16, lora_alpha=8, use_rslora=True)).spec
    assert isinstance(spec, LoraSpec)
    assert spec.scaling == pytest.approx(8 / math.sqrt(16))


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("use_dora", True, "DoRA"),
        ("modules_to_save", ["lm_head"], "modules_to_save"),
        ("bias", "all", "bias"),
        ("bias", "lora_only", "bias"),
        ("lora_bias", True, "lora_bias"),
        ("fan_in_fan_out", True, "fan_in_fan_out"),
        ("use_qalora", True, "QA-LoRA"),
        ("megatron_config", {"tensor_model_parallel_size": 2}, "megatron_config"),
        ("trainable_token_indices", [1, 2], "trainable_token_indices"),
        ("target_parameters", ["mlp.experts.down_proj"], "target_parameters"),
        ("layer_replication", [[0, 2]], "layer_replication"),
        ("init_lora_weights", "pissa", "init_lora_weights"),
        ("init_lora_weights", "loftq", "init_lora_weights"),
        ("alora_invocation_tokens", [5], "alora_invocation_tokens"),
        ("task_type", "TOKEN_CLS", "SEQ_CLS"),
        ("some_future_field", 3, "some_future_field"),
    ],
)
def test_unsupported_lora_feature_refused(field: str, value: Any, named: str) -> None:
    with pytest.raises(FailedPrecondition) as info:
        parse_peft_config(lora_config(**{field: value}))
    assert len(info.value.reasons) == 1
    assert named in info.value.reasons[0]


def test_inert_and_default_fields_accepted() -> None:
    raw = lora_config(lora_dropout=0.1, init_lora_weights="gaussian", some_future_field=None, modules_to_save=[],
                      bias="none", inference_mode=True, base_model_name_or_path="HuggingFaceTB/x")  # fmt: skip
    parsed = parse_peft_config(raw)
    assert parsed.base_model_name_or_path == "HuggingFaceTB/x"


def test_every_unsupported_feature_reported_at_once() -> None:
    raw = lora_config(use_dora=True, modules_to_save=["lm_head"], bias="all", fan_in_fan_out=True,
                      task_type="TOKEN_CLS")
    with pytest.raises(FailedPrecondition) as info:
        parse_peft_config(raw)
    text = " ".join(info.value.reasons)
    assert len(info.value.reasons) == 5
    for named in ("DoRA", "modules_to_save", "bias", "fan_in_fan_out", "CAUSAL_LM"):
        assert named in text


@pytest.mark.parametrize("peft_type", ["IA3", "ADALORA", "LOHA", "LOKR", "BOFT", "VERA", "MULTITASK_PROMPT_TUNING"])
def test_other_peft_types_refused(peft_type: str) -> None:
    with pytest.raises(FailedPrecondition) as info:
        parse_peft_config({"peft_type": peft_type, "task_type": "CAUSAL_LM", "modules_to_save": ["score"]})
    assert peft_type in info.value.reasons[0]
    assert any("modules_to_save" in reason for reason in info.value.reasons)


@pytest.mark.parametrize("peft_type", ["PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING"])
def test_encoder_decoder_prompts_refused(peft_type: str) -> None:
    raw = {"peft_type": peft_type, "num_virtual_tokens": 2, "token_dim": 8, "num_layers": 2, "num_attention_heads": 2,
           "num_transformer_submodules": 2}  # fmt: skip
    with pytest.raises(FailedPrecondition, match="encoder-decoder"):
        parse_peft_config(raw)


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ([1, 2], "JSON object"),
        ({"r": 8}, "peft_type"),
        (lora_config(r="8"), "r must be"),
        (lora_config(r=0), "r must be"),
        (lora_config(r=True), "r must be"),
        (lora_config(lora_alpha="big"), "lora_alpha"),
        (lora_config(lora_alpha=float("nan")), "lora_alpha"),
        (lora_config(use_rslora="yes"), "use_rslora"),
        (lora_config(target_modules=5), "target_modules"),
        (lora_config(target_modules="(unclosed"), "target_modules"),
        (lora_config(rank_pattern={"q_proj": "4"}), "rank_pattern"),
        (lora_config(layers_to_transform=["0"]), "layers_to_transform"),
        ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": -1, "token_dim": 8}, "num_virtual_tokens"),
        ({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 2, "token_dim": 8}, "num_layers"),
    ],
)
def test_malformed_config_is_invalid_argument(raw: Any, named: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_peft_config(raw)
    assert info.value.field == "adapter_config.json"
    assert named in str(info.value)


def test_unreadable_json_is_invalid_argument(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA",')
    with pytest.raises(InvalidArgument, match=r"adapter_config\.json"):
        read_peft_config(tmp_path)


@pytest.mark.parametrize("raw", [{"lora_alpha": 1e30}, {"lora_alpha": -2e4}, {"alpha_pattern": {"q_proj": 1e300}}])
def test_a_huge_alpha_is_refused_before_it_can_turn_logits_to_nan(raw: dict[str, Any]) -> None:
    """Found by fuzzing: finite but huge alphas registered, then every generation under the adapter gave NaN."""
    with pytest.raises(InvalidArgument, match="at most 10000 in magnitude"):
        parse_peft_config(lora_config(**raw))
    assert isinstance(parse_peft_config(lora_config(lora_alpha=1024)).spec, LoraSpec)  # large but sane is fine


def test_sequence_classification_adapters_parse_with_their_head() -> None:
    parsed = parse_peft_config(lora_config(task_type="SEQ_CLS", modules_to_save=["classifier", "score"]))
    assert parsed.task == "classify"
    prompt = parse_peft_config({"peft_type": "PROMPT_TUNING", "task_type": "SEQ_CLS", "num_virtual_tokens": 2,
                                "token_dim": 8, "modules_to_save": ["classifier", "score"]})
    assert prompt.task == "classify"
    assert parse_peft_config(lora_config(task_type="CAUSAL_LM")).task == "generate"


def test_a_head_in_a_generation_adapter_is_refused() -> None:
    with pytest.raises(FailedPrecondition) as info:
        parse_peft_config(lora_config(task_type="CAUSAL_LM", modules_to_save=["score"]))
    assert info.value.reasons == ["modules_to_save ['score'] is a classification head: it needs task_type SEQ_CLS"]
