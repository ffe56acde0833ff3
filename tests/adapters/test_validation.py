"""validate_adapter on real PEFT adapters made on a tiny Llama: valid kinds accepted with the right facts, prefix
keys/values equal to PEFT's own cache, and a corpus of broken adapters each refused with the right exception and
a reason naming the problem."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import IA3Config, PrefixTuningConfig
from safetensors.torch import load_file, save_file

from quiver.adapters.base_spec import BaseModelSpec, base_spec_from_checkpoint
from quiver.adapters.peft_config import LoraSpec
from quiver.adapters.prefix import PREFIX_FILE, PREFIX_KEY, kv_to_prefix
from quiver.adapters.validation import ValidationLimits, validate_adapter
from quiver.common.errors import FailedPrecondition, InvalidArgument, QuiverError, ResourceExhausted

from ..conftest import write_tiny_checkpoint
from .adapter_factory import (
    load_peft_model,
    make_adapter,
    make_lora,
    make_p_tuning,
    make_prefix_tuning,
    make_prompt_tuning,
    peft_model_for,
)

LIMITS = ValidationLimits()
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("validation")


@pytest.fixture(scope="module")
def base_dir(work: Path) -> Path:
    return write_tiny_checkpoint(work / "tiny", tokenizer=False)


@pytest.fixture(scope="module")
def base(base_dir: Path) -> BaseModelSpec:
    return base_spec_from_checkpoint(base_dir)


@pytest.fixture(scope="module")
def pristine(base_dir: Path, work: Path) -> dict[str, Path]:
    """One valid adapter of each kind, built once; tests break copies of them."""
    return {
        "lora": make_lora(base_dir, work / "lora", r=8),
        "prompt": make_prompt_tuning(base_dir, work / "prompt"),
        "prefix": make_prefix_tuning(base_dir, work / "prefix"),
    }


@pytest.fixture
def copy_of(pristine: dict[str, Path], tmp_path: Path) -> Callable[[str], Path]:
    def copy(kind: str) -> Path:
        return Path(shutil.copytree(pristine[kind], tmp_path / f"{kind}-copy"))

    return copy


def edit_tensors(adapter: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> None:
    tensors = load_file(adapter / WEIGHTS)
    edit(tensors)
    save_file(tensors, adapter / WEIGHTS)


def edit_config(adapter: Path, **changes: Any) -> None:
    config = json.loads((adapter / CONFIG).read_text())
    (adapter / CONFIG).write_text(json.dumps({**config, **changes}))


def write_raw_safetensors(path: Path, header: bytes, data: bytes, *, length: int | None = None) -> None:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)


def refused(exc: type[QuiverError], adapter: Path, base: BaseModelSpec, limits: ValidationLimits = LIMITS,
            **kw: Any) -> str:  # fmt: skip
    with pytest.raises(exc) as info:
        validate_adapter(adapter, base, limits, **kw)
    return str(info.value)


# --- Valid adapters --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "targets", "scaling"),
    [
        ({"r": 4}, ("q_proj", "v_proj"), 2.0),
        ({"r": 16, "lora_alpha": 8}, ("q_proj", "v_proj"), 0.5),
        ({"r": 16, "lora_alpha": 8, "use_rslora": True}, ("q_proj", "v_proj"), 2.0),
        ({"r": 4, "target_modules": ["o_proj"]}, ("o_proj",), 2.0),
        ({"r": 4, "target_modules": "all-linear"},
         ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"), 2.0),
    ],
)  # fmt: skip
def test_valid_lora(base_dir: Path, base: BaseModelSpec, tmp_path: Path, kwargs: dict[str, Any],
                    targets: tuple[str, ...], scaling: float) -> None:  # fmt: skip
    adapter = make_lora(base_dir, tmp_path / "lora", **kwargs)
    v = validate_adapter(adapter, base, LIMITS)
    assert (v.kind, v.peft_type, v.rank, v.num_virtual_tokens, v.target_modules) == (
        "lora", "LORA", kwargs["r"], None, targets)  # fmt: skip
    tensors = load_file(adapter / WEIGHTS)
    assert v.num_parameters == sum(t.numel() for t in tensors.values())
    assert v.size_bytes == sum(path.stat().st_size for path in adapter.iterdir())  # README.md included
    assert len(v.lora_scalings) == len(tensors) // 2
    assert list(v.lora_scalings.values()) == [pytest.approx(scaling)] * len(v.lora_scalings)
    assert v.extra_files == {}


def test_lora_with_layers_to_transform_and_default_keys(base_dir: Path, base: BaseModelSpec, tmp_path: Path) -> None:
    adapter = make_lora(base_dir, tmp_path / "lora", r=2, layers_to_transform=[1])
    edit_tensors(adapter, lambda t: t.update({k.replace(".weight", ".default.weight"): t.pop(k) for k in list(t)}))
    v = validate_adapter(adapter, base, LIMITS)
    # Exactly the default targets of layer 1 (not `all(...)`, which an empty mapping would pass), at alpha / r.
    assert dict(v.lora_scalings) == {f"model.layers.1.self_attn.{m}": 2.0 for m in ("q_proj", "v_proj")}


@pytest.mark.parametrize("maker", [make_prompt_tuning, make_p_tuning])
def test_valid_soft_prompt(base_dir: Path, base: BaseModelSpec, tmp_path: Path, maker: Callable[..., Path]) -> None:
    v = validate_adapter(maker(base_dir, tmp_path / "prompt", num_virtual_tokens=5), base, LIMITS)
    assert (v.kind, v.rank, v.num_virtual_tokens, v.target_modules) == ("prompt_tuning", None, 5, ())
    assert v.num_parameters == 5 * base.hidden_size
    assert v.extra_files == {}


def peft_cache_layers(peft_model: Any) -> torch.Tensor:
    """PEFT's prefix cache (batch 1) stacked as (L, 2, H_kv, P, D)."""
    cache = peft_model.get_prompt(batch_size=1)
    return torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("shape", ["gqa", "mha-with-head-dim"])
def test_prefix_matches_peft_cache(base_dir: Path, tmp_path: Path, projection: bool, shape: str) -> None:
    if shape == "mha-with-head-dim":  # 4 KV heads of width 8, narrower than hidden_size / heads = 16
        base_dir = write_tiny_checkpoint(tmp_path / "mha", tokenizer=False, num_key_value_heads=4, head_dim=8)
    base = base_spec_from_checkpoint(base_dir)
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=projection,
                                encoder_hidden_size=16)  # fmt: skip
    trained = peft_model_for(base_dir, config, seed=3)
    trained.save_pretrained(tmp_path / "prefix")
    v = validate_adapter(tmp_path / "prefix", base, LIMITS)
    assert (v.kind, v.peft_type, v.num_virtual_tokens, v.rank) == ("prefix_tuning", "PREFIX_TUNING", 3, None)
    prefix = v.extra_files[PREFIX_FILE][PREFIX_KEY]
    assert prefix.shape == (base.num_layers, 2, base.num_kv_heads, 3, base.head_dim)
    with torch.no_grad():
        assert torch.equal(prefix, peft_cache_layers(load_peft_model(base_dir, tmp_path / "prefix")))
        torch.testing.assert_close(prefix, peft_cache_layers(trained))  # the training-time MLP path
    assert torch.equal(kv_to_prefix(prefix), load_file(tmp_path / "prefix" / WEIGHTS)["prompt_embeddings"])


def test_fingerprint_match_accepted(pristine: dict[str, Path], copy_of: Callable[[str], Path],
                                    base: BaseModelSpec) -> None:  # fmt: skip
    matched = validate_adapter(pristine["lora"], base, LIMITS, base_fingerprint_of_adapter=base.fingerprint)
    # The same facts as without a fingerprint: it adds no problem and stands in for none of the checks.
    assert matched == validate_adapter(pristine["lora"], base, LIMITS)
    assert (matched.kind, matched.rank, matched.target_modules) == ("lora", 8, ("q_proj", "v_proj"))
    broken = copy_of("lora")
    edit_tensors(broken, lambda t: t.update({Q_A: t[Q_A][:, :32].contiguous()}))
    assert "expected (8, 64)" in refused(FailedPrecondition, broken, base, base_fingerprint_of_adapter=base.fingerprint)


# --- Files, size, tensors --------------------------------------------------------------------------------------


def test_pickle_file_refused_unopened(copy_of: Callable[[str], Path], base: BaseModelSpec) -> None:
    adapter = copy_of("lora")
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    assert "adapter_model.bin" in refused(InvalidArgument, adapter, base)


def test_missing_files_refused(tmp_path: Path, base: BaseModelSpec) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "training_args.pt").write_bytes(b"x")
    message = refused(InvalidArgument, tmp_path / "a", base)
    assert all(name in message for name in (CONFIG, WEIGHTS, "training_args.pt"))


def test_oversized_adapter_refused(pristine: dict[str, Path], base: BaseModelSpec) -> None:
    message = refused(ResourceExhausted, pristine["lora"], base, ValidationLimits(max_adapter_bytes=1000))
    assert "1000" in message


@pytest.mark.parametrize(("value", "named"), [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_non_finite_weights_refused(copy_of: Callable[[str], Path], base: BaseModelSpec, value: float,
                                    named: str) -> None:  # fmt: skip
    adapter = copy_of("lora")
    edit_tensors(adapter, lambda t: t[Q_B].view(-1).__setitem__(3, value))
    message = refused(InvalidArgument, adapter, base)
    assert f"1 {named}" in message and Q_B in message and WEIGHTS in message


def test_int_tensor_refused(copy_of: Callable[[str], Path], base: BaseModelSpec) -> None:
    adapter = copy_of("prompt")
    edit_tensors(adapter, lambda t: t.update(prompt_embeddings=t["prompt_embeddings"].to(torch.int32)))
    assert "I32" in refused(InvalidArgument, adapter, base)


def test_duplicate_header_keys_refused(copy_of: Callable[[str], Path], base: BaseModelSpec) -> None:
    adapter = copy_of("prompt")
    entry = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    write_raw_safetensors(adapter / WEIGHTS, f'{{"prompt_embeddings":{entry},"prompt_embeddings":{entry}}}'.encode(),
                          b"\0" * 4)  # fmt: skip
    assert "duplicate key 'prompt_embeddings'" in refused(InvalidArgument, adapter, base)


def test_truncated_file_refused(copy_of: Callable[[str], Path], base: BaseModelSpec) -> None:
    adapter = copy_of("lora")
    raw = (adapter / WEIGHTS).read_bytes()
    (adapter / WEIGHTS).write_bytes(raw[:-100])
    assert "run past" in refused(InvalidArgument, adapter, base)


def test_header_length_beyond_file_refused(copy_of: Callable[[str], Path], base: BaseModelSpec) -> None:
    adapter = copy_of("prompt")
    write_raw_safetensors(adapter / WEIGHTS, b"{}", b"", length=10_000)
    assert "header length 10000" in refused(InvalidArgument, adapter, base)


@pytest.mark.parametrize(
    ("header", "named"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "not valid UTF-8 JSON"),
        (b"\xff{}", "not valid UTF-8 JSON"),
        (b"[]", "not a JSON object"),
        (b"{}", "holds no tensors"),
        (b'{"a": {"dtype": "F32", "shape": [1]}}', "must have exactly dtype, shape and data_offsets"),
        (b'{"__metadata__": {"k": 1}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', "__metadata__"),
    ],
)
def test_garbage_header_refused(copy_of: Callable[[str], Path], base: BaseModelSpec, header: bytes, named: str) -> None:
    adapter = copy_of("prompt")
    write_raw_safetensors(adapter / WEIGHTS, header, b"\0" * 4)
    assert named in refused(InvalidArgument, adapter, base)


@pytest.mark.parametrize(
    ("offsets", "named"),
    [([[0, 8], [4, 12]], "overlaps"), ([[0, 8], [12, 20]], "unused bytes"), ([[0, 8], [8, 12]], "spans 4 bytes")],
)
def test_bad_offsets_refused(copy_of: Callable[[str], Path], base: BaseModelSpec, offsets: list[list[int]],
                             named: str) -> None:  # fmt: skip
    adapter = copy_of("prompt")
    spans = dict(zip("ab", offsets, strict=True))
    header = {name: {"dtype": "F32", "shape": [2], "data_offsets": span} for name, span in spans.items()}
    write_raw_safetensors(adapter / WEIGHTS, json.dumps(header).encode(), b"\0" * max(e for _, e in offsets))
    assert named in refused(InvalidArgument, adapter, base)


# --- Config ----------------------------------------------------------------------------------------------------


def test_dora_refused(base_dir: Path, base: BaseModelSpec, tmp_path: Path) -> None:
    adapter = make_lora(base_dir, tmp_path / "dora", r=2, use_dora=True)
    assert "DoRA" in refused(FailedPrecondition, adapter, base)


def test_modules_to_save_refused(base_dir: Path, base: BaseModelSpec, tmp_path: Path) -> None:
    adapter = make_lora(base_dir, tmp_path / "mts", r=2, modules_to_save=["model.norm"])
    assert "modules_to_save" in refused(FailedPrecondition, adapter, base)


def test_ia3_refused(base_dir: Path, base: BaseModelSpec, tmp_path: Path) -> None:
    adapter = make_adapter(base_dir, tmp_path / "ia3", IA3Config(task_type="CAUSAL_LM"))
    assert "IA3" in refused(FailedPrecondition, adapter, base)


def test_malformed_config_refused(copy_of: Callable[[str], Path], base: BaseModelSpec) -> None:
    adapter = copy_of("lora")
    (adapter / CONFIG).write_text("not json")
    assert CONFIG in refused(InvalidArgument, adapter, base)


# --- Fit with the base -----------------------------------------------------------------------------------------


def test_wrong_lora_shape_refused(copy_of: Callable[[str], Path], base: BaseModelSpec) -> None:
    adapter = copy_of("lora")
    edit_tensors(adapter, lambda t: t.update({Q_A: t[Q_A][:, :32].contiguous()}))
    message = refused(FailedPrecondition, adapter, base)
    assert "lora_A has shape (8, 32), expected (8, 64)" in message


def test_rank_differing_from_config_refused(copy_of: Callable[[str], Path], base: BaseModelSpec) -> None:
    adapter = copy_of("lora")
    edit_config(adapter, r=4)
    assert "expected (4, 64)" in refused(FailedPrecondition, adapter, base)


def rename(old: str, new: str) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda t: t.update({k.replace(old, new): t.pop(k) for k in list(t) if old in k})


def test_unknown_target_module_refused(copy_of: Callable[[str], Path], base: BaseModelSpec) -> None:
    adapter = copy_of("lora")
    edit_tensors(adapter, rename("q_proj", "qkv_proj"))
    assert "unknown target module 'qkv_proj'" in refused(FailedPrecondition, adapter, base)


def test_layer_out_of_range_refused(copy_of: Callable[[str], Path], base: BaseModelSpec) -> None:
    adapter = copy_of("lora")
    edit_tensors(adapter, rename("layers.1.", "layers.7."))
    assert "layer 7 out of range" in refused(FailedPrecondition, adapter, base)


def test_rank_over_cap_refused(pristine: dict[str, Path], base: BaseModelSpec) -> None:
    message = refused(FailedPrecondition, pristine["lora"], base, ValidationLimits(max_rank=4))
    assert "rank 8 exceeds --max-rank 4" in message


def test_unexpected_tensors_refused(copy_of: Callable[[str], Path], base: BaseModelSpec) -> None:
    adapter = copy_of("lora")
    magnitude = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    edit_tensors(adapter, lambda t: t.update({magnitude: torch.ones(64), "stray": torch.ones(2)}))
    message = refused(FailedPrecondition, adapter, base)
    assert "DoRA magnitude" in message and "'stray' is not a LoRA weight" in message


def test_half_pair_refused(copy_of: Callable[[str], Path], base: BaseModelSpec) -> None:
    adapter = copy_of("lora")
    edit_tensors(adapter, lambda t: t.pop(Q_B))
    assert "has lora_A but no lora_B" in refused(FailedPrecondition, adapter, base)


def test_module_outside_target_modules_refused(copy_of: Callable[[str], Path], base: BaseModelSpec) -> None:
    adapter = copy_of("lora")
    edit_config(adapter, target_modules=["v_proj"])
    assert "excludes it" in refused(FailedPrecondition, adapter, base)


def test_several_fit_problems_reported_together(copy_of: Callable[[str], Path], base: BaseModelSpec) -> None:
    adapter = copy_of("lora")

    def break_three_ways(t: dict[str, torch.Tensor]) -> None:
        rename("layers.1.self_attn.q_proj", "layers.9.self_attn.q_proj")(t)
        rename("layers.1.self_attn.v_proj", "layers.1.self_attn.z_proj")(t)
        t[Q_A] = t[Q_A][:4].contiguous()

    edit_tensors(adapter, break_three_ways)
    with pytest.raises(FailedPrecondition) as info:
        validate_adapter(adapter, base, ValidationLimits(max_rank=4), base_fingerprint_of_adapter="sha256:" + "0" * 64)
    text = "\n".join(info.value.reasons)
    for named in ("rank 8 exceeds", "made for base sha256:000", "layer 9 out of range", "'z_proj'", "(4, 64)"):
        assert named in text


def test_other_base_lora_refused(base: BaseModelSpec, work: Path, tmp_path: Path) -> None:
    other = write_tiny_checkpoint(work / "other-base", tokenizer=False, hidden_size=32, intermediate_size=64)
    adapter = make_lora(other, tmp_path / "lora", r=2, target_modules="all-linear")
    with pytest.raises(FailedPrecondition) as info:
        validate_adapter(adapter, base, LIMITS)
    assert "model.layers.0.mlp.down_proj.lora_A has shape (2, 64), expected (2, 128)" in info.value.reasons[0]
    assert len(info.value.reasons) == 20 and info.value.reasons[-1].endswith("more problems")


def test_lora_on_output_head_refused(copy_of: Callable[[str], Path], base: BaseModelSpec) -> None:
    adapter = copy_of("lora")
    edit_tensors(adapter, rename("model.layers.0.self_attn.q_proj", "lm_head"))
    assert "LoRA on lm_head" in refused(FailedPrecondition, adapter, base)


@pytest.mark.parametrize("maker", [make_prompt_tuning, make_prefix_tuning])
def test_other_base_prompt_refused(base: BaseModelSpec, work: Path, tmp_path: Path, maker: Callable[..., Path]) -> None:
    other = work / "other-layers"
    if not other.exists():
        write_tiny_checkpoint(other, tokenizer=False, num_hidden_layers=3, hidden_size=32, intermediate_size=64)
    message = refused(FailedPrecondition, maker(other, tmp_path / "a"), base)
    assert "differs from the base's" in message


def test_prompt_shape_mismatch_refused(copy_of: Callable[[str], Path], base: BaseModelSpec) -> None:
    adapter = copy_of("prompt")
    edit_tensors(adapter, lambda t: t.update(prompt_embeddings=t["prompt_embeddings"][:3].contiguous()))
    assert "expected (num_virtual_tokens 4, hidden_size 64)" in refused(FailedPrecondition, adapter, base)


def test_prefix_shape_mismatch_refused(copy_of: Callable[[str], Path], base: BaseModelSpec) -> None:
    adapter = copy_of("prefix")
    edit_tensors(adapter, lambda t: t.update(prompt_embeddings=torch.zeros(4, 2 * 2 * 64)))
    assert "needs (4, 128)" in refused(FailedPrecondition, adapter, base)


def test_fingerprint_mismatch_refused(pristine: dict[str, Path], base: BaseModelSpec) -> None:
    message = refused(FailedPrecondition, pristine["prompt"], base, base_fingerprint_of_adapter="sha256:" + "1" * 64)
    assert "made for base sha256:111" in message


# --- The real default model ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_base(default_checkpoint: Path) -> BaseModelSpec:
    return base_spec_from_checkpoint(default_checkpoint)


@pytest.mark.real_model
def test_real_model_lora(default_checkpoint: Path, real_base: BaseModelSpec, tmp_path: Path) -> None:
    v = validate_adapter(make_lora(default_checkpoint, tmp_path / "lora", r=4), real_base, LIMITS)
    assert (v.rank, v.target_modules, len(v.lora_scalings)) == (4, ("q_proj", "v_proj"), 2 * real_base.num_layers)
    assert isinstance(v.spec, LoraSpec)


@pytest.mark.real_model
def test_real_model_prompt_tuning(default_checkpoint: Path, real_base: BaseModelSpec, tmp_path: Path) -> None:
    v = validate_adapter(make_prompt_tuning(default_checkpoint, tmp_path / "prompt"), real_base, LIMITS)
    assert v.num_parameters == 4 * 576


@pytest.mark.real_model
def test_real_model_prefix_matches_peft(default_checkpoint: Path, real_base: BaseModelSpec, tmp_path: Path) -> None:
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, prefix_projection=True,
                                encoder_hidden_size=8)  # fmt: skip
    trained = peft_model_for(default_checkpoint, config)
    trained.save_pretrained(tmp_path / "prefix")
    v = validate_adapter(tmp_path / "prefix", real_base, LIMITS)
    prefix = v.extra_files[PREFIX_FILE][PREFIX_KEY]
    assert prefix.shape == (30, 2, 3, 2, 64)  # SmolLM2-135M: 30 layers, 3 KV heads (GQA), head_dim 64
    with torch.no_grad():
        torch.testing.assert_close(prefix, peft_cache_layers(trained))
