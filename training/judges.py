"""Judges of `quiver data pairs`: a judge scores one completion of a prompt, higher is better; of two samples the
higher-scored is `chosen`, and a tie makes no pair.

A judge is named on the command line as a built-in (`length:shorter`, `length:longer`, `keyword:WORD`,
`overlap:FIELD`) or as a Python callable `package.module:function` taking (prompt, completion, row) and
returning a number — the rule of a real preference set (a unit test that passes, a grader, a reward model).
Built-ins are a registry keyed by the part before the colon, not a string switch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from quiver.training.synth_filters import content_words

Judge = Callable[[str, str, Mapping[str, Any]], float]
"""(prompt, completion, the prompt's JSONL row) -> score; higher is preferred."""


def _length(argument: str) -> Judge:
    if argument not in ("shorter", "longer"):
        raise ValueError(f"length judge: say length:shorter or length:longer, not length:{argument}")
    sign = -1.0 if argument == "shorter" else 1.0
    return lambda prompt, completion, row: sign * len(completion.split())


def _keyword(argument: str) -> Judge:
    if not argument:
        raise ValueError("keyword judge: name the word, e.g. keyword:please")
    word = argument.lower()
    return lambda prompt, completion, row: float(completion.lower().count(word))


def _overlap(argument: str) -> Judge:
    """Share of the reference's (row[argument]) content words that the completion has: a ROUGE-1-recall-like
    grader for rows that carry a reference."""
    if not argument:
        raise ValueError("overlap judge: name the row's reference field, e.g. overlap:summary")

    def judge(prompt: str, completion: str, row: Mapping[str, Any]) -> float:
        reference = row.get(argument)
        if not isinstance(reference, str):
            raise ValueError(f"overlap judge: the row has no string field {argument!r}")
        wanted = set(content_words(reference))
        return len(wanted & set(content_words(completion))) / len(wanted) if wanted else 0.0

    return judge


BUILT_IN: dict[str, Callable[[str], Judge]] = {"length": _length, "keyword": _keyword, "overlap": _overlap}


def judge_from_name(name: str) -> Judge:
    """The judge `name` names: a built-in (KIND:ARGUMENT) or an importable `module:function`."""
    kind, sep, argument = name.partition(":")
    if not sep:
        raise ValueError(f"--judge {name!r}: expected KIND:ARGUMENT ({', '.join(BUILT_IN)}) or module:function")
    if kind in BUILT_IN:
        return BUILT_IN[kind](argument)
    try:
        module = importlib.import_module(kind)
    except ImportError as e:
        raise ValueError(f"--judge {name!r}: cannot import {kind!r} ({e})") from e
    function = getattr(module, argument, None)
    if not callable(function):
        raise ValueError(f"--judge {name!r}: {kind} has no callable {argument!r}")
    judge: Judge = function
    return judge
