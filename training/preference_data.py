"""Preference rows for `quiver train --method dpo`: JSONL objects with a prompt, a chosen and a rejected answer
(keys mappable with --prompt-field/--chosen-field/--rejected-field), the held-out split, and their tokens.

Tokens are made here, as for SFT (quiver.training.data), not by TRL: the prompt is the adapter's template applied
to the row's prompt, tokenized alone and without special tokens, exactly as the server tokenizes a request (TRL
would add the tokenizer's BOS and tokenize prompt and answer as one string); each answer is tokenized alone and
ends with the EOS id. A pair longer than --max-length loses the start of its prompt; a pair whose longer answer
alone leaves no room for one prompt token is dropped.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    every pair of one prompt lands on the same side (no prompt leaks into evaluation). When no hash falls that
    low, the pairs of the lowest-hashed prompt are held out; both sides must end up non-empty."""
    def key(row: PreferenceRow) -> float:
        digest = hashlib.sha256(f"{seed}\0{row.prompt}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    cut = fraction if any(key(row) < fraction for row in rows) else min(key(row) for row in rows) + 1e-12
    held = [row for row in rows if key(row) < cut]
    train = [row for row in rows if key(row) >= cut]
    if not train or not held:
        raise InvalidArgument("data", f"{len(rows)} pairs over {len({r.prompt for r in rows})} prompts cannot be "
                              "split into training and held-out pairs: give --eval-data or --eval-fraction 0")
    return train, held


@dataclass(frozen=True)
class TokenizedPairs:
    features: list[dict[str, list[int]]]
    """prompt_ids, chosen_ids, rejected_ids per kept pair (TRL's tokenized preference format)."""
    dropped: int
    """Pairs whose longer answer alone does not fit in max_length."""
    truncated: int
    """Pairs whose prompt lost its start to fit."""


def tokenize_pairs(tokenizer: Any, template: str, rows: list[PreferenceRow], max_length: int) -> TokenizedPairs:
    """The pairs' tokens as the server sees them (see the module docstring)."""
    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    features: list[dict[str, list[int]]] = []
    dropped = truncated = 0
    for row in rows:
        chosen = [*encode(row.chosen), tokenizer.eos_token_id]
        rejected = [*encode(row.rejected), tokenizer.eos_token_id]
        room = max_length - max(len(chosen), len(rejected))
        if room < 1:
            dropped += 1
            continue
        prompt = encode(template.format(input=row.prompt))
        truncated += len(prompt) > room
        features.append({"prompt_ids": prompt[max(0, len(prompt) - room):], "chosen_ids": chosen,
                         "rejected_ids": rejected})
    return TokenizedPairs(features, dropped, truncated)
