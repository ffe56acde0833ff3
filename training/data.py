"""JSONL datasets for instruction tuning: reading, multi-task mixing, held-out splits, and tokenization.

Rows are read per file (formats and prompt templates: quiver.training.formats); unusable rows are skipped and
reported as "path:line: problem". Tokenization follows the serving path exactly: the prompt is
`template.format(input=...)` tokenized without special tokens (or, for chat rows, the conversation rendered
with the tokenizer's chat template and a generation prompt), and the loss falls only on the completion
(the output followed by the EOS token), as in instruction tuning with prompt-masked labels (Alpaca, FLAN).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quiver.common.errors import FailedPrecondition, InvalidArgument
from quiver.training.formats import (
    FieldMapping,
    FormatName,
    Message,
    ParsedRow,
    RowProblem,
    parse_row,
    prompt_template_for,
)

__all__ = [
    "DataSource",
    "Example",
    "ExampleTooLong",
    "FieldMapping",
    "Message",
    "TokenizedExamples",
    "detected_format",
    "mix",
    "mix_count",
    "parse_source",
    "prompt_template_for",
    "read_examples",
    "split_holdout",
    "tokenize_example",
    "tokenize_examples",
]

IGNORE_INDEX = -100  # label of a token that carries no loss (torch.nn.CrossEntropyLoss's default ignore_index)
MAX_PROBLEMS_SHOWN = 5  # problems quoted in an error message; the rest are counted
NO_MAPPING = FieldMapping()  # no field flags: only known formats are read


@dataclass(frozen=True)
class Example:
    """One training pair after normalisation."""

    input: str
    """The raw user input (what a client will later send); the prompt template wraps it."""
    output: str
    """The target completion."""
    line: int
    """1-based line number in its file."""
    source: str
    """File path, as given."""
    format: FormatName = "prompt_completion"
    """The row format it was read from (all examples of one file share it)."""
    messages: tuple[Message, ...] | None = None
    """Chat rows only: the conversation before the output; its last user turn's content equals `input`."""


@dataclass(frozen=True)
class DataSource:
    """One training file and its share in a multi-task mixture."""

    path: Path
    """The JSONL file."""
    weight: float = 1.0
    """Relative sampling weight for multi-task training (from "path:weight" on the CLI); see `mix`."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise InvalidArgument("data", f"{self.path}: weight must be a finite number > 0, got {self.weight}")


def parse_source(spec: str) -> DataSource:
    """ "train.jsonl" (weight 1) or "train.jsonl:2.5". The text after the last ':' must be the weight when
    there is a ':', so a path that itself contains ':' is written with an explicit weight ("a:b.jsonl:1")."""
    path, colon, weight_text = spec.rpartition(":")
    if not colon:
        path, weight_text = spec, "1"
    if not path.strip():
        raise InvalidArgument("data", f"{spec!r}: no file path (write PATH or PATH:WEIGHT)")
    try:
        weight = float(weight_text)
    except ValueError:
        raise InvalidArgument(
            "data", f"{spec!r}: weight {weight_text!r} is not a number (write PATH or PATH:WEIGHT)"
        ) from None
    return DataSource(Path(path), weight)


def _decode_line(raw: bytes, mapping: FieldMapping) -> ParsedRow | None:
    """The parsed row, or None for a blank line; raises RowProblem for an unusable one."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RowProblem(f"not UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.strip():
        return None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise RowProblem(f"invalid JSON ({e.msg} at column {e.colno})") from None
    return parse_row(row, mapping)


def _read_rows(path: Path, mapping: FieldMapping) -> tuple[list[tuple[int, ParsedRow]], list[tuple[int, str]]]:
    rows: list[tuple[int, ParsedRow]] = []
    problems: list[tuple[int, str]] = []
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if number == 1:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
                try:
                    parsed = _decode_line(raw, mapping)
                except RowProblem as e:
                    problems.append((number, str(e)))
                    continue
                if parsed is not None:
                    rows.append((number, parsed))
    except OSError as e:
        raise InvalidArgument("data", f"{path}: cannot read ({e.strerror or e})") from e
    return rows, problems


def _no_usable_rows(path: Path, problems: list[str]) -> InvalidArgument:
    if not problems:
        return InvalidArgument("data", f"{path}: no rows (the file is empty)")
    shown = "; ".join(problems[:MAX_PROBLEMS_SHOWN])
    more = f" (and {len(problems) - MAX_PROBLEMS_SHOWN} more)" if len(problems) > MAX_PROBLEMS_SHOWN else ""
    return InvalidArgument("data", f"{path}: no usable rows, {len(problems)} bad: {shown}{more}")


def read_examples(source: DataSource, mapping: FieldMapping = NO_MAPPING) -> tuple[list[Example], list[str]]:
    """The usable rows of one JSONL file, in file order, and a "path:line: problem" for each skipped row.

    A file holds one format: the most common among its usable rows (the earliest on a tie); rows in another
    format are reported and skipped. Blank lines are ignored. A file with no usable row raises InvalidArgument.
    """
    rows, bad = _read_rows(source.path, mapping)
    counts = Counter(parsed.format for _, parsed in rows)
    chosen = max(counts, key=lambda name: counts[name]) if counts else None  # first-seen wins a tie
    for number, parsed in rows:
        if parsed.format != chosen:
            bad.append((number, f"row is in {parsed.format} format, but this file's rows are {chosen}"))
    problems = [f"{source.path}:{number}: {problem}" for number, problem in sorted(bad)]
    examples = [
        Example(parsed.input, parsed.output, number, str(source.path), parsed.format, parsed.messages)
        for number, parsed in rows
        if parsed.format == chosen
    ]
    if not examples:
        raise _no_usable_rows(source.path, problems)
    return examples, problems


def detected_format(examples: Sequence[Example]) -> FormatName:
    """The one format shared by `examples` (e.g. a whole mixture), for `prompt_template_for`.

    An adapter stores a single prompt template, so sources in different formats cannot be trained together.
    """
    formats = sorted({e.format for e in examples})
    if len(formats) != 1:
        found = ", ".join(formats) or "no examples"
        raise InvalidArgument("data", f"all training files must share one row format (one prompt template); {found}")
    return examples[0].format


def mix_count(weight: float, size: int) -> int:
    """How many examples a source of `size` rows contributes to a mixture: round(weight * size), at least 1."""
    return max(1, round(weight * size)) if size else 0


def mix(sources: Sequence[tuple[DataSource, list[Example]]], seed: int) -> list[Example]:
    """A shuffled multi-task mixture in which each source's weight scales its own size (`mix_count`).

    Weight 1 uses every row once (so all-default weights give the plain concatenation, shuffled); weight 2.5
    uses every row twice plus a random half of them once more; weight 0.3 uses a random 30% of the rows.
    The relative share of source i is therefore weight_i * size_i / sum_j(weight_j * size_j). Sampling is
    without replacement within each partial pass, and everything depends only on `seed` and the inputs.
    """
    mixture: list[Example] = []
    for index, (source, examples) in enumerate(sources):
        if not examples:
            continue
        rng = random.Random(f"{seed}/{index}")  # per source: one source's size does not perturb another's draw
        whole, rest = divmod(mix_count(source.weight, len(examples)), len(examples))
        mixture.extend(examples * whole)
        mixture.extend(rng.sample(examples, rest))
    random.Random(seed).shuffle(mixture)
    return mixture


def _holdout_key(example: Example, seed: int) -> bytes:
    # By input (and chat context), not output: rows sharing an input never straddle the split.
    context = json.dumps([example.input, example.messages], ensure_ascii=False)
    return hashlib.sha256(f"{seed}\0{context}".encode()).digest()


def split_holdout(
    examples: list[Example], fraction: float = 0.1, seed: int = 0, min_eval: int = 1
) -> tuple[list[Example], list[Example]]:
    """(train, eval): a held-out split for when no eval file is given, each in the original order.

    Eval takes the max(min_eval, round(fraction * n)) examples whose seeded hash of the input is smallest,
    plus any further rows with the same input. The split depends only on the set of rows and `seed`, so it is
    stable under reordering, and duplicates of one input all land on the same side.
    """
    if not 0 < fraction < 1:
        raise InvalidArgument("eval_fraction", f"must be in (0, 1), got {fraction}")
    if min_eval < 1:
        raise InvalidArgument("min_eval", f"must be >= 1, got {min_eval}")
    wanted = max(min_eval, round(fraction * len(examples)))
    if wanted >= len(examples):
        raise InvalidArgument(
            "data", f"{len(examples)} examples are too few to hold out {wanted} for evaluation; give an eval file"
        )
    keys = [_holdout_key(e, seed) for e in examples]
    ranked = sorted(range(len(examples)), key=lambda i: keys[i])
    cutoff = keys[ranked[wanted - 1]]
    held = {i for i in ranked if keys[i] <= cutoff}
    if len(held) == len(examples):
        raise InvalidArgument("data", "every example has the same input; nothing is left to train on")
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [e for i, e in enumerate(examples) if i in held]


class ExampleTooLong(InvalidArgument):
    """The completion (with EOS) leaves no room for a single prompt token within max_length."""

    def __init__(self, example: Example, completion_tokens: int, max_length: int) -> None:
        self.problem = (
            f"{example.source}:{example.line}: the output is {completion_tokens} tokens with EOS; "
            f"max_length {max_length} leaves no room for the prompt"
        )
        super().__init__("data", self.problem)
        self.example = example


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prompt_ids(tokenizer: Any, template: str, example: Example) -> list[int]:
    """The prompt's tokens exactly as the server builds them for a text or a chat request."""
    if example.messages is None:
        return _encode(tokenizer, template.format(input=example.input))
    if not getattr(tokenizer, "chat_template", None):
        raise FailedPrecondition("chat-format data needs a model with a chat template; convert the rows to text")
    messages = [{"role": m.role, "content": m.content} for m in example.messages]
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last_user]["content"] = template.format(input=example.input)
    rendered: str = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return _encode(tokenizer, rendered)  # the chat template already holds any special tokens


def _tokenize(tokenizer: Any, template: str, example: Example, max_length: int) -> tuple[dict[str, list[int]], int]:
    """tokenize_example's result and how many prompt tokens were cut to fit."""
    if max_length < 2:
        raise InvalidArgument("max_length", f"must be >= 2, got {max_length}")
    if tokenizer.eos_token_id is None:
        raise FailedPrecondition("the tokenizer has no EOS token, so the model cannot learn where an answer ends")
    completion = [*_encode(tokenizer, example.output), tokenizer.eos_token_id]
    room = max_length - len(completion)
    if room < 1:
        raise ExampleTooLong(example, len(completion), max_length)
    prompt = _prompt_ids(tokenizer, template, example)
    cut = max(0, len(prompt) - room)
    prompt = prompt[cut:]
    input_ids = prompt + completion
    features = {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": [IGNORE_INDEX] * len(prompt) + completion,
    }
    return features, cut


def tokenize_example(tokenizer: Any, template: str, example: Example, max_length: int) -> dict[str, list[int]]:
    """input_ids, attention_mask and labels for one example; labels are IGNORE_INDEX on every prompt token.

    prompt = template.format(input=example.input) (chat rows: rendered with the chat template, as the server
    does), tokenized without special tokens; completion = tokens of example.output, then the EOS token. The
    two are tokenized separately, so the prompt tokens equal those the server feeds the model. When they do
    not fit in max_length, the whole completion is kept and the prompt loses tokens from its left (its start,
    usually the instruction), keeping the template's tail that introduces the answer. If the completion
    alone leaves no room for one prompt token, ExampleTooLong is raised (tokenize_examples drops such rows).
    """
    return _tokenize(tokenizer, template, example, max_length)[0]


@dataclass(frozen=True)
class TokenizedExamples:
    """The result of tokenizing a list of examples."""

    features: list[dict[str, list[int]]]
    """One tokenize_example result per kept example, in order."""
    dropped: list[str]
    """"path:line: why" for each example left out (its output alone does not fit in max_length)."""
    truncated: int
    """How many kept examples lost prompt tokens to max_length."""


def tokenize_examples(tokenizer: Any, template: str, examples: Sequence[Example], max_length: int) -> TokenizedExamples:
    """tokenize_example over `examples`, dropping (and reporting) those that cannot fit; none left is an error."""
    features: list[dict[str, list[int]]] = []
    dropped: list[str] = []
    truncated = 0
    for example in examples:
        try:
            one, cut = _tokenize(tokenizer, template, example, max_length)
        except ExampleTooLong as e:
            dropped.append(e.problem)
            continue
        features.append(one)
        truncated += cut > 0
    if not features:
        shown = "; ".join(dropped[:MAX_PROBLEMS_SHOWN])
        raise InvalidArgument("data", f"no example fits in max_length {max_length}: {shown}")
    return TokenizedExamples(features, dropped, truncated)
