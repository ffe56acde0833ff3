"""The training tests' base: a tiny random Llama with a wide initialisation, written once per session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ..served import load_served_base
from ..tiny import write_tiny_checkpoint


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wide initialisation gives peaked logits, so no greedy choice hangs on a rounding difference."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("trained-base") / "tiny", initializer_range=0.2)


@pytest.fixture(scope="session")
def loaded(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """This package's `base_dir` loaded for serving (fp32, CPU) once per session; servers borrow it in turn."""
    return load_served_base(base_dir, tmp_path_factory.mktemp("trained-cache"))
