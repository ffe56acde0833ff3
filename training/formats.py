"""Row formats for instruction-tuning data: detection, parsing, and the hard prompt each format trains with.

A JSONL row is one JSON object. Its format is found by a registry of detectors tried in order, the first
match wins:

- `fields` (when --input-field/--output-field are given): input = row[input_field], output = row[output_field].
- `alpaca` (key `instruction`): input = instruction, plus a blank line and `input` when that is non-empty;
  output = `output`.
- `chat` (key `messages`, a list of {role, content}): the last message must be the assistant's and is the
  output; input = the content of the last user message before it.
- `prompt_completion` (key `prompt`): input = `prompt`, output = `completion`.

Explicit field flags win over detection (the user said which fields to read); otherwise the known formats are
tried as listed (Alpaca, chat, prompt/completion).

Alpaca keeps the per-row instruction in the *input*: it differs row by row, so only the client can supply it
at serving time. Chat rows keep their conversation (`Example.messages`) so the trainer renders them with the
tokenizer's chat template exactly as the server's request builder renders a chat request.

Each format has a fixed, documented prompt template (`FORMAT_TEMPLATES`); a fixed `--instruction` is put in
front of it followed by a blank line. The template is stored with the adapter and applied by the server with
`str.format(input=...)`, so the training prompt and the serving prompt are the same string.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, get_args

from quiver.adapters.metadata import validate_prompt_template
from quiver.common.errors import InvalidArgument

FormatName = Literal["fields", "alpaca", "chat", "prompt_completion"]
FORMAT_NAMES: tuple[str, ...] = get_args(FormatName)

# The roles the server accepts in a chat request (`CHAT_ROLES` in server/api/request_builder.py; a test keeps
# them equal), so every conversation trained on is one a client can send.
CHAT_ROLES = frozenset({"system", "user", "assistant"})

# format -> hard prompt around the client's input. Alpaca uses the Stanford Alpaca section headers; chat needs
# none (the chat template marks the turns); prompt/completion rows carry their own separator in `prompt`
# (as in OpenAI's legacy fine-tuning format); mapped fields end the input with a blank line.
FORMAT_TEMPLATES: dict[str, str] = {
    "fields": "{input}\n\n",
    "alpaca": "### Instruction:\n{input}\n\n### Response:\n",
    "chat": "{input}",
    "prompt_completion": "{input}",
}


@dataclass(frozen=True)
class FieldMapping:
    """How to read rows that are not in a known format (flags --input-field/--output-field/--instruction)."""

    input_field: str | None = None
    """Row key holding the input text, e.g. "dialogue"; set together with `output_field`."""
    output_field: str | None = None
    """Row key holding the target text, e.g. "summary"; set together with `input_field`."""
    instruction: str | None = None
    """Fixed instruction placed before the input in every prompt, e.g. "Summarize the conversation."."""

    def __post_init__(self) -> None:
        if (self.input_field is None) != (self.output_field is None):
            missing = "output_field" if self.output_field is None else "input_field"
            raise InvalidArgument(missing, "--input-field and --output-field must be given together")
        for name in ("input_field", "output_field", "instruction"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise InvalidArgument(name, "must not be empty")
        if self.input_field is not None and self.input_field == self.output_field:
            raise InvalidArgument("output_field", "must differ from --input-field")

    @property
    def maps_fields(self) -> bool:
        """Whether the user named the input and output fields (which forces the `fields` format)."""
        return self.input_field is not None


class Message(NamedTuple):
    """One chat turn."""

    role: str
    """"system", "user" or "assistant"."""
    content: str
    """The turn's text, never empty."""


@dataclass(frozen=True)
class ParsedRow:
    """A row's training pair before it gets its file position."""

    format: FormatName
    """The format the row was read as."""
    input: str
    """What a client will send at serving time."""
    output: str
    """The target completion."""
    messages: tuple[Message, ...] | None = None
    """Chat rows only: the conversation before the output, ending with (or containing) the last user turn."""


class RowProblem(ValueError):
    """A row cannot be used; the message says why, without file or line (the reader adds those)."""


@dataclass(frozen=True)
class RowFormat:
    """One entry of the detector registry."""

    name: FormatName
    """The format's name, also the key of its template in FORMAT_TEMPLATES."""
    detect: Callable[[Mapping[str, Any], FieldMapping], bool]
    """Whether a row (a JSON object) is in this format."""
    parse: Callable[[Mapping[str, Any], FieldMapping], ParsedRow]
    """The row's training pair; raises RowProblem for an unusable row."""


def _required(row: Mapping[str, Any], key: str) -> str:
    """row[key] as a non-blank string."""
    value = row.get(key)
    if value is None:
        raise RowProblem(f"missing field {key!r}" if key not in row else f"field {key!r} is null")
    if not isinstance(value, str):
        raise RowProblem(f"field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RowProblem(f"field {key!r} is empty")
    return value


def _optional(row: Mapping[str, Any], key: str) -> str | None:
    """row[key] as a string, or None when it is absent, null or blank."""
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RowProblem(f"field {key!r} must be a string, got {type(value).__name__}")
    return value if value.strip() else None


def _parse_fields(row: Mapping[str, Any], mapping: FieldMapping) -> ParsedRow:
    assert mapping.input_field is not None and mapping.output_field is not None  # detect checked maps_fields
    problems = []
    for key in (mapping.input_field, mapping.output_field):
        try:
            _required(row, key)
        except RowProblem as e:
            problems.append(str(e))
    if problems:
        raise RowProblem("; ".join(problems))
    return ParsedRow("fields", row[mapping.input_field], row[mapping.output_field])


def _parse_alpaca(row: Mapping[str, Any], mapping: FieldMapping) -> ParsedRow:
    instruction, output = _required(row, "instruction"), _required(row, "output")
    extra = _optional(row, "input")
    text = instruction if extra is None else f"{instruction}\n\n{extra}"
    return ParsedRow("alpaca", text, output)


def _message(index: int, item: Any) -> Message:
    if not isinstance(item, dict):
        raise RowProblem(f"messages[{index}] must be an object with role and content")
    role, content = item.get("role"), item.get("content")
    if role not in CHAT_ROLES:
        raise RowProblem(f"messages[{index}].role must be one of {sorted(CHAT_ROLES)}, got {role!r}")
    if not isinstance(content, str) or not content.strip():
        raise RowProblem(f"messages[{index}].content must be a non-empty string")
    return Message(role, content)


def _parse_chat(row: Mapping[str, Any], mapping: FieldMapping) -> ParsedRow:
    raw = row["messages"]
    if not isinstance(raw, list) or not raw:
        raise RowProblem("field 'messages' must be a non-empty list")
    messages = [_message(i, item) for i, item in enumerate(raw)]
    if messages[-1].role != "assistant":
        raise RowProblem("the last message must be from the assistant (it is the output)")
    users = [m for m in messages[:-1] if m.role == "user"]
    if not users:
        raise RowProblem("no user message before the assistant's reply")
    return ParsedRow("chat", users[-1].content, messages[-1].content, tuple(messages[:-1]))


def _parse_prompt_completion(row: Mapping[str, Any], mapping: FieldMapping) -> ParsedRow:
    prompt, completion = _required(row, "prompt"), _required(row, "completion")
    return ParsedRow("prompt_completion", prompt, completion)


# Tried in order; the first whose detector matches parses the row.
ROW_FORMATS: tuple[RowFormat, ...] = (
    RowFormat("fields", lambda row, mapping: mapping.maps_fields, _parse_fields),
    RowFormat("alpaca", lambda row, mapping: "instruction" in row, _parse_alpaca),
    RowFormat("chat", lambda row, mapping: "messages" in row, _parse_chat),
    RowFormat("prompt_completion", lambda row, mapping: "prompt" in row, _parse_prompt_completion),
)


def parse_row(row: Any, mapping: FieldMapping) -> ParsedRow:
    """The training pair in a decoded JSON row; raises RowProblem saying why a row is unusable."""
    if not isinstance(row, dict):
        raise RowProblem(f"expected a JSON object, got {type(row).__name__}")
    for row_format in ROW_FORMATS:
        if row_format.detect(row, mapping):
            return row_format.parse(row, mapping)
    keys = ", ".join(repr(k) for k in sorted(row)[:8]) or "none"
    raise RowProblem(
        f"unknown format (keys: {keys}); expected 'instruction'+'output', 'messages', or 'prompt'+'completion', "
        "or name the fields with --input-field/--output-field"
    )


def escape_braces(text: str) -> str:
    """`text` as a literal inside a str.format template."""
    return text.replace("{", "{{").replace("}", "}}")


def prompt_template_for(mapping: FieldMapping, detected: str) -> str:
    """The hard prompt trained with and stored with the adapter: FORMAT_TEMPLATES[detected], after the fixed
    instruction and a blank line when there is one. It always passes validate_prompt_template."""
    if detected not in FORMAT_TEMPLATES:
        raise InvalidArgument("data", f"unknown format {detected!r}; known: {', '.join(FORMAT_NAMES)}")
    template = FORMAT_TEMPLATES[detected]
    if mapping.instruction is not None:
        template = f"{escape_braces(mapping.instruction)}\n\n{template}"
    return validate_prompt_template(template)
