"""No product module may load code disguised as data: a scan of every packaged module's syntax tree (`ast`, so
comments, strings and `model.eval()` never match) for the calls that turn bytes into running code.

Flagged: torch.load; any import of a pickle-family module (pickle, cPickle, _pickle, cloudpickle, dill, joblib,
marshal, shelve), also through importlib; the eval/exec/compile builtins; trust_remote_code set to anything but
the constant False (as a keyword, a dict entry or an item assignment); numpy-style allow_pickle likewise;
yaml.load/load_all without a SafeLoader and yaml.unsafe_load/full_load; subprocess calls with shell set to anything
but False, and the calls that always use a shell (os.system, os.popen, subprocess.getoutput/getstatusoutput,
asyncio's create_subprocess_shell). Import aliases are followed (`import torch as t; t.load`, `from os import
system`). Not caught: names built at run time (getattr(torch, "lo" + "ad")); review catches those.

The scanned directories are the ones pyproject's [tool.setuptools] package-dir installs: what users run. The
self-tests feed the scanner small sources, one per pattern, so the scan itself is known to catch each.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PICKLE_MODULES = frozenset({"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "marshal", "shelve"})
CODE_BUILTINS = frozenset({"eval", "exec", "compile"})
ALWAYS_SHELL = frozenset({"os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput",
                          "asyncio.create_subprocess_shell"})  # fmt: skip
SUBPROCESS_CALLS = frozenset({"subprocess.run", "subprocess.call", "subprocess.check_call", "subprocess.check_output",
                              "subprocess.Popen"})  # fmt: skip
YAML_UNSAFE = frozenset({"yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all"})
YAML_NEEDS_LOADER = frozenset({"yaml.load", "yaml.load_all"})
SAFE_YAML_LOADERS = frozenset({"yaml.SafeLoader", "yaml.CSafeLoader", "yaml.BaseLoader", "yaml.CBaseLoader"})
MUST_BE_FALSE = ("trust_remote_code", "allow_pickle")

ALLOWED: dict[str, str] = {}
"""`path:line` -> why that finding is acceptable. Empty: product code has no legitimate use of these today."""


def _is_false(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value is False


class UnsafeCodeScanner(ast.NodeVisitor):
    """Collects `(line, what)` for every unsafe pattern in one module."""

    def __init__(self) -> None:
        self.aliases: dict[str, str] = {}  # local name -> dotted name it was imported as
        self.findings: list[tuple[int, str]] = []

    def flag(self, node: ast.AST, what: str) -> None:
        self.findings.append((getattr(node, "lineno", 0), what))

    def qualname(self, node: ast.expr) -> str | None:
        """`a.b.c` for a Name/Attribute chain, with its first name resolved through the module's imports."""
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute) and (base := self.qualname(node.value)) is not None:
            return f"{base}.{node.attr}"
        return None

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] in PICKLE_MODULES:
                self.flag(node, f"imports {alias.name}")
            local = alias.asname or alias.name.split(".")[0]
            self.aliases[local] = alias.name if alias.asname else local

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if module.split(".")[0] in PICKLE_MODULES:
            self.flag(node, f"imports from {module}")
        for alias in node.names:
            self.aliases[alias.asname or alias.name] = f"{module}.{alias.name}"
            self._check_name(node, f"{module}.{alias.name}")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        name = self.qualname(node)
        if name is not None:
            self._check_name(node, name)
        self.generic_visit(node)

    def _check_name(self, node: ast.AST, name: str) -> None:
        """Names unsafe wherever they appear, called or passed around."""
        head, _, tail = name.partition(".")
        if (name in ALWAYS_SHELL | YAML_UNSAFE | {"torch.load"} or head in PICKLE_MODULES
                or (head == "builtins" and tail in CODE_BUILTINS)):  # fmt: skip
            self.flag(node, f"uses {name}")

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id in CODE_BUILTINS and func.id not in self.aliases:
            self.flag(node, f"calls the {func.id}() builtin")
        name = self.qualname(func)
        if name in ("__import__", "importlib.import_module") and node.args:
            module = node.args[0]
            if isinstance(module, ast.Constant) and str(module.value).split(".")[0] in PICKLE_MODULES:
                self.flag(node, f"imports {module.value!r} dynamically")
        for keyword in node.keywords:
            if keyword.arg in MUST_BE_FALSE and not _is_false(keyword.value):
                self.flag(node, f"passes {keyword.arg}={ast.unparse(keyword.value)}")
            if keyword.arg == "shell" and name in SUBPROCESS_CALLS and not _is_false(keyword.value):
                self.flag(node, f"calls {name} with shell={ast.unparse(keyword.value)}")
        if name in YAML_NEEDS_LOADER and not self._safe_yaml_loader(node):
            self.flag(node, f"calls {name} without a SafeLoader")
        self.generic_visit(node)

    def _safe_yaml_loader(self, node: ast.Call) -> bool:
        loaders = [k.value for k in node.keywords if k.arg == "Loader"] + node.args[1:2]
        return any(self.qualname(loader) in SAFE_YAML_LOADERS for loader in loaders)

    def visit_Assign(self, node: ast.Assign) -> None:
        for target in node.targets:
            key = target.slice if isinstance(target, ast.Subscript) else None
            if isinstance(key, ast.Constant) and key.value in MUST_BE_FALSE and not _is_false(node.value):
                self.flag(node, f"sets [{key.value!r}] = {ast.unparse(node.value)}")
        self.generic_visit(node)

    def visit_Dict(self, node: ast.Dict) -> None:
        for key, value in zip(node.keys, node.values, strict=True):
            if isinstance(key, ast.Constant) and key.value in MUST_BE_FALSE and not _is_false(value):
                self.flag(node, f"sets {key.value!r}: {ast.unparse(value)}")
        self.generic_visit(node)


def scan_source(source: str, label: str = "<source>") -> list[str]:
    """`label:line: what` for every unsafe pattern in `source`."""
    scanner = UnsafeCodeScanner()
    scanner.visit(ast.parse(source, filename=label))
    return [f"{label}:{line}: {what}" for line, what in sorted(scanner.findings)]


def product_dirs() -> list[Path]:
    """The directories pyproject installs as packages (tests, bench and .venv are not among them)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return sorted({ROOT / path for path in config["tool"]["setuptools"]["package-dir"].values()})


def product_files() -> Iterator[Path]:
    seen: set[Path] = set()
    for directory in product_dirs():
        for path in sorted(directory.rglob("*.py")):
            if path not in seen and "__pycache__" not in path.parts:
                seen.add(path)
                yield path


def test_product_code_has_no_unsafe_calls() -> None:
    files = list(product_files())
    assert len(files) > 50, f"found only {len(files)} product modules: is package-dir still read right?"
    findings = []
    for path in files:
        label = str(path.relative_to(ROOT))
        findings += scan_source(path.read_text(encoding="utf-8"), label)
    unexplained = [f for f in findings if f.split(": ", 1)[0] not in ALLOWED]
    assert unexplained == [], "unsafe code in product modules:\n" + "\n".join(unexplained)


def test_scanned_dirs_are_the_packages() -> None:
    names = {str(path.relative_to(ROOT)).split("/")[0] for path in product_dirs()}
    assert {"common", "server", "adapters", "training", "clients"} <= names
    assert not names & {"tests", "bench", ".venv"}


UNSAFE_SOURCES = {
    "torch.load": "import torch\ntorch.load('x.pt')",
    "torch.load-aliased": "import torch as t\nt.load('x.pt', weights_only=True)",
    "torch.load-from-import": "from torch import load\nload('x.pt')",
    "torch.load-referenced": "import torch\nloader = torch.load",
    "import-pickle": "import pickle",
    "import-cPickle": "import cPickle",
    "from-pickle": "from pickle import loads",
    "import-dill": "import dill as d",
    "import-joblib": "import joblib",
    "import-marshal": "import marshal",
    "import_module-pickle": "import importlib\nimportlib.import_module('pickle')",
    "eval": "eval('1 + 1')",
    "exec": "exec(code)",
    "compile": "compile(text, '<x>', 'exec')",
    "builtins.eval": "import builtins\nbuiltins.eval('1')",
    "trust_remote_code-True": "from_pretrained(path, trust_remote_code=True)",
    "trust_remote_code-variable": "AutoModel.from_pretrained(path, trust_remote_code=flag)",
    "trust_remote_code-dict": "kwargs = {'trust_remote_code': True}",
    "trust_remote_code-item": "kwargs['trust_remote_code'] = True",
    "allow_pickle": "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
    "yaml.load": "import yaml\nyaml.load(text)",
    "yaml.load-FullLoader": "import yaml\nyaml.load(text, Loader=yaml.FullLoader)",
    "yaml.unsafe_load": "import yaml\nyaml.unsafe_load(text)",
    "subprocess-shell": "import subprocess\nsubprocess.run(cmd, shell=True)",
    "subprocess-shell-variable": "from subprocess import Popen\nPopen(cmd, shell=use_shell)",
    "os.system": "import os\nos.system('ls')",
    "os.system-from-import": "from os import system\nsystem('ls')",
    "os.popen": "import os\nos.popen('ls')",
}

SAFE_SOURCES = {
    "model.eval": "model.eval()",
    "re.compile": "import re\nre.compile('a+')",
    "from-re-compile": "from re import compile\ncompile('a+')",
    "safetensors": "from safetensors.torch import load_file\nload_file('x.safetensors')",
    "trust_remote_code-False": "from_pretrained(path, trust_remote_code=False)",
    "yaml.safe_load": "import yaml\nyaml.safe_load(text)",
    "yaml.load-SafeLoader": "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)",
    "subprocess-list": "import subprocess\nsubprocess.run(['ls', '-l'], check=True)",
    "subprocess-shell-False": "import subprocess\nsubprocess.run(['ls'], shell=False)",
    "strings-and-comments": "# torch.load(x)\ntext = 'import pickle; eval(x); os.system(y)'",
    "local-load": "def load(path): ...\nload('x')",
}


@pytest.mark.parametrize("source", UNSAFE_SOURCES.values(), ids=UNSAFE_SOURCES.keys())
def test_scanner_catches(source: str) -> None:
    findings = scan_source(source, "snippet.py")
    assert findings, "the scanner missed it"
    assert all(f.startswith("snippet.py:") for f in findings)


@pytest.mark.parametrize("source", SAFE_SOURCES.values(), ids=SAFE_SOURCES.keys())
def test_scanner_passes_safe_code(source: str) -> None:
    assert scan_source(source, "snippet.py") == []


def test_findings_name_file_and_line() -> None:
    assert scan_source("x = 1\nimport os\nos.system('ls')\n", "pkg/mod.py") == ["pkg/mod.py:3: uses os.system"]
