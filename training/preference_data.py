"""Preference rows for `quiver train --method dpo`: JSONL objects with a prompt, a chosen and a rejected answer
(keys mappable with --prompt-field/--chosen-field/--rejected-field), and the held-out split.

The prompt is formatted with the adapter's prompt template exactly as the server formats a request, so the
policy is trained on the prompts it is served with; the answers are plain text (the trainer adds the EOS token).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from quiver.common.errors import InvalidArgument
from quiver.training.jsonl import jsonl_lines


@dataclass(frozen=True)
class PreferenceRow:
    prompt: str
    chosen: str
    rejected: str


def read_preferences(path: Path, prompt_field: str, chosen_field: str, rejected_field: str
                     ) -> tuple[list[PreferenceRow], list[str]]:
    """The usable rows of a JSONL file and "path:line: why" for each unusable one (a missing or empty field, or
    chosen equal to rejected: such a pair teaches nothing)."""
    rows: list[PreferenceRow] = []
    problems: list[str] = []
    for number, row, problem in jsonl_lines(path):
        if problem is not None:
            problems.append(problem)
            continue
        keys = (prompt_field, chosen_field, rejected_field)
        values = [row.get(key) if isinstance(row, dict) else None for key in keys]
        if any(not isinstance(v, str) or not v.strip() for v in values):
            problems.append(f"{path}:{number}: needs non-empty strings {prompt_field!r}, {chosen_field!r}, "
                            f"{rejected_field!r}")
            continue
        prompt, chosen, rejected = (str(v) for v in values)
        if chosen.strip() == rejected.strip():
            problems.append(f"{path}:{number}: chosen equals rejected")
            continue
        rows.append(PreferenceRow(prompt, chosen, rejected))
    if not rows:
        shown = "; ".join(problems[:5]) or "the file is empty"
        raise InvalidArgument("data", f"{path}: no usable preference row ({shown})")
    return rows, problems


def split_preferences(rows: list[PreferenceRow], fraction: float, seed: int
                      ) -> tuple[list[PreferenceRow], list[PreferenceRow]]:
    """(train, held out): the rows whose seeded hash of the prompt falls in the lowest `fraction` are held out, so
    every pair of one prompt lands on the same side (no prompt leaks into evaluation)."""
    def key(row: PreferenceRow) -> float:
        digest = hashlib.sha256(f"{seed}\0{row.prompt}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    held = [row for row in rows if key(row) < fraction]
    train = [row for row in rows if key(row) >= fraction]
    if fraction > 0 and not held and len(rows) > 1:
        held, train = train[:1], train[1:]  # a tiny file still gets one evaluation row
    return train, held


def as_records(rows: list[PreferenceRow], template: str) -> list[dict[str, str]]:
    """TRL's standard preference format: the templated prompt, and the two answers."""
    return [{"prompt": template.format(input=row.prompt), "chosen": row.chosen, "rejected": row.rejected}
            for row in rows]
