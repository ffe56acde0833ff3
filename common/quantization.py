"""Where and how the base model runs: device, compute dtype and bitsandbytes weight quantization.

Quantization schemes: NF4 from QLoRA (Dettmers et al., 2023) with double quantization of the block scales,
and LLM.int8() (Dettmers et al., 2022). Each scheme is one entry of `QUANTIZATION_SCHEMES`; "auto" becomes a
concrete scheme once at start-up and is logged, so the running server never guesses. transformers leaves the
output embedding (lm_head, tied to the input embeddings in small models) unquantized, which we keep.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from transformers import BitsAndBytesConfig

from quiver.common.errors import ModelLoadError
from quiver.common.model_choices import DeviceChoice, DtypeChoice, Quantize

log = logging.getLogger(__name__)

QuantizationBuilder = Callable[[torch.dtype], BitsAndBytesConfig | None]


def _nf4(compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
    )


class _OncePerMessage(logging.Filter):
    """Lets each distinct message template through once."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        template = str(record.msg)
        if template in self._seen:
            return False
        self._seen.add(template)
        return True


# bitsandbytes logs a WARNING on every int8 matmul whose input is not float16 (every layer, every step);
# once is enough to tell the operator, thousands a second would drown the server's log.
_BNB_MATMUL_LOGGER = "bitsandbytes.autograd._functions"


def _int8(compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    logger = logging.getLogger(_BNB_MATMUL_LOGGER)
    if not any(isinstance(f, _OncePerMessage) for f in logger.filters):
        logger.addFilter(_OncePerMessage())
    # LLM.int8() picks its own matmul dtypes; the model's dtype only sets the unquantized layers.
    return BitsAndBytesConfig(load_in_8bit=True)


def _none(compute_dtype: torch.dtype) -> None:
    return None


QUANTIZATION_SCHEMES: dict[str, QuantizationBuilder] = {"nf4": _nf4, "int8": _int8, "none": _none}

# What "auto" means per device type: 4-bit where bitsandbytes has fast kernels, full precision elsewhere.
_AUTO_QUANTIZATION: dict[str, str] = {"cuda": "nf4", "cpu": "none"}

_AUTO_DTYPE: dict[str, torch.dtype] = {"cuda": torch.bfloat16, "cpu": torch.float32}
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _device_type(device: str) -> str:
    return torch.device(device).type


def _auto_device() -> str:
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    log.info("device: %s (auto)", device)
    return device


def _cuda_device() -> str:
    if not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was requested but no CUDA device is available")
    return "cuda:0"


_DEVICES: dict[str, Callable[[], str]] = {"auto": _auto_device, "cuda": _cuda_device, "cpu": lambda: "cpu"}


def resolve_device(choice: DeviceChoice | str) -> str:
    """"auto" → "cuda:0" if CUDA is available, else "cpu"; an explicit "cuda" without CUDA is an error."""
    if choice not in _DEVICES:
        raise ModelLoadError(f"--device {choice!r} is not one of {', '.join(_DEVICES)}")
    return _DEVICES[choice]()


def resolve_dtype(choice: DtypeChoice | str, device: str) -> torch.dtype:
    """The compute dtype: "auto" → bfloat16 on CUDA, float32 on CPU; otherwise the named dtype."""
    if choice == "auto":
        dtype = _AUTO_DTYPE[_device_type(device)]
        log.info("dtype: %s (auto)", dtype_name(dtype))
        return dtype
    if choice not in _DTYPES:
        raise ModelLoadError(f"--dtype {choice!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[choice]


def dtype_name(dtype: torch.dtype) -> str:
    """"float32" for torch.float32, as clients and logs show it."""
    return str(dtype).removeprefix("torch.")


def resolve_quantization(choice: Quantize | str, device: str) -> str:
    """The concrete scheme, "nf4" | "int8" | "none"; "auto" → nf4 on CUDA, none on CPU. Logs the choice."""
    if choice == "auto":
        scheme = _AUTO_QUANTIZATION[_device_type(device)]
        log.info("quantization: %s (auto on %s)", scheme, device)
        return scheme
    if choice not in QUANTIZATION_SCHEMES:
        raise ModelLoadError(f"--quantize {choice!r} is not one of auto, {', '.join(QUANTIZATION_SCHEMES)}")
    log.info("quantization: %s", choice)
    return choice


def quantization_config(scheme: str, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """The transformers config that loads weights in `scheme`, or None for full precision."""
    return QUANTIZATION_SCHEMES[scheme](compute_dtype)


def keep_nf4_compute_dtype(model: torch.nn.Module, device: str, dtype: torch.dtype) -> int:
    """Keep a CPU nf4 model's matmuls in float32 when float32 is the compute dtype; how many layers were held.

    On a CPU with AVX512-BF16, bitsandbytes repacks an nf4 layer's weights at its first inference call for a fused
    kernel that computes in bfloat16, whatever `bnb_4bit_compute_dtype` says, and from then on every call of that
    layer takes it. The result then depends on the machine (and differs from the float32 path the same model takes
    elsewhere) and on whether the layer first ran in inference. A float32 model is meant to compute in float32, so
    the kernel is turned off for it (logged); a bfloat16 model keeps it where the CPU has it."""
    if _device_type(device) != "cpu" or dtype != torch.float32:
        return 0
    from bitsandbytes.nn import Linear4bit

    held = [m for m in model.modules() if isinstance(m, Linear4bit) and getattr(m, "support_avx512bf16_for_cpu", False)]
    for module in held:
        module.support_avx512bf16_for_cpu = False
    if held:
        log.info("nf4 on cpu: bitsandbytes' bfloat16 kernel off for %d layers (float32 compute)", len(held))
    return len(held)
