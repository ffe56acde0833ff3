"""What `quiver data synth` keeps of the model's output: questions parsed from its reply, and the filters a
question/answer row must pass — not empty, not a duplicate, not too long, not about the prompt itself ("What does
the summary say?"), and an answer the passage supports.

Support is a simple overlap check, as the issue asks and as data pipelines use before any model-based judge: the
share of the answer's content words (lower-cased, at least 3 letters, not a stop word) that occur in the passage.
A summary that invents facts brings words the passage does not have; the default threshold of 0.6 keeps
paraphrases that reword a few terms (a small model's looser summaries need a lower one: examples/docs_qa uses 0.3).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_LIST_MARK = re.compile(r"^\s*(?:[-*•]|\(?\d+[.):]|q\d*[.:)]|question\s*\d*[.:)])\s*", re.IGNORECASE)
_STOP_WORDS = (
    "the and for are but not you all any can had her was one our out has him his how its may new now own who "
    "did get let say she too use that with have this will your from they been were what when where which their "
    "there them then than some such into also more most very just only about over after before these those "
    "would could should other each does doing being because while both between"
)
STOP_WORDS = frozenset(_STOP_WORDS.split(" "))


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def content_words(text: str) -> list[str]:
    return [w for w in words(text) if len(w) >= 3 and w not in STOP_WORDS]


def support(answer: str, passage: str) -> float:
    """Share of the answer's content words found in the passage (1.0 for an answer without content words)."""
    wanted = content_words(answer)
    if not wanted:
        return 1.0
    present = set(words(passage))
    return sum(w in present for w in wanted) / len(wanted)


def parse_questions(reply: str, limit: int) -> list[str]:
    """The questions in a model reply: one per line, list marks ("1.", "-", "Q2:") removed, only lines with a
    question mark, each cut after its first (an answer written after it is not part of the question), at most
    `limit`, in order."""
    found: list[str] = []
    for line in reply.splitlines():
        text = _LIST_MARK.sub("", line).strip().strip('"').strip()
        if "?" not in text:
            continue
        found.append(text[: text.index("?") + 1].strip())
        if len(found) == limit:
            break
    return found


# A question that names the prompt's parts asks about the prompt, not about the document.
_ABOUT_THE_PROMPT = re.compile(r"\b(?:the|this|that) (?:summary|passage|fact|text|statement)\b", re.IGNORECASE)


def normalized(text: str) -> str:
    """Case, punctuation and spacing removed: two questions equal here are duplicates."""
    return " ".join(words(text))


@dataclass
class QAFilter:
    """The filters, with counts of what each dropped (reported at the end and kept in the progress file)."""

    min_support: float = 0.6
    """Least share of the answer's content words that must occur in the passage."""
    max_question_words: int = 40
    max_answer_words: int = 120
    seen: set[str] = field(default_factory=set)
    """Normalized questions kept so far (a resumed run is seeded with those already written)."""
    dropped: Counter[str] = field(default_factory=Counter)

    def remember(self, questions: Iterable[str]) -> None:
        self.seen.update(normalized(q) for q in questions)

    def answer_problem(self, answer: str, passage: str) -> str | None:
        """Why a summary cannot be an answer (None when it can); then no question of its passage is kept."""
        if not words(answer):
            return "empty_answer"
        if len(words(answer)) > self.max_answer_words:
            return "answer_too_long"
        if support(answer, passage) < self.min_support:
            return "answer_unsupported"
        return None

    def question_problem(self, question: str, answer: str) -> str | None:
        """Why `question` cannot ask for `answer` (None when it can)."""
        key = normalized(question)
        if len(key.split()) < 3:
            return "empty_question"
        if len(key.split()) > self.max_question_words:
            return "question_too_long"
        if _ABOUT_THE_PROMPT.search(question):
            return "question_about_the_prompt"
        if f" {normalized(answer)} " in f" {key} ":
            return "answer_in_question"  # it teaches copying, and scores as answered without recall
        if key in self.seen:
            return "duplicate_question"
        return None

    def keep(self, answer: str, passage: str, questions: list[str]) -> list[str]:
        """The questions kept for (answer, passage); every drop is counted by its reason."""
        problem = self.answer_problem(answer, passage)
        if problem is not None:
            self.dropped[problem] += max(1, len(questions))
            return []
        kept: list[str] = []
        for question in questions:
            problem = self.question_problem(question, answer)
            if problem is not None:
                self.dropped[problem] += 1
                continue
            self.seen.add(normalized(question))
            kept.append(question)
        return kept
