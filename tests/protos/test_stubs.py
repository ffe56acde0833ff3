"""The checked-in gRPC stubs are exactly what `python protos/generate.py` produces from the protos."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_checked_in_stubs_are_fresh(tmp_path: Path):
    subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--out", str(tmp_path)], check=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*"))
    assert generated, "protoc produced nothing"
    for rel in generated:
        checked_in = ROOT / "protos" / rel
        assert checked_in.exists(), f"{rel} is not checked in"
        assert checked_in.read_text() == (tmp_path / rel).read_text(), f"{rel} is stale: run protos/generate.py"
