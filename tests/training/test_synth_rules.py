"""The prompt templates and the filters of `quiver data synth`, and the judges of `quiver data pairs`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from quiver.common.errors import InvalidArgument
from quiver.training.judges import judge_from_name
from quiver.training.pairs import PairsConfig, pair_for
from quiver.training.synth_filters import QAFilter, normalized, parse_questions, support
from quiver.training.synth_templates import QUESTION_TEMPLATE, SUMMARY_TEMPLATE, SynthTemplates, check_template

PASSAGE = "The Eiffel Tower was finished in 1889 for the World's Fair in Paris. Gustave Eiffel's company built it."


def test_default_templates_render_every_placeholder():
    templates = SynthTemplates()
    summary = templates.summary_prompt(PASSAGE)
    assert PASSAGE in summary and "{" not in summary
    question = templates.question_prompt(PASSAGE, "Built in 1889.", 4)
    assert "Fact: Built in 1889." in question and "Write 4 different questions" in question


def test_templates_from_files_replace_the_defaults(tmp_path: Path):
    (tmp_path / "q.txt").write_text("Ask {count} questions answered by: {summary} (literal {{braces}})")
    templates = SynthTemplates.from_files(None, str(tmp_path / "q.txt"))
    assert templates.summary == SUMMARY_TEMPLATE
    assert templates.question_prompt("p", "S.", 2) == "Ask 2 questions answered by: S. (literal {braces})"
    assert SynthTemplates.from_files(None, None).question == QUESTION_TEMPLATE


@pytest.mark.parametrize(("kind", "template", "message"), [
    ("summary", "Summarize this.", r"missing \{passage\}"),
    ("question", "Questions about {passage}", r"missing \{summary\}"),
    ("summary", "{passage} {answer}", r"unknown \{answer\}"),
    ("question", "{summary} {}", "must be named"),
    ("summary", "{passage", "not a valid template"),
])
def test_bad_templates_fail_with_the_reason(kind: str, template: str, message: str):
    with pytest.raises(InvalidArgument, match=message):
        check_template(kind, template)


def test_parse_questions_strips_list_marks_and_keeps_only_questions():
    reply = ("Here are some questions:\n1. When was the tower finished?\n- Who built it? It was Eiffel.\n"
             "Q3: Where is it?\n\"Why was it built?\"\nA statement.\n5) What fair was it for?")
    assert parse_questions(reply, 10) == ["When was the tower finished?", "Who built it?", "Where is it?",
                                          "Why was it built?", "What fair was it for?"]
    assert parse_questions(reply, 2) == ["When was the tower finished?", "Who built it?"]


def test_support_is_the_share_of_content_words_in_the_passage():
    assert support("Gustave Eiffel's company built the tower in 1889.", PASSAGE) == 1.0
    assert support("The tower was painted blue by Napoleon.", PASSAGE) == pytest.approx(1 / 4)
    assert support("It was.", PASSAGE) == 1.0  # no content word: nothing to contradict


def test_filter_drops_each_kind_of_bad_row_and_counts_why():
    rows = QAFilter(min_support=0.6, max_question_words=8, max_answer_words=20)
    answer = "Eiffel's company finished the tower in 1889 for the World's Fair."
    kept = rows.keep(answer, PASSAGE, ["When was the tower finished?", "when was the TOWER finished",
                                       "Why?", "What " + "very " * 10 + "long question is this?",
                                       "Who built the tower?"])
    assert kept == ["When was the tower finished?", "Who built the tower?"]
    assert rows.dropped == {"duplicate_question": 1, "empty_question": 1, "question_too_long": 1}
    assert rows.keep("Napoleon painted it blue in 1920.", PASSAGE, ["What color is it?", "Who painted it?"]) == []
    assert rows.keep("", PASSAGE, []) == []
    assert rows.keep("word " * 30, PASSAGE, ["Is this too long an answer?"]) == []
    assert rows.dropped["answer_unsupported"] == 2
    assert rows.dropped["empty_answer"] == 1 and rows.dropped["answer_too_long"] == 1


def test_a_question_that_contains_its_answer_is_dropped():
    rows = QAFilter()
    answer = "Gustave Eiffel's company"
    assert rows.keep(answer, PASSAGE, ["Did gustave eiffel's company build it?", "Who built the tower?",
                                       "Which firm of Gustave Eiffel built it?"]) == [
        "Who built the tower?", "Which firm of Gustave Eiffel built it?"]
    assert rows.dropped == {"answer_in_question": 1}


def test_a_resumed_filter_knows_the_questions_already_written():
    rows = QAFilter()
    rows.remember(["When was the tower finished?"])
    assert rows.keep("The tower was finished in 1889.", PASSAGE, ["When was the Tower finished ?"]) == []
    assert normalized("When was the Tower finished ?") == "when was the tower finished"


def test_built_in_judges():
    assert judge_from_name("length:shorter")("p", "one two", {}) > judge_from_name("length:shorter")("p", "a b c", {})
    assert judge_from_name("keyword:please")("p", "Please, please", {}) == 2
    overlap = judge_from_name("overlap:summary")
    assert overlap("p", "the tower in Paris", {"summary": "A tower in Paris."}) == 1.0
    with pytest.raises(ValueError, match="no string field 'summary'"):
        overlap("p", "x", {})


def mentions_the_year(prompt: str, completion: str, row: Mapping[str, Any]) -> float:
    """A user's rule, imported by path as `quiver data pairs --judge` does."""
    return float(str(row["year"]) in completion)


def test_a_judge_given_as_a_python_callable_path():
    judge = judge_from_name(f"{__name__}:mentions_the_year")
    assert judge("When?", "In 1889.", {"year": 1889}) == 1.0
    assert judge("When?", "Long ago.", {"year": 1889}) == 0.0


@pytest.mark.parametrize(("name", "message"), [
    ("length", "KIND:ARGUMENT"), ("length:medium", "length:shorter or length:longer"),
    ("keyword:", "name the word"), ("no_such_module_x:f", "cannot import"), ("os:no_such_function", "no callable"),
])
def test_bad_judges_are_refused(name: str, message: str):
    with pytest.raises(ValueError, match=message):
        judge_from_name(name)


def test_pairs_pick_the_best_and_worst_sample_and_skip_ties(tmp_path: Path):
    config = PairsConfig(prompts="p.jsonl", out="o.jsonl", samples=3, judge="length:shorter")
    judge = judge_from_name(config.judge)
    row = {"prompt": "Say hi"}
    assert pair_for(row, ["hi there you", "hi", "hi there"], config, judge) == {
        "prompt": "Say hi", "chosen": "hi", "rejected": "hi there you", "chosen_score": -1.0, "rejected_score": -3.0}
    assert pair_for(row, ["a b", "c d", "e f"], config, judge) is None  # a tie teaches no preference
    with_reference = PairsConfig(prompts="p.jsonl", out="o.jsonl", samples=1, reference_field="ref")
    assert pair_for({"prompt": "Q", "ref": "R"}, ["S"], with_reference, judge) == {
        "prompt": "Q", "chosen": "R", "rejected": "S"}
    assert pair_for({"prompt": "Q", "ref": "R"}, ["R"], with_reference, judge) is None


@pytest.mark.parametrize(("fields", "message"), [
    ({}, "--prompts and --out"),
    ({"prompts": "p", "out": "o", "samples": 1}, "--samples must be >= 2"),
    ({"prompts": "p", "out": "o", "adapter": "a", "instruction": "Do."}, "--instruction is for the base"),
    ({"prompts": "p", "out": "o", "server": "h:1", "store": "s"}, "--server cannot be combined"),
    ({"prompts": "p", "out": "o", "temperature": 0.0}, "pairs need > 0"),
])
def test_pairs_config_errors(fields: dict[str, object], message: str):
    with pytest.raises(ValueError, match=message):
        PairsConfig(**fields)  # type: ignore[arg-type]
