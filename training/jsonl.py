"""JSONL files as the data commands read them: one JSON value a line, blank lines skipped, each value with its
1-based line number, and a line that is not JSON reported with that number instead of stopping the file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def jsonl_lines(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, the decoded value or None, None or "path:line: not JSON (why)") for each non-blank line."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line), None
        except json.JSONDecodeError as e:
            yield number, None, f"{path}:{number}: not JSON ({e.msg})"
