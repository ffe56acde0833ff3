"""`quiver adapters` in server mode against a real Quiver server, through the real `quiver` entry point: what each
action prints is what the Python client reads back from the server, and every refusal (existing name, unknown
adapter, missing or wrong admin token, unreachable server) exits 1 with the server's status on stderr."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from quiver.clients import AdapterInfo, QuiverClient
from quiver.clients.cli import main

from ..served import ADMIN
from ..server_thread import ServerThread
from .conftest import CLASSIFIER, SERVED, unused_target


@pytest.fixture
def adapters(server: ServerThread, admin: QuiverClient, monkeypatch: pytest.MonkeyPatch) -> Any:
    """`quiver adapters ARGV` in this process, with $QUIVER_SERVER and $QUIVER_ADMIN_TOKEN set as a user would."""
    monkeypatch.setenv("QUIVER_SERVER", server.target)
    monkeypatch.setenv("QUIVER_ADMIN_TOKEN", ADMIN)
    return lambda *argv: main(["adapters", *argv])


def json_values(info: AdapterInfo) -> dict[str, Any]:
    return {**dataclasses.asdict(info), "target_modules": list(info.target_modules), "labels": list(info.labels)}


# --- register -----------------------------------------------------------------------------------------


def test_register_prints_the_reference(adapters: Any, admin: QuiverClient, served_adapter_dirs: dict[str, Path],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert adapters("register", str(served_adapter_dirs["lora"]), "--name", "cli") == 0
    assert capsys.readouterr() == ("cli@1\n", "")
    stored = admin.get_adapter("cli").adapter
    assert (stored.sha256, stored.description, stored.prompt_template) == (
        admin.get_adapter("lora").adapter.sha256, "", None)


@pytest.mark.parametrize(("mode", "versions"), [("new-version", [1, 2]), ("replace", [2])])
def test_register_flags_map_onto_the_options(adapters: Any, admin: QuiverClient, served_adapter_dirs: dict[str, Path],
                                             capsys: pytest.CaptureFixture[str], mode: str, versions: list[int]
                                             ) -> None:
    admin.register_adapter(served_adapter_dirs["lora"], "cli")
    flags = ["--mode", mode, "--description", "better", "--prompt-template", "w9 {input}"]
    assert adapters("register", str(served_adapter_dirs["prompt"]), "--name", "cli", *flags) == 0
    assert capsys.readouterr().out == "cli@2\n"
    details = admin.get_adapter("cli")
    assert details.versions == versions
    assert (details.adapter.kind, details.adapter.description, details.adapter.prompt_template) == (
        "prompt_tuning", "better", "w9 {input}")


def test_register_labels(adapters: Any, admin: QuiverClient, classifier_dir: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    assert adapters("register", str(classifier_dir), "--name", "cli-cls", "--labels", "a,b,c") == 0
    assert capsys.readouterr().out == "cli-cls@1\n"
    assert admin.get_adapter("cli-cls").adapter.labels == ("a", "b", "c")
    assert list(admin.classify("w1", adapter="cli-cls")[0].probabilities) == ["a", "b", "c"]


def test_register_an_existing_name_fails(adapters: Any, served_adapter_dirs: dict[str, Path],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert adapters("register", str(served_adapter_dirs["prompt"]), "--name", "lora") == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ALREADY_EXISTS: adapter 'lora' already exists")


def test_register_a_missing_directory_fails_before_calling(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    # No server at the address: a call would fail UNAVAILABLE, not with the directory's error.
    assert main(["adapters", "register", str(tmp_path / "nope"), "--name", "x", "--server", unused_target()]) == 1
    assert capsys.readouterr() == ("", f"error: {tmp_path / 'nope'}: no such directory\n")


def test_unknown_mode_is_a_usage_error(served_adapter_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["adapters", "register", str(served_adapter_dirs["lora"]), "--name", "x", "--mode", "new_version"])
    assert exit_.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# --- the admin token ----------------------------------------------------------------------------------


def test_admin_token_flag(server: ServerThread, admin: QuiverClient, served_adapter_dirs: dict[str, Path],
                          monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("QUIVER_ADMIN_TOKEN", raising=False)
    where = ["--server", server.target, "--admin-token", ADMIN]
    assert main(["adapters", "register", str(served_adapter_dirs["lora"]), "--name", "cli", *where]) == 0
    assert main(["adapters", "delete", "cli", *where]) == 0
    assert capsys.readouterr() == ("cli@1\ncli@1\n", "")


@pytest.mark.parametrize(("token", "message"), [(None, "missing admin token"), ("wrong", "wrong admin token")])
def test_changes_without_the_right_token_fail(adapters: Any, admin: QuiverClient, served_adapter_dirs: dict[str, Path],
                                              monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                              token: str | None, message: str) -> None:
    """Register and delete are refused; list and show need no admin token."""
    monkeypatch.delenv("QUIVER_ADMIN_TOKEN")
    flags = ["--admin-token", token] if token else []
    for argv in (["delete", "lora"], ["register", str(served_adapter_dirs["lora"]), "--name", "x"]):
        assert adapters(*argv, *flags) == 1
        assert capsys.readouterr() == ("", f"error: UNAUTHENTICATED: {message}\n")
    assert [a.name for a in admin.iter_adapters()] == SERVED
    assert adapters("list", *flags) == 0 and adapters("show", "lora", *flags) == 0


# --- list ---------------------------------------------------------------------------------------------


def size_text(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB"  # the served adapters are all under 1 MiB


def test_list_prints_a_table(adapters: Any, admin: QuiverClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert adapters("list") == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "VERSION", "KIND", "RANK/TOKENS", "SIZE", "CREATED"]
    assert [row.split() for row in rows] == [
        [a.name, str(a.version), a.kind, str(a.rank or a.num_virtual_tokens), *size_text(a.size_bytes).split(),
         a.created_at] for a in admin.iter_adapters()]
    column = header.index("VERSION")  # aligned: every row's version starts under the header's
    assert column == max(map(len, SERVED)) + 2
    assert all(row[column - 2:column] == "  " and row[column].isdigit() for row in rows)


def test_list_json_prints_one_object_per_line(adapters: Any, admin: QuiverClient,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert adapters("list", "--json") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows == [json_values(a) for a in admin.iter_adapters()]
    assert [(r["name"], r["kind"], r["rank"] is None, r["num_virtual_tokens"] is None) for r in rows] == [
        (CLASSIFIER, "lora", False, True), ("lora", "lora", False, True), ("prefix", "prefix_tuning", True, False),
        ("prompt", "prompt_tuning", True, False)]


def test_list_reads_every_page(adapters: Any, admin: QuiverClient, served_adapter_dirs: dict[str, Path],
                               capsys: pytest.CaptureFixture[str]) -> None:
    """101 adapters: more than the one page (100) the CLI asks for at a time."""
    extra = [f"p{i:03d}" for i in range(101 - len(SERVED))]
    for name in extra:
        admin.import_adapter(str(served_adapter_dirs["prompt"]), name)
    assert adapters("list", "--json") == 0
    assert [json.loads(line)["name"] for line in capsys.readouterr().out.splitlines()] == sorted([*SERVED, *extra])


# --- show ---------------------------------------------------------------------------------------------


def test_show_prints_key_value_lines(adapters: Any, admin: QuiverClient, served_adapter_dirs: dict[str, Path],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    admin.import_adapter(str(served_adapter_dirs["lora"]), "shown", description="two\nlines")
    info = admin.import_adapter(str(served_adapter_dirs["prompt"]), "shown", mode="new_version",
                                prompt_template="w1:\n{input}")
    assert adapters("show", "shown") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["name: shown", "version: 2", "kind: prompt_tuning"]
    assert lines[-3:] == ["labels: ", "chat_template: no", "versions: 1,2"]
    assert f"sha256: {info.sha256}" in lines and f"created_at: {info.created_at}" in lines
    assert {"rank: -", "target_modules: ", f"num_virtual_tokens: {info.num_virtual_tokens}"} <= set(lines)
    assert 'prompt_template: "w1:\\n{input}"' in lines  # a newline is shown JSON-quoted, on one line
    assert len(lines) == len(dataclasses.fields(AdapterInfo)) + 1
    assert adapters("show", "shown@1") == 0
    first = capsys.readouterr().out.splitlines()
    assert "version: 1" in first and "prompt_template: -" in first and 'description: "two\\nlines"' in first


def test_show_json(adapters: Any, admin: QuiverClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert adapters("show", CLASSIFIER, "--json") == 0
    details = admin.get_adapter(CLASSIFIER)
    assert json.loads(capsys.readouterr().out) == {**json_values(details.adapter), "versions": details.versions}


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_show_missing_fails(adapters: Any, capsys: pytest.CaptureFixture[str], json_flag: list[str]) -> None:
    assert adapters("show", "nope", *json_flag) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: NOT_FOUND: adapter nope not found")


# --- delete -------------------------------------------------------------------------------------------


def test_delete_prints_each_deleted_version(adapters: Any, admin: QuiverClient, served_adapter_dirs: dict[str, Path],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    for _ in range(3):
        admin.import_adapter(str(served_adapter_dirs["prompt"]), "gone", mode="new_version")
    assert adapters("delete", "gone@2") == 0
    assert capsys.readouterr() == ("gone@2\n", "")
    assert adapters("delete", "gone") == 0
    assert capsys.readouterr() == ("gone@1\ngone@3\n", "")
    assert [a.name for a in admin.iter_adapters()] == SERVED


@pytest.mark.parametrize(("ref", "message"), [
    ("nope@3", "error: NOT_FOUND: adapter nope@3 not found"),
    ("Bad Name", "error: INVALID_ARGUMENT: adapter: adapter name 'Bad Name' must be"),
])
def test_delete_missing_fails(adapters: Any, capsys: pytest.CaptureFixture[str], ref: str, message: str) -> None:
    assert adapters("delete", ref) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(message)


# --- connection flags ---------------------------------------------------------------------------------


@pytest.mark.parametrize("action", [["list"], ["show", "x"], ["delete", "x"]])
def test_unreachable_server(capsys: pytest.CaptureFixture[str], action: list[str]) -> None:
    assert main(["adapters", *action, "--server", unused_target()]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: UNAVAILABLE: ")


def test_server_flag_overrides_the_environment(server: ServerThread, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("QUIVER_SERVER", unused_target())
    assert main(["adapters", "list", "--server", server.target]) == 0
    assert capsys.readouterr().out.count("\n") == 1 + len(SERVED)


def test_server_and_store_exclude_each_other(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["adapters", "list", "--server", "127.0.0.1:1", "--store", str(tmp_path)])
    assert exit_.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_model_needs_store(served_adapter_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["register", str(served_adapter_dirs["lora"]), "--name", "s", "--model", "some/model"]
    assert main(["adapters", *argv, "--server", unused_target()]) == 2
    assert capsys.readouterr() == ("", "error: --model needs --store: a server validates against its own model\n")


def test_an_action_is_required() -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["adapters"])
    assert exit_.value.code == 2
