"""Documents and the passages `quiver data synth` writes questions about.

A document is a text or markdown file, or one row of a JSONL file (its --text-field); a folder stands for the
documents in it (*.txt, *.md, *.rst, *.jsonl, sorted by path, so the order — and every id below — is the same
on every run).

Splitting is by tokens of the base model's tokenizer, on paragraph boundaries: paragraphs (separated by blank
lines) are packed into a passage until the next one would pass `max_tokens`; the next passage starts with the
last paragraphs of the previous one that fit in `overlap_tokens`, so a fact cut at a boundary is whole in one of
the two. A paragraph longer than `max_tokens` on its own is cut between words into windows of at most `max_tokens`
tokens (with the same overlap): the only case where a passage ends inside a paragraph. Invariant: every passage has
at most `max_tokens` tokens, and every word of the document is in at least one passage.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from quiver.common.errors import InvalidArgument
from quiver.training.jsonl import jsonl_lines

DOCUMENT_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".jsonl")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")

Tokenize = Callable[[str], list[int]]
"""Text -> token ids (the base model's tokenizer, without special tokens)."""


@dataclass(frozen=True)
class Document:
    source: str
    """Where the text came from: the file's absolute path (so ids do not depend on how it was named), or
    "path:line" for a JSONL row."""
    text: str


@dataclass(frozen=True)
class Passage:
    id: str
    """Stable id: a hash of the source, the passage's index in it and its text (resume skips ids already done)."""
    source: str
    index: int
    """The passage's position in its document (0-based)."""
    text: str
    tokens: int


def _files(paths: Sequence[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DOCUMENT_SUFFIXES)
        elif path.is_file():
            yield path
        else:
            raise InvalidArgument("documents", f"{path} is neither a file nor a folder")


def read_documents(paths: Sequence[Path], text_field: str = "text") -> list[Document]:
    """Every non-empty document under `paths`: whole text/markdown files, and each JSONL row's `text_field`."""
    documents: list[Document] = []
    for path in _files(paths):
        if path.suffix.lower() != ".jsonl":
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                documents.append(Document(str(path.resolve()), text))
            continue
        for number, row, problem in jsonl_lines(path):
            if problem is not None:
                raise InvalidArgument("documents", problem)
            value = row.get(text_field) if isinstance(row, dict) else None
            if not isinstance(value, str):
                raise InvalidArgument("documents", f"{path}:{number}: no string field {text_field!r}")
            if value.strip():
                documents.append(Document(f"{path.resolve()}:{number}", value))
    if not documents:
        raise InvalidArgument("documents", f"no document text found under {', '.join(map(str, paths))}")
    return documents


def paragraphs(text: str) -> list[str]:
    """The text's paragraphs (blank-line separated), stripped, empty ones dropped."""
    return [p.strip() for p in _PARAGRAPH_BREAK.split(text.replace("\r\n", "\n")) if p.strip()]


def _fit(units: list[str], start: int, tokenize: Tokenize, max_tokens: int) -> int:
    """The largest end > start such that units[start:end], joined by spaces, has at most max_tokens tokens (at
    least start + 1: every unit fits alone, see _units)."""
    low, high = start + 1, len(units)
    while low < high:
        middle = (low + high + 1) // 2
        if len(tokenize(" ".join(units[start:middle]))) <= max_tokens:
            low = middle
        else:
            high = middle - 1
    return low


def _units(paragraph: str, tokenize: Tokenize, max_tokens: int) -> list[str]:
    """The paragraph's words, a word too long for a passage on its own (a giant URL) cut into character runs."""
    units: list[str] = []
    for word in paragraph.split():
        while len(tokenize(word)) > max_tokens:
            low, high = 1, len(word) - 1  # the longest prefix that fits (one character always does)
            while low < high:
                middle = (low + high + 1) // 2
                low, high = (middle, high) if len(tokenize(word[:middle])) <= max_tokens else (low, middle - 1)
            units.append(word[:low])
            word = word[low:]
        units.append(word)
    return units


def _word_windows(paragraph: str, tokenize: Tokenize, max_tokens: int, overlap: int) -> list[str]:
    """A paragraph longer than max_tokens cut between words (never inside a character, as token windows of a
    byte-level tokenizer would be) into windows of at most max_tokens tokens; each window after the first starts
    with the last words of the one before that fit in `overlap` tokens."""
    units = _units(paragraph, tokenize, max_tokens)
    windows: list[str] = []
    start = 0
    while True:
        end = _fit(units, start, tokenize, max_tokens)
        windows.append(" ".join(units[start:end]))
        if end == len(units):
            return windows
        back = end
        while back - 1 > start and len(tokenize(" ".join(units[back - 1:end]))) <= overlap:
            back -= 1
        start = back


def _pieces(text: str, tokenize: Tokenize, max_tokens: int, overlap: int) -> list[str]:
    """The paragraphs, a too-long one cut between words."""
    pieces: list[str] = []
    for paragraph in paragraphs(text):
        if len(tokenize(paragraph)) <= max_tokens:
            pieces.append(paragraph)
        else:
            pieces += _word_windows(paragraph, tokenize, max_tokens, overlap)
    return pieces


def _joined(pieces: list[str]) -> str:
    return "\n\n".join(pieces)


def _tail(window: list[str], overlap: int, tokenize: Tokenize) -> list[str]:
    """The last pieces of `window` that fit together in `overlap` tokens (none when the last alone does not)."""
    kept: list[str] = []
    for piece in reversed(window):
        if len(tokenize(_joined([piece, *kept]))) > overlap:
            break
        kept.insert(0, piece)
    return kept


def split_passages(document: Document, tokenize: Tokenize, max_tokens: int, overlap_tokens: int) -> list[Passage]:
    """The document's passages, in order (see the module docstring for the rules). Sizes are counted on the joined
    text, as tokenizers merge across the paragraph separator."""
    if max_tokens < 8:
        raise InvalidArgument("max_tokens", f"must be >= 8, got {max_tokens}")
    if not 0 <= overlap_tokens < max_tokens:
        raise InvalidArgument("overlap_tokens", f"must be >= 0 and < max_tokens ({max_tokens}), got {overlap_tokens}")
    windows: list[list[str]] = []
    window: list[str] = []
    for piece in _pieces(document.text, tokenize, max_tokens, overlap_tokens):
        if window and len(tokenize(_joined([*window, piece]))) > max_tokens:
            windows.append(window)
            window = _tail(window, overlap_tokens, tokenize)
            if window and len(tokenize(_joined([*window, piece]))) > max_tokens:
                window = []
        window.append(piece)
    if window and (not windows or window != _tail(windows[-1], overlap_tokens, tokenize)):
        windows.append(window)
    return [_passage(document.source, i, _joined(pieces), tokenize) for i, pieces in enumerate(windows)]


def _passage(source: str, index: int, text: str, tokenize: Tokenize) -> Passage:
    digest = hashlib.sha256(f"{source}\0{index}\0{text}".encode()).hexdigest()[:16]
    return Passage(digest, source, index, text, len(tokenize(text)))
