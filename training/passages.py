"""Documents and the passages `quiver data synth` writes questions about.

A document is a text or markdown file, or one row of a JSONL file (its --text-field); a folder stands for the
documents in it (*.txt, *.md, *.rst, *.jsonl, sorted by path, so the order — and every id below — is the same
on every run).

Splitting is by tokens of the base model's tokenizer, on paragraph boundaries: paragraphs (separated by blank
lines) are packed into a passage until the next one would pass `max_tokens`; the next passage starts with the
last paragraphs of the previous one that fit in `overlap_tokens`, so a fact cut at a boundary is whole in one of
the two. A paragraph longer than `max_tokens` on its own is cut into windows of `max_tokens` tokens (with the same
overlap), the only case where a passage ends inside a paragraph. Invariant: every passage has at most
`max_tokens` tokens, and every paragraph is in at least one passage.
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
Detokenize = Callable[[list[int]], str]


@dataclass(frozen=True)
class Document:
    source: str
    """Where the text came from: a file path, or "path:line" for a JSONL row."""
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
                documents.append(Document(str(path), text))
            continue
        for number, row, problem in jsonl_lines(path):
            if problem is not None:
                raise InvalidArgument("documents", problem)
            value = row.get(text_field) if isinstance(row, dict) else None
            if not isinstance(value, str):
                raise InvalidArgument("documents", f"{path}:{number}: no string field {text_field!r}")
            if value.strip():
                documents.append(Document(f"{path}:{number}", value))
    if not documents:
        raise InvalidArgument("documents", f"no document text found under {', '.join(map(str, paths))}")
    return documents


def paragraphs(text: str) -> list[str]:
    """The text's paragraphs (blank-line separated), stripped, empty ones dropped."""
    return [p.strip() for p in _PARAGRAPH_BREAK.split(text.replace("\r\n", "\n")) if p.strip()]


def _windows(tokens: list[int], size: int, overlap: int) -> Iterator[list[int]]:
    step = max(1, size - overlap)
    for start in range(0, max(1, len(tokens) - overlap), step):
        yield tokens[start:start + size]


def _pieces(text: str, tokenize: Tokenize, detokenize: Detokenize, max_tokens: int, overlap: int
            ) -> list[tuple[str, int]]:
    """(paragraph, tokens) pairs, a too-long paragraph cut into token windows."""
    pieces: list[tuple[str, int]] = []
    for paragraph in paragraphs(text):
        ids = tokenize(paragraph)
        if len(ids) <= max_tokens:
            pieces.append((paragraph, len(ids)))
        else:
            pieces += [(detokenize(window).strip(), len(window)) for window in _windows(ids, max_tokens, overlap)]
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


def split_passages(document: Document, tokenize: Tokenize, detokenize: Detokenize, max_tokens: int,
                   overlap_tokens: int) -> list[Passage]:
    """The document's passages, in order (see the module docstring for the rules). Sizes are counted on the joined
    text, as tokenizers merge across the paragraph separator."""
    if max_tokens < 8:
        raise InvalidArgument("max_tokens", f"must be >= 8, got {max_tokens}")
    if not 0 <= overlap_tokens < max_tokens:
        raise InvalidArgument("overlap_tokens", f"must be >= 0 and < max_tokens ({max_tokens}), got {overlap_tokens}")
    windows: list[list[str]] = []
    window: list[str] = []
    for piece, _ in _pieces(document.text, tokenize, detokenize, max_tokens, overlap_tokens):
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
