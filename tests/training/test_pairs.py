"""`quiver data pairs` against a real server on a tiny random Llama: the judge's best and worst samples, the same
pairs for the same seed, reference pairs against the base model prompted with the instruction, and the CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from quiver.clients.cli import main
from quiver.clients.client import QuiverClient
from quiver.training.pairs import PairsConfig, make_pairs
from quiver.training.synth import request_seed

from ..server_thread import ServerThread

PROMPTS = 12


def highest_first_word(prompt: str, completion: str, row: Mapping[str, Any]) -> float:
    """A judge by path: the number of the completion's first word (`w17` -> 17)."""
    first = completion.split()[0] if completion.split() else "w-1"
    return float(first.removeprefix("w")) if first.removeprefix("w").isdigit() else -1.0


JUDGE = f"{__name__}:highest_first_word"


@pytest.fixture(scope="module")
def server(loaded: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    srv = ServerThread(loaded, tmp_path_factory.mktemp("store"), http_port=0)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"text": f"w{i} w{i + 1}", "ref": f"w{i + 50} w{i + 51}"}) + "\n"
                            for i in range(PROMPTS)))
    return path


def pairs(server: ServerThread, prompts: Path, out: Path, **fields: Any) -> list[dict[str, Any]]:
    config = PairsConfig(server=server.target, prompts=str(prompts), out=str(out), prompt_field="text",
                         max_new_tokens=4, **fields)
    result = make_pairs(config)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert result.prompts == PROMPTS and result.pairs == len(rows) and result.ties == PROMPTS - len(rows)
    return rows


def test_the_judge_ranks_samples_and_the_seed_fixes_them(server: ServerThread, prompts: Path, tmp_path: Path):
    rows = pairs(server, prompts, tmp_path / "a.jsonl", judge=JUDGE, samples=3, temperature=1.5)
    assert len(rows) >= PROMPTS // 2
    for row in rows:
        assert row["chosen"] != row["rejected"] and row["chosen_score"] > row["rejected_score"]
        assert row["chosen_score"] == highest_first_word("", row["chosen"], {})
    with QuiverClient(server.target) as client:  # the samples are the server's, for the derived seeds
        first = rows[0]
        samples = [client.generate(first["prompt"], max_new_tokens=4, temperature=1.5,
                                   seed=request_seed(0, first["prompt"], f"sample{i}")).text.strip()
                   for i in range(3)]
    assert first["chosen"] in samples and first["rejected"] in samples
    assert pairs(server, prompts, tmp_path / "b.jsonl", judge=JUDGE, samples=3, temperature=1.5) == rows
    assert pairs(server, prompts, tmp_path / "c.jsonl", judge=JUDGE, samples=3, temperature=1.5, seed=1) != rows


def test_reference_pairs_reject_the_base_models_answer_to_the_instruction(server: ServerThread, prompts: Path,
                                                                          tmp_path: Path):
    rows = pairs(server, prompts, tmp_path / "ref.jsonl", reference_field="ref", samples=1, temperature=0.0,
                 instruction="w200 w201")
    assert len(rows) == PROMPTS
    with QuiverClient(server.target) as client:
        for i, row in enumerate(rows):
            assert row["prompt"] == f"w{i} w{i + 1}" and row["chosen"] == f"w{i + 50} w{i + 51}"
            templated = f"w200 w201\n\n{row['prompt']}\n\n"  # what `quiver train --instruction` trains with
            assert row["rejected"] == client.generate(templated, max_new_tokens=4, temperature=0.0).text.strip()


def test_the_command_line(server: ServerThread, prompts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "cli.jsonl"
    code = main(["data", "pairs", "--server", server.target, "--prompts", str(prompts), "--out", str(out),
                 "--prompt-field", "text", "--judge", JUDGE, "--samples", "3", "--temperature", "1.5",
                 "--max-new-tokens", "4"])
    assert code == 0
    assert f"pairs written to {out}" in capsys.readouterr().out
    assert [json.loads(line) for line in out.read_text().splitlines()] == pairs(
        server, prompts, tmp_path / "api.jsonl", judge=JUDGE, samples=3, temperature=1.5)
    assert main(["data", "pairs", "--server", server.target, "--prompts", str(prompts), "--out", str(out),
                 "--judge", "nonsense"]) == 2
    assert "KIND:ARGUMENT" in capsys.readouterr().err
    assert main(["data", "pairs", "--server", server.target, "--prompts", str(prompts), "--out", str(out)]) == 1
    assert "prompts.jsonl:1: needs non-empty string fields ['prompt']" in capsys.readouterr().err
    assert main(["data", "pairs", "--server", server.target, "--prompts", str(prompts), "--out", str(out),
                 "--temperature", "0"]) == 2
    assert "pairs need > 0" in capsys.readouterr().err
