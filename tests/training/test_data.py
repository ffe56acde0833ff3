"""JSONL training data: formats, bad rows, weights and mixtures, held-out splits, templates, tokenization."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from quiver.adapters.metadata import validate_prompt_template
from quiver.common.errors import FailedPrecondition, InvalidArgument
from quiver.server.api.request_builder import CHAT_ROLES as SERVER_CHAT_ROLES
from quiver.training.data import (
    IGNORE_INDEX,
    DataSource,
    Example,
    ExampleTooLong,
    FieldMapping,
    Message,
    detected_format,
    mix,
    mix_count,
    parse_source,
    prompt_template_for,
    read_examples,
    split_holdout,
    tokenize_example,
    tokenize_examples,
)
from quiver.training.formats import CHAT_ROLES, FORMAT_NAMES

from ..conftest import write_tiny_tokenizer

DIALOG = FieldMapping(input_field="dialogue", output_field="summary", instruction="Summarize the conversation.")


def write_jsonl(path: Path, rows: list[Any]) -> DataSource:
    """Each row as a JSON line; a str row is written verbatim (for bad JSON and blank lines)."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return DataSource(path)


def chat(*turns: tuple[str, str]) -> dict[str, Any]:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def examples(n: int, source: str = "s.jsonl", prefix: str = "x") -> list[Example]:
    return [Example(f"{prefix}{i}", f"y{i}", i + 1, source) for i in range(n)]


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Word-level: 'w<k>' is id k + 3, '</s>' (EOS) is 2; its chat template joins contents with spaces."""
    out = tmp_path_factory.mktemp("tiny-tokenizer")
    write_tiny_tokenizer(out)
    return AutoTokenizer.from_pretrained(out)


# --- formats ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "mapping", "expected"),
    [
        ({"instruction": "Add.", "input": "2 3", "output": "5"}, FieldMapping(), ("alpaca", "Add.\n\n2 3", "5")),
        ({"instruction": "Greet.", "output": "Hi"}, FieldMapping(), ("alpaca", "Greet.", "Hi")),
        ({"instruction": "Greet.", "input": None, "output": "Hi"}, FieldMapping(), ("alpaca", "Greet.", "Hi")),
        ({"instruction": "Greet.", "input": "  ", "output": "Hi"}, FieldMapping(), ("alpaca", "Greet.", "Hi")),
        ({"prompt": "Q: 1+1?\nA:", "completion": " 2"}, FieldMapping(), ("prompt_completion", "Q: 1+1?\nA:", " 2")),
        (
            {"dialogue": "A: hi\nB: yo", "summary": "Greetings.", "topic": "t"},
            DIALOG,
            ("fields", "A: hi\nB: yo", "Greetings."),
        ),
        # Named fields win over detection: this row also looks like prompt/completion.
        (
            {"prompt": "p", "completion": "c", "text": "t", "label": "l"},
            FieldMapping("text", "label"),
            ("fields", "t", "l"),
        ),
    ],
)
def test_formats(tmp_path: Path, row: dict[str, Any], mapping: FieldMapping, expected: tuple[str, str, str]) -> None:
    source = write_jsonl(tmp_path / "d.jsonl", [row])
    (example,), problems = read_examples(source, mapping)
    assert problems == []
    assert (example.format, example.input, example.output) == expected
    assert (example.line, example.source, example.messages) == (1, str(source.path), None)


def test_chat_format_keeps_the_conversation(tmp_path: Path) -> None:
    row = chat(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Sum 2 3"), ("assistant", "5"))
    (example,), _ = read_examples(write_jsonl(tmp_path / "c.jsonl", [row]))
    assert (example.format, example.input, example.output) == ("chat", "Sum 2 3", "5")
    assert example.messages == (
        Message("system", "Be brief."),
        Message("user", "Hi"),
        Message("assistant", "Hello"),
        Message("user", "Sum 2 3"),
    )


def test_chat_roles_match_the_server() -> None:
    assert frozenset(SERVER_CHAT_ROLES) == CHAT_ROLES


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"input_field": "a"}, "output_field"),
        ({"output_field": "b"}, "input_field"),
        ({"input_field": "a", "output_field": "a"}, "output_field"),
        ({"input_field": " ", "output_field": "b"}, "input_field"),
        ({"instruction": ""}, "instruction"),
    ],
)
def test_bad_field_mapping(kwargs: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        FieldMapping(**kwargs)
    assert e.value.field == field


# --- bad rows --------------------------------------------------------------------------------------------


def test_bad_rows_are_reported_with_line_numbers(tmp_path: Path) -> None:
    good = {"prompt": "p", "completion": "c"}
    rows: list[Any] = [
        good,  # 1
        "{not json",  # 2
        "",  # 3: blank, ignored
        [1, 2],  # 4
        {"prompt": "p"},  # 5
        {"prompt": "p", "completion": ""},  # 6
        {"prompt": 3, "completion": "c"},  # 7
        {"text": "t"},  # 8
        {"instruction": "i", "output": "o"},  # 9: another format than the file's
        chat(("user", "u")),  # 10: not the file's format either, and bad
        good,  # 11
    ]
    source = write_jsonl(tmp_path / "train.jsonl", rows)
    found, problems = read_examples(source)
    assert [e.line for e in found] == [1, 11]
    path = str(source.path)
    assert [p.split(":")[1] for p in problems] == ["2", "4", "5", "6", "7", "8", "9", "10"]
    assert all(p.startswith(path + ":") for p in problems)
    assert problems[0].startswith(f"{path}:2: invalid JSON")
    assert problems[2] == f"{path}:5: missing field 'completion'"
    assert problems[3] == f"{path}:6: field 'completion' is empty"
    assert problems[4] == f"{path}:7: field 'prompt' must be a string, got int"
    assert "unknown format" in problems[5]
    assert problems[6] == f"{path}:9: row is in alpaca format, but this file's rows are prompt_completion"
    assert "last message must be from the assistant" in problems[7]


def test_the_most_common_format_wins(tmp_path: Path) -> None:
    rows = [{"instruction": "i", "output": "o"}] + [{"prompt": "p", "completion": "c"}] * 2
    found, problems = read_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    assert {e.format for e in found} == {"prompt_completion"} and len(problems) == 1


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"messages": []}, "non-empty list"),
        ({"messages": ["hi"]}, "messages[0] must be an object"),
        (chat(("robot", "x"), ("assistant", "y")), "messages[0].role"),
        (chat(("user", ""), ("assistant", "y")), "messages[0].content"),
        (chat(("system", "s"), ("assistant", "y")), "no user message"),
    ],
)
def test_bad_chat_rows(tmp_path: Path, row: dict[str, Any], problem: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(problem)):
        read_examples(write_jsonl(tmp_path / "c.jsonl", [row]))


def test_a_file_without_usable_rows_is_an_error(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}"} for i in range(8)]
    with pytest.raises(InvalidArgument, match=r"no usable rows, 8 bad: .*bad\.jsonl:1: unknown format.*3 more") as e:
        read_examples(write_jsonl(tmp_path / "bad.jsonl", rows))
    assert e.value.field == "data"
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(InvalidArgument, match="empty"):
        read_examples(DataSource(tmp_path / "empty.jsonl"))
    with pytest.raises(InvalidArgument, match="cannot read"):
        read_examples(DataSource(tmp_path / "missing.jsonl"))


def test_non_utf8_and_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "p", "completion": "c"}\n{"prompt": "\xff", "completion": "c"}\n')
    found, problems = read_examples(DataSource(path))
    assert len(found) == 1 and problems == [f"{path}:2: not UTF-8 (invalid start byte at byte 12)"]


# --- sources and mixtures --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "path", "weight"),
    [
        ("train.jsonl", "train.jsonl", 1.0),
        ("d/train.jsonl:2.5", "d/train.jsonl", 2.5),
        ("a:b.jsonl:1", "a:b.jsonl", 1.0),
    ],
)
def test_parse_source(spec: str, path: str, weight: float) -> None:
    assert parse_source(spec) == DataSource(Path(path), weight)


@pytest.mark.parametrize(
    "spec", ["train.jsonl:abc", "train.jsonl:", "train.jsonl:0", "t.jsonl:-1", "t:nan", "t:inf", ":2"]
)
def test_bad_source_weights(spec: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        parse_source(spec)
    assert e.value.field == "data"


def test_mixture_proportions() -> None:
    a, b, c = examples(10, "a"), examples(20, "b"), examples(10, "c")
    sources = [(DataSource(Path("a"), 2.5), a), (DataSource(Path("b"), 0.3), b), (DataSource(Path("c")), c)]
    mixture = mix(sources, seed=1)
    assert Counter(e.source for e in mixture) == {"a": 25, "b": 6, "c": 10}
    per_row = Counter(e.line for e in mixture if e.source == "a")
    assert sorted(per_row.values()) == [2] * 5 + [3] * 5  # two full passes plus half the rows once more
    assert len({e.line for e in mixture if e.source == "b"}) == 6  # sampled without replacement
    assert mixture == mix(sources, seed=1)
    assert mixture != mix(sources, seed=2)
    assert (mix_count(0.01, 10), mix_count(1.0, 0)) == (1, 0)


def test_default_weights_give_the_shuffled_concatenation() -> None:
    a, b = examples(5, "a"), examples(7, "b")
    mixture = mix([(DataSource(Path("a")), a), (DataSource(Path("b")), b)], seed=0)
    assert sorted(mixture, key=lambda e: (e.source, e.line)) == a + b


def test_one_format_per_training_run() -> None:
    alpaca = [Example("i", "o", 1, "a", "alpaca")]
    assert detected_format(alpaca) == "alpaca"
    with pytest.raises(InvalidArgument, match="one row format"):
        detected_format([*alpaca, Example("p", "c", 1, "b")])


# --- held-out split --------------------------------------------------------------------------------------


def test_split_is_deterministic_and_stable_under_reordering() -> None:
    data = examples(50)
    train, held = split_holdout(data, fraction=0.1, seed=3)
    assert len(held) == 5 and len(train) == 45
    assert sorted(train + held, key=lambda e: e.line) == data
    assert [e.line for e in held] == sorted(e.line for e in held)  # original order kept
    assert split_holdout(data, 0.1, 3) == (train, held)
    rev_train, rev_held = split_holdout(data[::-1], 0.1, 3)
    assert set(rev_held) == set(held) and set(rev_train) == set(train)
    assert set(split_holdout(data, 0.1, 4)[1]) != set(held)


def test_split_keeps_duplicate_inputs_together_and_honours_min_eval() -> None:
    data = [*examples(20), Example("x0", "other answer", 21, "s.jsonl")]
    for seed in range(10):
        train, held = split_holdout(data, fraction=0.05, seed=seed)
        assert not {e.input for e in train} & {e.input for e in held}
    assert len(split_holdout(examples(20), fraction=0.01, min_eval=3)[1]) == 3


@pytest.mark.parametrize(
    ("data", "kwargs"),
    [
        (examples(1), {}),
        (examples(5), {"fraction": 0.0}),
        (examples(5), {"fraction": 1.0}),
        (examples(5), {"min_eval": 0}),
        (examples(5), {"min_eval": 5}),
        ([Example("x", "y", 1, "s")] * 4, {}),
    ],
)
def test_split_errors(data: list[Example], kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        split_holdout(data, **kwargs)


# --- prompt templates ------------------------------------------------------------------------------------


@pytest.mark.parametrize("detected", FORMAT_NAMES)
@pytest.mark.parametrize("instruction", [None, "Summarize the conversation.", 'Answer in JSON like {"a": 1} or {x}.'])
def test_templates_are_valid_and_round_trip(detected: str, instruction: str | None) -> None:
    template = prompt_template_for(FieldMapping(instruction=instruction), detected)
    assert validate_prompt_template(template) == template
    text = "some {braced} input"
    rendered = template.format(input=text)
    assert text in rendered
    if instruction is not None:
        assert rendered.startswith(instruction + "\n\n")


def test_documented_templates() -> None:
    assert prompt_template_for(DIALOG, "fields") == "Summarize the conversation.\n\n{input}\n\n"
    assert prompt_template_for(FieldMapping(), "alpaca") == "### Instruction:\n{input}\n\n### Response:\n"
    assert prompt_template_for(FieldMapping(), "prompt_completion") == "{input}"
    with pytest.raises(InvalidArgument):
        prompt_template_for(FieldMapping(), "csv")


# --- tokenization (tiny word-level tokenizer: exact ids) -------------------------------------------------


def test_loss_only_on_the_completion(tiny_tokenizer: Any) -> None:
    features = tokenize_example(tiny_tokenizer, "{input}", Example("w1 w2 w3", "w4 w5", 1, "s"), max_length=16)
    assert features == {
        "input_ids": [4, 5, 6, 7, 8, 2],
        "attention_mask": [1] * 6,
        "labels": [IGNORE_INDEX] * 3 + [7, 8, 2],
    }


def test_truncation_cuts_the_prompt_from_the_left(tiny_tokenizer: Any) -> None:
    example = Example("w1 w2 w3 w4 w5", "w6 w7", 1, "s")
    features = tokenize_example(tiny_tokenizer, "{input}", example, max_length=5)
    assert features["input_ids"] == [7, 8, 9, 10, 2]
    assert features["labels"] == [IGNORE_INDEX, IGNORE_INDEX, 9, 10, 2]
    with pytest.raises(ExampleTooLong, match="s:1: the output is 3 tokens"):
        tokenize_example(tiny_tokenizer, "{input}", example, max_length=3)


def test_tokenize_examples_drops_and_counts(tiny_tokenizer: Any) -> None:
    data = [Example("w1", "w2", 1, "s"), Example("w1 w2 w3", "w4", 2, "s"), Example("w1", "w2 w3 w4 w5", 3, "s")]
    result = tokenize_examples(tiny_tokenizer, "{input}", data, max_length=4)
    assert len(result.features) == 2 and result.truncated == 1
    assert result.dropped == ["s:3: the output is 5 tokens with EOS; max_length 4 leaves no room for the prompt"]
    with pytest.raises(InvalidArgument, match="no example fits"):
        tokenize_examples(tiny_tokenizer, "{input}", data[2:], max_length=4)


def test_chat_rows_use_the_chat_template(tiny_tokenizer: Any) -> None:
    messages = (Message("user", "w1"), Message("assistant", "w2"), Message("user", "w3"))
    example = Example("w3", "w4", 1, "s", "chat", messages)
    features = tokenize_example(tiny_tokenizer, "w9 {input}", example, max_length=16)
    # The tiny chat template renders "w1 w2 w9 w3 " (the template wraps the last user turn only).
    assert features["input_ids"] == [4, 5, 12, 6, 7, 2]
    assert features["labels"] == [IGNORE_INDEX] * 4 + [7, 2]
    tiny_tokenizer_without = AutoTokenizer.from_pretrained(tiny_tokenizer.name_or_path)
    tiny_tokenizer_without.chat_template = None
    with pytest.raises(FailedPrecondition):
        tokenize_example(tiny_tokenizer_without, "{input}", example, max_length=16)


# --- tokenization with the default model's tokenizer -----------------------------------------------------


@pytest.mark.real_model
def test_masks_exactly_the_prompt_with_the_default_tokenizer(default_checkpoint: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(default_checkpoint)
    template = prompt_template_for(DIALOG, "fields")
    example = Example("#Person1#: Hi, {Ann}!\n#Person2#: Hello.", "Two people greet.", 1, "s", "fields")
    features = tokenize_example(tokenizer, template, example, max_length=512)
    prompt = tokenizer(template.format(input=example.input), add_special_tokens=False)["input_ids"]
    completion = tokenizer(example.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert features["input_ids"] == prompt + completion
    assert features["labels"] == [IGNORE_INDEX] * len(prompt) + completion
    short = tokenize_example(tokenizer, template, example, max_length=len(completion) + 3)
    assert short["input_ids"] == prompt[-3:] + completion  # the whole completion survives truncation
    assert str(tokenizer.decode(short["input_ids"][:3])).endswith("\n\n")

    chat_example = Example("Hi", "Hello!", 1, "s", "chat", (Message("user", "Hi"),))
    chat_features = tokenize_example(tokenizer, "{input}", chat_example, max_length=512)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    chat_prompt = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert chat_features["labels"][: len(chat_prompt)] == [IGNORE_INDEX] * len(chat_prompt)
    assert tokenizer.decode(chat_features["input_ids"][len(chat_prompt) :]) == "Hello!" + tokenizer.eos_token
