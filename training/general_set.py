"""A small general-ability set written for Quiver: does an adapter make the model worse outside its task?

Twenty short prompts (arithmetic, capitals, yes/no facts, simple instructions), each with the answers it
accepts. They are deliberately easy for an instruction-tuned base model, so a drop after adaptation points to
forgetting (the adapter overriding general behaviour) rather than to the questions. The texts were written for
this project, not taken from a benchmark.

Scoring is one documented rule per item, applied to the normalised prediction (`normalise`: lower case, every
character other than a letter, digit or '.' in a number replaced by a space, whitespace collapsed):

- `contains`: some accepted answer occurs in the prediction as a whole-word sequence ("paris" matches
  "the capital is paris." but "4" does not match "40").
- `starts`: the prediction begins with some accepted answer as whole words (for yes/no questions, where
  "yes or no" or a later hedge must not count).

The score of a model on the set is the share of items it passes, in [0, 1].
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

__all__ = ["GENERAL_SET", "GeneralItem", "Rule", "accuracy", "normalise", "passes"]

Rule = Literal["contains", "starts"]


@dataclass(frozen=True)
class GeneralItem:
    """One general-ability prompt and what counts as a right answer."""

    prompt: str
    """The question or instruction, sent as the input (an adapter's template wraps it like any input)."""
    answers: tuple[str, ...]
    """Accepted answers; an item passes when its rule matches any of them."""
    rule: Rule = "contains"
    """How the normalised prediction is checked against the normalised answers (module docstring)."""


GENERAL_SET: tuple[GeneralItem, ...] = (
    GeneralItem("What is 7 plus 5? Answer with a number.", ("12", "twelve")),
    GeneralItem("What is 9 times 3? Answer with a number.", ("27", "twenty seven")),
    GeneralItem("What is 100 minus 37? Answer with a number.", ("63", "sixty three")),
    GeneralItem("Half of 18 is what number?", ("9", "nine")),
    GeneralItem("What is the capital city of France?", ("paris",)),
    GeneralItem("What is the capital city of Japan?", ("tokyo",)),
    GeneralItem("Name the capital of Italy.", ("rome",)),
    GeneralItem("Which city is the capital of Egypt?", ("cairo",)),
    GeneralItem("Is water made of hydrogen and oxygen? Answer yes or no.", ("yes",), "starts"),
    GeneralItem("Is the Sun a planet? Answer yes or no.", ("no",), "starts"),
    GeneralItem("Do spiders have eight legs? Answer yes or no.", ("yes",), "starts"),
    GeneralItem("Is ice colder than boiling water? Answer yes or no.", ("yes",), "starts"),
    GeneralItem("Can a fish ride a bicycle? Answer yes or no.", ("no",), "starts"),
    GeneralItem("How many days are there in a week?", ("7", "seven")),
    GeneralItem("What colour do you get by mixing blue and yellow paint?", ("green",)),
    GeneralItem("Write the number twenty-one using digits.", ("21",)),
    GeneralItem("What is the opposite of the word 'hot'?", ("cold",)),
    GeneralItem("Complete the sequence: 2, 4, 6, 8, ...", ("10", "ten")),
    GeneralItem("Which animal says 'moo'?", ("cow", "cows", "cattle")),
    GeneralItem("Translate 'thank you' into Spanish.", ("gracias",)),
)

_NOT_WORD = re.compile(r"(?<!\d)\.|\.(?!\d)|[^\w.]|_")  # anything but letters, digits and a decimal point


def normalise(text: str) -> str:
    """Lower case; punctuation (but a '.' between digits) and underscores become spaces; whitespace collapsed."""
    return " ".join(_NOT_WORD.sub(" ", text.lower()).split())


def _contains(prediction: str, answer: str) -> bool:
    return f" {answer} " in f" {prediction} "


def _starts(prediction: str, answer: str) -> bool:
    return f"{prediction} ".startswith(f"{answer} ")


_RULES: dict[str, Callable[[str, str], bool]] = {"contains": _contains, "starts": _starts}


def passes(item: GeneralItem, prediction: str) -> bool:
    """Whether `prediction` answers `item` by its rule (both sides normalised)."""
    text = normalise(prediction)
    check = _RULES[item.rule]
    return any(check(text, normalise(answer)) for answer in item.answers if normalise(answer))


def accuracy(items: tuple[GeneralItem, ...] | list[GeneralItem], predictions: list[str]) -> float:
    """The share of items whose prediction passes, in [0, 1]; 0 for an empty set."""
    if len(items) != len(predictions):
        raise ValueError(f"{len(items)} items but {len(predictions)} predictions")
    return sum(passes(i, p) for i, p in zip(items, predictions, strict=True)) / len(items) if items else 0.0
