"""The prompts `quiver data synth` sends: one to summarize a passage, one to ask questions whose answer is that
summary. Both are `str.format` templates the user can replace (--summary-template FILE, --question-template FILE);
a template is checked when it is read, so a typo fails before any request is sent.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

from quiver.common.errors import InvalidArgument

SUMMARY_TEMPLATE = (
    "Summarize the following passage in one or two sentences. Keep its key facts and names.\n\n"
    "Passage:\n{passage}\n\nSummary:"
)
# The passage is left out of the default question prompt: small models shown it (and the word "summary") ask
# about the prompt ("What is the purpose of the summary?") rather than about its content.
QUESTION_TEMPLATE = (
    "Fact: {summary}\n\nWrite {count} different questions that this fact answers. Each question names what it "
    "asks about. One question per line, each ending with a question mark."
)

# Template -> (placeholders it must contain, placeholders it may contain).
_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "summary": (frozenset({"passage"}), frozenset({"passage"})),
    "question": (frozenset({"summary"}), frozenset({"passage", "summary", "count"})),
}


def check_template(kind: str, template: str) -> str:
    """`template` when it names the placeholders of its kind (and no others); otherwise InvalidArgument saying
    which are missing or unknown. Literal braces are written {{ and }}."""
    required, allowed = _FIELDS[kind]
    try:
        named = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        problem = f"not a valid template ({e}); write literal braces as {{{{ }}}}"
        raise InvalidArgument(f"{kind}_template", problem) from e
    if "" in named or any(not n.isidentifier() for n in named):
        raise InvalidArgument(f"{kind}_template", "placeholders must be named, e.g. {passage}")
    problems = [f"missing {{{n}}}" for n in sorted(required - named)]
    problems += [f"unknown {{{n}}} (allowed: {', '.join(sorted(allowed))})" for n in sorted(named - allowed)]
    if problems:
        raise InvalidArgument(f"{kind}_template", "; ".join(problems))
    return template


@dataclass(frozen=True)
class SynthTemplates:
    """The two prompts, checked."""

    summary: str = SUMMARY_TEMPLATE
    question: str = QUESTION_TEMPLATE

    def __post_init__(self) -> None:
        check_template("summary", self.summary)
        check_template("question", self.question)

    @classmethod
    def from_files(cls, summary_file: str | None, question_file: str | None) -> SynthTemplates:
        """The defaults, each replaced by the file's text when a file is given."""
        return cls(
            Path(summary_file).read_text(encoding="utf-8") if summary_file else SUMMARY_TEMPLATE,
            Path(question_file).read_text(encoding="utf-8") if question_file else QUESTION_TEMPLATE,
        )

    def summary_prompt(self, passage: str) -> str:
        return self.summary.format(passage=passage)

    def question_prompt(self, passage: str, summary: str, count: int) -> str:
        return self.question.format(passage=passage, summary=summary, count=count)
