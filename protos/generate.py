"""Regenerate the Python stubs of every proto under protos/quiver/ (one command: `python protos/generate.py`).

Stubs are written next to their .proto files and checked in; tests/protos/test_stubs.py fails when they are
stale. The `--out DIR` flag writes elsewhere (the test uses it to compare).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent


def proto_files() -> list[Path]:
    return sorted(ROOT.glob("quiver/**/*.proto"))


def generate(out: Path) -> None:
    """Run protoc (from grpcio-tools) on every proto, writing messages, type stubs and gRPC stubs to `out`."""
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(p.relative_to(ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="root to write quiver/v1/*_pb2*.py under")
    generate(parser.parse_args(argv).out)


if __name__ == "__main__":
    sys.exit(main())
