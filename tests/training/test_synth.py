"""`quiver data synth` against a real server on the default model: rows `quiver train` reads, the same rows for
the same seed, and a resumed run that ends where an uninterrupted one does, without duplicates."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from quiver.clients.cli import main
from quiver.common.errors import InvalidArgument
from quiver.training.data import DataSource, FieldMapping, read_examples
from quiver.training.synth import SynthConfig, synthesize
from quiver.training.synth_filters import support

from ..real_models import RealModels
from ..server_thread import ServerThread

pytestmark = pytest.mark.real_model

DOCUMENT = """# The lighthouse of Alexandria

The lighthouse of Alexandria was built on the island of Pharos in the third century BC. Sostratus of Cnidus
designed it, and the Ptolemaic kings paid for it.

It stood more than 100 metres tall, one of the tallest buildings of the ancient world. A fire burned at its top
at night, and mirrors reflected sunlight during the day.

Earthquakes damaged the tower between 956 and 1323. Its stones were later used to build the Citadel of Qaitbay,
which stands on the same site today.

# The Colossus of Rhodes

The Colossus of Rhodes was a bronze statue of the sun god Helios. The people of Rhodes built it after they
defended their city against a siege in 305 BC.

The statue was about 33 metres high. An earthquake in 226 BC broke it at the knees, and it lay on the ground for
more than 800 years.
"""
# Short replies keep the test quick; greedy decoding keeps it deterministic.
SETTINGS: dict[str, Any] = {"max_passage_tokens": 64, "overlap_tokens": 0, "max_new_tokens": 40, "questions": 2,
                            "concurrency": 4, "progress": False, "min_support": 0.5}


@pytest.fixture(scope="module")
def server(default_checkpoint: Path, real_models: RealModels, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerThread]:
    srv = ServerThread(real_models.get(), tmp_path_factory.mktemp("store"), http_port=0)
    srv.checkpoint = str(default_checkpoint)  # type: ignore[attr-defined]  # passages count its tokens
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def documents(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("docs") / "wonders.md"
    path.write_text(DOCUMENT)
    return path


def run(server: Any, documents: Path, out: Path, **overrides: Any) -> Any:
    config = SynthConfig(server=server.target, documents=(str(documents),), out=str(out),
                         tokenizer=server.checkpoint, **{**SETTINGS, **overrides})
    return synthesize(config)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(server: ServerThread, documents: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    out = tmp_path_factory.mktemp("full") / "qa.jsonl"
    return run(server, documents, out), out


def test_rows_are_supported_new_questions_that_train_reads(full_run: tuple[Any, Path]):
    result, out = full_run
    rows = lines(out)
    assert result.passages >= 4 and result.rows == len(rows) > 0
    progress = lines(Path(f"{out}.progress.jsonl"))
    assert len(progress) == result.passages  # every passage is recorded, also those that kept nothing
    assert sum(p["kept"] for p in progress) == len(rows)
    questions = [r["question"] for r in rows]
    assert len({q.lower() for q in questions}) == len(questions)
    for row in rows:
        assert set(row) == {"question", "context", "answer", "source", "passage_id"}
        assert row["question"].endswith("?") and row["answer"] and "\n\n" not in row["answer"]
        assert row["context"] in DOCUMENT  # whole paragraphs of the document
        assert support(row["answer"], row["context"]) >= SETTINGS["min_support"]
    examples, problems = read_examples(DataSource(out), FieldMapping("question", "answer"))
    assert not problems and [e.input for e in examples] == questions


def test_the_same_seed_writes_the_same_rows(server: ServerThread, documents: Path, full_run: tuple[Any, Path],
                                            tmp_path: Path):
    run(server, documents, tmp_path / "again.jsonl")
    assert lines(tmp_path / "again.jsonl") == lines(full_run[1])
    for seed, i in ((0, 0), (0, 1), (1, 0)):
        run(server, documents, tmp_path / f"sampled{seed}-{i}.jsonl", temperature=1.0, seed=seed, limit=2)
    first, again, other = ((lines(tmp_path / f"sampled{s}-{i}.jsonl"),
                            lines(tmp_path / f"sampled{s}-{i}.jsonl.progress.jsonl"))
                           for s, i in ((0, 0), (0, 1), (1, 0)))
    assert all(p["summary"] for p in first[1])  # sampled summaries (kept or not) are in the progress file
    assert first == again and first[1] != other[1]  # the seed, not the timing, decides the samples


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(server: ServerThread, documents: Path,
                                                            full_run: tuple[Any, Path], tmp_path: Path):
    out = tmp_path / "resumed.jsonl"
    first = run(server, documents, out, limit=2)
    assert first.passages == 2 and first.skipped == 0
    # A crash after a passage's rows were written but before its progress line: that passage is redone.
    progress = Path(f"{out}.progress.jsonl")
    progress.write_text("".join(line + "\n" for line in progress.read_text().splitlines()[:-1]))
    with out.open("a") as torn:  # and a crash in the middle of writing the next passage's first row
        torn.write('{"question": "Half a ro')
    second = run(server, documents, out)
    assert second.skipped == 1 and second.passages == full_run[0].passages
    assert lines(out) == lines(full_run[1])  # no duplicate of the redone passage's rows, nothing missing
    assert [p["passage_id"] for p in lines(progress)] == [p["passage_id"] for p in
                                                          lines(Path(f"{full_run[1]}.progress.jsonl"))]


def test_chat_rows_and_the_command_line(server: ServerThread, documents: Path, full_run: tuple[Any, Path],
                                        tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "chat.jsonl"
    code = main(["data", "synth", "--server", server.target, "--documents", str(documents), "--out", str(out),
                 "--row-format", "chat", "--no-progress", "--max-passage-tokens", "64", "--overlap-tokens", "0",
                 "--max-new-tokens", "40", "--questions", "2", "--concurrency", "4", "--min-support", "0.5",
                 "--tokenizer", server.checkpoint])  # type: ignore[attr-defined]
    assert code == 0
    assert f"rows written to {out}" in capsys.readouterr().out
    rows = lines(out)
    assert [{k: v for k, v in r.items() if k != "messages"} for r in rows] == lines(full_run[1])
    assert all(r["messages"] == [{"role": "user", "content": r["question"]},
                                 {"role": "assistant", "content": r["answer"]}] for r in rows)
    examples, problems = read_examples(DataSource(out))
    assert not problems and all(e.messages is not None for e in examples)


def test_a_passage_the_server_refuses_is_counted_and_left_for_a_rerun(server: ServerThread, documents: Path,
                                                                      tmp_path: Path):
    out = tmp_path / "refused.jsonl"
    result = run(server, documents, out, max_new_tokens=100_000)  # past the model's context: INVALID_ARGUMENT
    assert result.rows == 0 and result.dropped == {"request_failed_invalid_argument": result.passages}
    assert not Path(f"{out}.progress.jsonl").exists() or not lines(Path(f"{out}.progress.jsonl"))
    assert run(server, documents, out, limit=1).skipped == 0  # nothing was marked done


def test_an_output_file_it_did_not_write_is_refused(server: ServerThread, documents: Path, tmp_path: Path):
    out = tmp_path / "mine.jsonl"
    out.write_text('{"question": "Q?"}\nnot json\n{"question": "R?"}\n')
    with pytest.raises(InvalidArgument, match=r"mine\.jsonl:2: not JSON"):
        run(server, documents, out)
    assert out.read_text().count("\n") == 3  # untouched


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["data", "synth", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "--documents is required" in capsys.readouterr().err
    template = tmp_path / "bad.txt"
    template.write_text("no placeholder")
    code = main(["data", "synth", "--documents", str(tmp_path), "--out", str(tmp_path / "x.jsonl"),
                 "--summary-template", str(template), "--server", "127.0.0.1:1"])
    assert code == 1  # the template is checked before any request; a data error, not a flag error
    assert "missing {passage}" in capsys.readouterr().err
    assert main(["data", "synth", "--documents", "d", "--out", "o", "--overlap-tokens", "300"]) == 2
    assert "--overlap-tokens in [0, --max-passage-tokens)" in capsys.readouterr().err
