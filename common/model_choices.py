"""How a base model may be loaded: the choices `quiver serve` and `quiver train` offer (no heavy imports, so
configs and the CLI can name them cheaply)."""

from __future__ import annotations

from typing import Literal

Quantize = Literal["auto", "nf4", "int8", "none"]
DeviceChoice = Literal["auto", "cuda", "cpu"]
DtypeChoice = Literal["auto", "float32", "bfloat16", "float16"]
