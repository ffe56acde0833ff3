"""The default model (SmolLM2-135M-Instruct) loaded at most once per test session for each way of loading it.

Loading converts nothing after the first run (the checkpoint is cached), but each load still reads and, for
nf4/int8, quantizes 135M parameters: a session that shares one fp32, one nf4 and one int8 load across modules
saves the rest. Sharing is safe because a server or engine over a loaded model gives its modules back when it
stops (the suite's autouse check closes any server a module leaves running), and tests that wrap the model
(LoRA slots, PEFT) unwrap it before they end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quiver.common.errors import ModelLoadError
from quiver.common.model_source import default_gguf


def default_model_missing() -> str | None:
    """Why the default model cannot be had (the package that ships it is absent, say), or None when it can."""
    try:
        default_gguf()
    except ModelLoadError as e:
        return f"real-model test: {e}"
    return None


class RealModels:
    """`load_base_model` of the default model, memoized by (quantize, device, dtype)."""

    def __init__(self, cache_dir: Path) -> None:
        self._cache_dir = cache_dir
        self._loaded: dict[tuple[str, str, str], Any] = {}

    def get(self, quantize: str = "none", device: str = "cpu", dtype: str = "float32") -> Any:
        """The LoadedModel for these settings, loaded on first use."""
        from quiver.server.config import ModelConfig
        from quiver.server.model.model_loader import load_base_model

        key = (quantize, device, dtype)
        if key not in self._loaded:
            config = ModelConfig(cache_dir=str(self._cache_dir), quantize=quantize,  # type: ignore[arg-type]
                                 device=device, dtype=dtype)  # type: ignore[arg-type]
            self._loaded[key] = load_base_model(config)
        return self._loaded[key]
