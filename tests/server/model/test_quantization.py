"""Device, dtype and quantization choices, and loading the base model with each scheme on CPU."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import BitsAndBytesConfig

from quiver.common.errors import ModelLoadError
from quiver.common.fingerprint import fingerprint
from quiver.common.quantization import (
    QUANTIZATION_SCHEMES,
    keep_nf4_compute_dtype,
    quantization_config,
    resolve_device,
    resolve_dtype,
    resolve_quantization,
)
from quiver.server.config import ModelConfig, Quantize
from quiver.server.model.model_loader import LoadedModel, load_base_model

from ...real_models import RealModels


def test_auto_resolves_per_device(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.INFO, logger="quiver.common.quantization"):
        assert resolve_quantization("auto", "cpu") == "none"
        assert resolve_quantization("auto", "cuda:0") == "nf4"
    assert "quantization: none (auto on cpu)" in caplog.text
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda:0") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16


@pytest.mark.parametrize("choice", ["nf4", "int8", "none"])
def test_explicit_scheme_is_kept(choice: str):
    assert resolve_quantization(choice, "cpu") == choice


def test_unknown_choices_are_load_errors():
    with pytest.raises(ModelLoadError, match="--quantize 'gptq'"):
        resolve_quantization("gptq", "cpu")
    with pytest.raises(ModelLoadError, match="--dtype 'int4'"):
        resolve_dtype("int4", "cpu")
    with pytest.raises(ModelLoadError, match="--device 'tpu'"):
        resolve_device("tpu")


def test_devices():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda:0" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_requested_without_cuda_is_refused():
    with pytest.raises(ModelLoadError, match="no CUDA device"):
        resolve_device("cuda")


def test_scheme_configs():
    nf4 = quantization_config("nf4", torch.bfloat16)
    assert isinstance(nf4, BitsAndBytesConfig) and nf4.load_in_4bit
    assert nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_use_double_quant
    assert nf4.bnb_4bit_compute_dtype == torch.bfloat16
    int8 = quantization_config("int8", torch.float32)
    assert isinstance(int8, BitsAndBytesConfig) and int8.load_in_8bit
    assert quantization_config("none", torch.float32) is None
    assert set(QUANTIZATION_SCHEMES) == {"nf4", "int8", "none"}


def _load(checkpoint: Path | None, quantize: Quantize, cache_dir: Path) -> LoadedModel:
    model = None if checkpoint is None else str(checkpoint)
    return load_base_model(ModelConfig(model=model, quantize=quantize, device="cpu", cache_dir=str(cache_dir)))


def test_tiny_model_loads_unquantized_on_cpu_by_default(tiny_checkpoint: Path, tmp_path: Path):
    loaded = _load(tiny_checkpoint, "auto", tmp_path)
    info = loaded.info
    assert (info.quantization, info.device, info.dtype) == ("none", "cpu", "float32")
    assert info.name == "tiny-llama" and info.architecture == "LlamaForCausalLM"
    assert info.context_length == 128 and info.has_chat_template
    assert info.fingerprint == fingerprint(tiny_checkpoint)
    params = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    assert info.resident_bytes >= params > 0
    assert not loaded.model.training
    assert loaded.eos_token_ids == frozenset({2})
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == "</s>"
    assert loaded.checkpoint_dir == tiny_checkpoint.resolve()


@pytest.mark.parametrize(("scheme", "layer_class"), [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_tiny_model_quantizes_on_cpu(
    tiny_checkpoint: Path, tmp_path: Path, scheme: Quantize, layer_class: str, caplog: pytest.LogCaptureFixture
):
    plain = _load(tiny_checkpoint, "none", tmp_path)
    loaded = _load(tiny_checkpoint, scheme, tmp_path)
    assert loaded.info.quantization == scheme
    assert type(loaded.model.model.layers[0].mlp.up_proj).__name__ == layer_class
    # The output projection (tied to the embeddings) stays in full precision.
    assert type(loaded.model.lm_head) is torch.nn.Linear
    assert loaded.model.lm_head.weight.dtype == torch.float32
    assert loaded.info.resident_bytes < plain.info.resident_bytes
    # Quantization changes how the weights are held, not which model this is.
    assert loaded.info.fingerprint == plain.info.fingerprint
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.inference_mode(), caplog.at_level(logging.WARNING):
        logits = loaded.model(ids).logits  # (1, 4, vocab)
        logits = loaded.model(ids).logits
    assert logits.shape == (1, 4, 256) and torch.isfinite(logits).all()
    # bitsandbytes' per-matmul int8 cast warning reaches the log at most once, not once per layer and step.
    assert sum("MatMul8bitLt" in r.getMessage() for r in caplog.records) <= 1


def test_a_float32_nf4_model_computes_in_float32(tiny_checkpoint: Path, tmp_path: Path):
    """On a CPU with AVX512-BF16, bitsandbytes switches an nf4 layer to a bfloat16 kernel for good at its first
    inference call. A float32 model must not switch: its inference logits equal those of a
    training-mode forward, which never takes that kernel, before and after inference calls."""
    loaded = _load(tiny_checkpoint, "nf4", tmp_path)
    model, ids = loaded.model, torch.tensor([[1, 5, 9, 13, 17, 21]])
    model.train()
    with torch.no_grad():
        reference = model(ids).logits  # (1, 6, vocab), float32 throughout
    model.eval()
    with torch.inference_mode():
        served = [model(ids).logits, model(ids[:, :1]).logits, model(ids).logits]
    assert all(not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
               for m in model.modules() if type(m).__name__ == "Linear4bit")
    assert torch.allclose(served[0], reference, atol=1e-6, rtol=0)
    assert torch.allclose(served[2], reference, atol=1e-6, rtol=0)
    assert torch.allclose(served[1], reference[:, :1], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("dtype", "held"), [(torch.float32, True), (torch.bfloat16, False)])
def test_the_bfloat16_kernel_is_off_only_for_float32(tiny_checkpoint: Path, dtype: torch.dtype, held: bool):
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint), dtype=dtype, device_map="cpu",
                                                 quantization_config=quantization_config("nf4", dtype))
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for layer in layers:  # as on a CPU with AVX512-BF16, whatever this one has
        layer.support_avx512bf16_for_cpu = True
    assert keep_nf4_compute_dtype(model, "cpu", dtype) == (len(layers) if held else 0) and layers
    assert all(layer.support_avx512bf16_for_cpu is not held for layer in layers)


def test_eos_ids_merge_generation_config_and_tokenizer(tmp_path: Path):
    from ...conftest import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(tmp_path / "multi-eos", eos_token_id=[2, 7])
    assert _load(checkpoint, "none", tmp_path).eos_token_ids == frozenset({2, 7})


def test_pickle_only_checkpoint_is_refused(tiny_checkpoint: Path, tmp_path: Path):
    # Only safetensors are ever read; a checkpoint with nothing else cannot load.
    (tiny_checkpoint / "model.safetensors").unlink()
    torch.save({}, tiny_checkpoint / "pytorch_model.bin")
    # Refused by the model load, for want of safetensors: not by a later step (the fingerprint, which also
    # reads only safetensors) after the pickle was read.
    with pytest.raises(ModelLoadError) as info:
        _load(tiny_checkpoint, "none", tmp_path)
    assert type(info.value) is ModelLoadError
    assert str(info.value).startswith(f"cannot load the model in {tiny_checkpoint} (none on cpu): ")
    assert "model.safetensors" in str(info.value)


def _greedy_reply(loaded: LoadedModel, max_new_tokens: int) -> str:
    tokenizer = loaded.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        out = loaded.model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    prompt_len = inputs["input_ids"].shape[1]
    return str(tokenizer.decode(out[0, prompt_len:], skip_special_tokens=True))


@pytest.mark.real_model
@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_default_model_generates_quantized_on_cpu(default_checkpoint: Path, real_models: RealModels, scheme: Quantize):
    loaded = real_models.get(scheme)
    assert loaded.info.quantization == scheme and loaded.info.device == "cpu"
    assert loaded.info.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert loaded.info.context_length == 8192 and loaded.info.has_chat_template
    assert loaded.info.fingerprint == fingerprint(default_checkpoint)
    # bitsandbytes on CPU dequantizes weights in every matmul: a few tokens keep the test quick.
    reply = _greedy_reply(loaded, max_new_tokens=4)
    assert reply.strip()
    assert "Paris" in reply or "capital" in reply
