"""Documents and passages of `quiver data synth`, split with the default model's real tokenizer."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from quiver.common.errors import InvalidArgument
from quiver.training.passages import Document, paragraphs, read_documents, split_passages

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def tokenizer(default_checkpoint: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(default_checkpoint), local_files_only=True)


def split(tokenizer: Any, text: str, max_tokens: int, overlap: int) -> list[Any]:
    return split_passages(Document("doc.md", text), tokens(tokenizer), max_tokens, overlap)


def tokens(tokenizer: Any) -> Any:
    return lambda text: list(tokenizer(text, add_special_tokens=False).input_ids)


def paragraph(i: int, words: int = 12) -> str:
    return f"Paragraph {i} says " + " ".join(f"fact{i}x{j}" for j in range(words)) + "."


def test_passages_respect_the_budget_and_cover_every_paragraph_on_paragraph_boundaries(tokenizer: Any):
    parts = [paragraph(i, 6 + i % 5) for i in range(20)]
    passages = split(tokenizer, "\n\n".join(parts), max_tokens=120, overlap=0)
    assert len(passages) > 3
    assert all(p.tokens <= 120 for p in passages)
    pieces = [piece for p in passages for piece in p.text.split("\n\n")]
    assert pieces == parts  # no overlap asked: every paragraph once, in order, never cut
    assert [p.index for p in passages] == list(range(len(passages)))


def test_overlap_repeats_the_last_paragraphs_that_fit(tokenizer: Any):
    parts = [paragraph(i, words=5) for i in range(16)]  # ~25 tokens each: one or two fit in the overlap
    passages = split(tokenizer, "\n\n".join(parts), max_tokens=150, overlap=60)
    assert len(passages) > 2
    for before, after in itertools.pairwise(passages):
        previous, following = before.text.split("\n\n"), after.text.split("\n\n")
        shared = next(k for k in range(len(previous), 0, -1) if following[:k] == previous[-k:])
        assert len(tokenizer(after.text.split("\n\n" + following[shared])[0] if shared < len(following)
                             else after.text).input_ids) <= 60
        assert len(tokenizer("\n\n".join(previous[-shared - 1:])).input_ids) > 60  # no more than fits is repeated
    assert {piece for p in passages for piece in p.text.split("\n\n")} == set(parts)
    assert all(p.tokens <= 150 for p in passages)


def test_a_paragraph_longer_than_the_budget_is_cut_between_words(tokenizer: Any):
    # Multi-byte characters: token windows of a byte-level tokenizer would cut them in half.
    long = " ".join(f"café{i} naïve—“mot{i}” 東京{i}" for i in range(120))
    giant = "https://example.org/" + "x" * 600  # one word longer than a passage
    passages = split(tokenizer, f"Intro.\n\n{long} {giant}\n\nOutro.", max_tokens=64, overlap=8)
    assert len(passages) > 5
    assert all(p.tokens <= 64 for p in passages)
    assert passages[0].text.startswith("Intro.") and passages[-1].text.endswith("Outro.")
    text = " ".join(p.text for p in passages)
    assert "\ufffd" not in text
    words = [w for p in passages for w in p.text.split()]
    assert set(long.split()) <= set(words)  # every word whole in some passage
    assert "".join(w for w in words if w.startswith(("https", "x")) and "x" in w).count("x") >= 600


def test_ids_are_stable_and_distinct(tokenizer: Any):
    text = "\n\n".join(paragraph(i) for i in range(10))
    first, second = split(tokenizer, text, 100, 20), split(tokenizer, text, 100, 20)
    assert [p.id for p in first] == [p.id for p in second]
    assert len({p.id for p in first}) == len(first)
    other = split_passages(Document("other.md", text), tokens(tokenizer), 100, 20)
    assert not {p.id for p in first} & {p.id for p in other}  # the source is part of the id


def test_bad_budgets_are_refused(tokenizer: Any):
    with pytest.raises(InvalidArgument, match="overlap_tokens"):
        split(tokenizer, "text", 64, 64)
    with pytest.raises(InvalidArgument, match="max_tokens"):
        split(tokenizer, "text", 4, 0)


def test_read_documents_from_files_folders_and_jsonl(tmp_path: Path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("# B\n\nSecond.\n")
    (tmp_path / "docs" / "a.txt").write_text("First.\n")
    (tmp_path / "docs" / "skip.py").write_text("print('not a document')\n")
    (tmp_path / "docs" / "empty.txt").write_text("  \n")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"body": "Row one."}) + "\n\n" + json.dumps({"body": "Row two."}) + "\n")
    documents = read_documents([tmp_path / "docs", rows], text_field="body")
    assert [d.text.strip() for d in documents] == ["First.", "# B\n\nSecond.", "Row one.", "Row two."]
    assert documents[2].source == f"{rows}:1" and documents[3].source == f"{rows}:3"


def test_read_documents_errors_name_the_problem(tmp_path: Path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": 3}) + "\n")
    with pytest.raises(InvalidArgument, match=r"rows\.jsonl:1: no string field 'text'"):
        read_documents([rows])
    with pytest.raises(InvalidArgument, match="neither a file nor a folder"):
        read_documents([tmp_path / "missing"])
    (tmp_path / "blank.md").write_text("\n")
    with pytest.raises(InvalidArgument, match="no document text"):
        read_documents([tmp_path / "blank.md"])


def test_paragraphs_split_on_blank_lines_only():
    assert paragraphs("a\nb\n\n  \nc\r\n\r\nd") == ["a\nb", "c", "d"]
