"""The layers (design rule 4), read from every module's imports: `server/` is the top; `adapters/` and
`training/` never import it; the client library imports neither `server/` nor torch; `common/` imports no other
Quiver package; inside `server/`, the engine, platform and model loading never import the API layer or the
fronts. The CLI (`clients/cli/`) is where the layers are wired together."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What sits above the engine inside server/: the API layer both fronts call, the fronts, and the wiring.
_FRONTS = ("quiver.server.api", "quiver.server.grpc_front", "quiver.server.http", "quiver.server.ray_serve",
           "quiver.server.app", "quiver.server.local")
# Folder -> the Quiver packages its modules may not import (at any depth, lazily or not).
FORBIDDEN = {
    "common": ("quiver.server", "quiver.adapters", "quiver.training", "quiver.clients"),
    "adapters": ("quiver.server", "quiver.training", "quiver.clients"),
    "training": ("quiver.server",),
    "clients": ("quiver.server", "quiver.adapters", "quiver.training", "torch"),
    # Inside server/: the engine, the platform and model loading sit below the API layer and the fronts.
    "server/engine": _FRONTS,
    "server/platform": (*_FRONTS, "quiver.server.engine", "quiver.server.model"),
    "server/model": (*_FRONTS, "quiver.server.engine"),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node.lineno, node.module))
    return out


def _modules(folder: str) -> list[Path]:
    paths = sorted((ROOT / folder).rglob("*.py"))
    if folder == "clients":  # the CLI wires the layers together
        paths = [p for p in paths if "cli" not in p.relative_to(ROOT / folder).parts]
    return paths


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_no_module_imports_a_layer_above_it(folder: str):
    paths = _modules(folder)
    assert paths, folder
    crossings = [f"{p.relative_to(ROOT)}:{line} imports {name}" for p in paths for line, name in _imports(p)
                 if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[folder])]
    assert not crossings, "\n".join(crossings)


def test_importing_the_client_library_loads_no_torch():
    code = "import sys, quiver.clients, quiver.clients.aio; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
