"""`quiver data synth`: question/context/answer training rows from documents, written by a served model.

For each passage (quiver.training.passages) the server is asked, through the client library, to summarize it
(SynthTemplates.summary) and then to write questions whose answer is that summary (SynthTemplates.question); the
filters (quiver.training.synth_filters) keep supported, new, short-enough rows. Passages are worked on
`--concurrency` at a time, so the server batches their requests, but results are filtered and written in passage
order: the output is the same whatever the timing.

Deterministic with --seed: every request carries a seed derived from (--seed, passage id, step), and with
--temperature 0 (greedy) the seed does not matter at all.

Resumable: after each passage, its rows are appended to --out and a line to `<out>.progress.jsonl` (its id, the
summary, what was kept and dropped). A rerun skips the passages listed there and starts its duplicate filter with
the questions already written, so a passage redone after a crash between the two writes adds no duplicate rows. A
passage whose request the server refused is logged, counted and left for a rerun.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from quiver.clients.client import QuiverClient
from quiver.clients.errors import QuiverRpcError
from quiver.common.errors import InvalidArgument
from quiver.training.jsonl import jsonl_lines
from quiver.training.passages import Passage, read_documents, split_passages
from quiver.training.server_options import LocalServer, ServerOptions
from quiver.training.synth_filters import QAFilter, parse_questions
from quiver.training.synth_templates import SynthTemplates

log = logging.getLogger(__name__)

RowFormat = Literal["fields", "chat"]


@dataclass
class SynthConfig(ServerOptions):
    """What `quiver data synth` reads, asks and writes; its flags map 1:1 onto these fields."""

    documents: tuple[str, ...] = field(
        default=(), metadata={"help": "a text/markdown/JSONL file or a folder of them (repeatable)"}
    )
    out: str | None = field(default=None, metadata={"help": "output JSONL (appended to: reruns resume)"})
    text_field: str = field(default="text", metadata={"help": "JSONL documents: the key holding the text"})
    adapter: str = field(default="", metadata={"help": "adapter that writes summaries and questions (default: base)"})
    max_passage_tokens: int = field(default=256, metadata={"help": "most tokens in a passage"})
    overlap_tokens: int = field(default=32, metadata={"help": "tokens of whole paragraphs repeated across passages"})
    questions: int = field(default=3, metadata={"help": "questions asked per passage"})
    summary_template: str | None = field(
        default=None, metadata={"help": "file with the summary prompt ({passage}); default: built in"}
    )
    question_template: str | None = field(
        default=None,
        metadata={"help": "file with the question prompt ({summary}; {passage}, {count}); default: built in"},
    )
    chat: bool = field(default=True, metadata={"help": "send prompts as a user chat turn (the model's chat template)"})
    max_new_tokens: int = field(default=128, metadata={"help": "most tokens of each reply"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature (0: greedy)"})
    repetition_penalty: float = field(
        default=1.1, metadata={"help": "penalty on tokens already generated (1: none); small models loop without it"}
    )
    seed: int = field(default=0, metadata={"help": "seed of every request's sampling"})
    min_support: float = field(
        default=0.6, metadata={"help": "least share of the answer's content words found in the passage"}
    )
    max_answer_words: int = field(default=120, metadata={"help": "longer summaries are dropped"})
    max_question_words: int = field(default=40, metadata={"help": "longer questions are dropped"})
    row_format: RowFormat = field(
        default="fields", metadata={"help": "fields: question/context/answer/source; chat: the same plus `messages`"}
    )
    limit: int | None = field(default=None, metadata={"help": "work on the first N passages only"})
    tokenizer: str | None = field(
        default=None, metadata={"help": "checkpoint whose tokenizer counts passage tokens (default: --model's, "
                                "else the default model's)"}
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        if not self.documents:
            raise ValueError("--documents is required (a file or folder)")
        if not self.out:
            raise ValueError("--out is required (a JSONL file)")
        super().__post_init__()
        if self.max_passage_tokens < 8 or not 0 <= self.overlap_tokens < self.max_passage_tokens:
            raise ValueError("--max-passage-tokens must be >= 8 and --overlap-tokens in [0, --max-passage-tokens)")
        for name in ("questions", "max_new_tokens", "max_answer_words", "max_question_words", "limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if not 0.0 <= self.min_support <= 1.0:
            raise ValueError("--min-support must be in [0, 1]")
        if self.temperature < 0:
            raise ValueError("--temperature must be >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError("--repetition-penalty must be > 0")

    def progress_path(self) -> Path:
        return Path(f"{self.out}.progress.jsonl")


@dataclass
class SynthResult:
    passages: int
    """Passages in the documents (after --limit)."""
    skipped: int
    """Passages already done by an earlier run."""
    rows: int
    """Rows written by this run."""
    dropped: dict[str, int]
    """Reason -> questions dropped by this run."""


@dataclass(frozen=True)
class Reply:
    passage: Passage
    summary: str
    questions: list[str]
    error: str | None = None
    """Why a request of this passage failed (its status code); the passage is then left for a rerun."""


def request_seed(seed: int, passage_id: str, step: str) -> int:
    digest = hashlib.sha256(f"{seed}:{passage_id}:{step}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def _ask(client: QuiverClient, config: SynthConfig, prompt: str, passage: Passage, step: str,
         stop: tuple[str, ...] = ()) -> str:
    text = {"messages": [{"role": "user", "content": prompt}]} if config.chat else {"prompt": prompt}
    generation = client.generate(
        **text, adapter=config.adapter, max_new_tokens=config.max_new_tokens,  # type: ignore[arg-type]
        temperature=config.temperature, repetition_penalty=config.repetition_penalty, stop=stop,
        seed=request_seed(config.seed, passage.id, step),
    )
    return generation.text.strip()


def _work(client: QuiverClient, config: SynthConfig, templates: SynthTemplates, passage: Passage) -> Reply:
    try:
        # A summary is one paragraph: a blank line ends it (small models go on with headings of their own).
        summary = _ask(client, config, templates.summary_prompt(passage.text), passage, "summary", stop=("\n\n",))
        if not summary:
            return Reply(passage, "", [])
        reply = _ask(client, config, templates.question_prompt(passage.text, summary, config.questions), passage,
                     "questions")
    except QuiverRpcError as e:  # one passage the server refuses (too long for it, past the deadline) stops nothing
        return Reply(passage, "", [], error=e.code.name)
    return Reply(passage, summary, parse_questions(reply, config.questions))


def _tokenizer_function(config: SynthConfig) -> Any:
    from transformers import AutoTokenizer

    from quiver.common.model_source import default_cache_dir, resolve_checkpoint

    checkpoint = resolve_checkpoint(config.tokenizer or config.model, default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    return lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])


def passages_of(config: SynthConfig) -> list[Passage]:
    tokenize = _tokenizer_function(config)
    passages = [passage for document in read_documents([Path(d) for d in config.documents], config.text_field)
                for passage in split_passages(document, tokenize, config.max_passage_tokens,
                                              config.overlap_tokens)]
    return passages[: config.limit] if config.limit else passages


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The file's rows. A last line that a crash left unfinished (no newline, not JSON) is cut off: its passage is
    redone. Any other unreadable line is an error: the file is not one this command wrote."""
    if not path.exists():
        return []
    lines = list(jsonl_lines(path))
    data = path.read_bytes()
    if lines and lines[-1][2] is not None and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
        lines.pop()
    bad = [problem for _, row, problem in lines if problem is not None or not isinstance(row, dict)]
    if bad:
        raise InvalidArgument("out", f"{bad[0] or path}: not a file `quiver data synth` wrote; choose another --out")
    return [row for _, row, _ in lines]


def rows_for(reply: Reply, kept: list[str], row_format: RowFormat) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for question in kept:
        row: dict[str, Any] = {"question": question, "context": reply.passage.text, "answer": reply.summary,
                               "source": reply.passage.source, "passage_id": reply.passage.id}
        if row_format == "chat":
            row["messages"] = [{"role": "user", "content": question}, {"role": "assistant", "content": reply.summary}]
        rows.append(row)
    return rows


def _append(path: Path, lines: list[dict[str, Any]]) -> None:
    with path.open("a", encoding="utf-8") as out:
        out.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
        out.flush()
        os.fsync(out.fileno())


def _replies(client: QuiverClient, config: SynthConfig, templates: SynthTemplates, todo: list[Passage]
             ) -> Iterator[Reply]:
    """Each passage's reply, in passage order, with `concurrency` passages in flight."""
    with ThreadPoolExecutor(config.concurrency, thread_name_prefix="quiver-synth") as pool:
        yield from pool.map(lambda p: _work(client, config, templates, p), todo)


def synthesize(config: SynthConfig, local_server: LocalServer | None = None) -> SynthResult:
    """Run `quiver data synth` (see the module docstring); the rows land in `config.out`."""
    templates = SynthTemplates.from_files(config.summary_template, config.question_template)
    passages = passages_of(config)
    out, progress = Path(str(config.out)), config.progress_path()
    done = {line["passage_id"] for line in _read_jsonl(progress)}
    filters = QAFilter(config.min_support, config.max_question_words, config.max_answer_words)
    filters.remember(row["question"] for row in _read_jsonl(out))
    todo = [p for p in passages if p.id not in done]
    log.info("%d passages, %d already done, %d to do", len(passages), len(passages) - len(todo), len(todo))
    out.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with config.connect(local_server) as (client, _):
        replies = _replies(client, config, templates, todo)
        if config.progress:
            from tqdm import tqdm

            replies = tqdm(replies, total=len(todo), desc="passages", unit="passage")
        for reply in replies:
            if reply.error is not None:
                log.warning("passage %s of %s: the server answered %s; a rerun retries it", reply.passage.index,
                            reply.passage.source, reply.error)
                filters.dropped[f"request_failed_{reply.error.lower()}"] += 1
                continue
            before = dict(filters.dropped)
            kept = filters.keep(reply.summary, reply.passage.text, reply.questions)
            rows = rows_for(reply, kept, config.row_format)
            _append(out, rows)
            dropped = {k: v - before.get(k, 0) for k, v in filters.dropped.items() if v != before.get(k, 0)}
            _append(progress, [{"passage_id": reply.passage.id, "source": reply.passage.source,
                                "index": reply.passage.index, "summary": reply.summary,
                                "asked": len(reply.questions), "kept": len(rows), "dropped": dropped}])
            written += len(rows)
    return SynthResult(len(passages), len(passages) - len(todo), written, dict(filters.dropped))
