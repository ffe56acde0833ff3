"""`quiver adapters ... --store DIR`: the same commands work on a store directory with no server running."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quiver.clients.cli import main

from ..adapters.adapter_factory import make_lora, make_prompt_tuning
from ..conftest import write_tiny_checkpoint


def test_offline_register_list_show_delete(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    base = write_tiny_checkpoint(tmp_path / "base")
    store = tmp_path / "store"
    offline = ["--store", str(store)]
    lora = make_lora(base, tmp_path / "lora", r=4)
    prompt = make_prompt_tuning(base, tmp_path / "prompt", num_virtual_tokens=3)

    assert main(["adapters", "register", str(lora), "--name", "sum", *offline, "--model", str(base)]) == 0
    assert capsys.readouterr().out.strip() == "sum@1"
    assert main(["adapters", "register", str(prompt), "--name", "tone", *offline, "--model", str(base),
                 "--prompt-template", "Rewrite politely: {input}"]) == 0
    assert capsys.readouterr().out.strip() == "tone@1"

    assert main(["adapters", "list", "--json", *offline]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["name"], r["kind"], r["rank"], r["num_virtual_tokens"]) for r in rows] == [
        ("sum", "lora", 4, None), ("tone", "prompt_tuning", None, 3)]
    assert main(["adapters", "show", "tone", "--json", *offline]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_template"] == "Rewrite politely: {input}"

    # A LoRA for another base is refused offline just as the server refuses it.
    other = write_tiny_checkpoint(tmp_path / "other", hidden_size=32, intermediate_size=64)
    foreign = make_lora(other, tmp_path / "foreign", r=4)
    assert main(["adapters", "register", str(foreign), "--name", "foreign", *offline, "--model", str(base)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "error:" in captured.err

    assert main(["adapters", "delete", "sum", *offline]) == 0
    assert capsys.readouterr().out.strip() == "sum@1"
    assert main(["adapters", "show", "sum", *offline]) == 1
    assert "not found" in capsys.readouterr().err.lower()
