"""`quiver adapters` against the fake in-process AdapterService (server mode only)."""

from __future__ import annotations

import argparse
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from quiver.clients.cli import adapters, main
from quiver.v1 import adapters_pb2 as apb

from .fake_adapter_server import CREATED_AT, FakeAdapterServer, lora_info

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def server() -> Iterator[FakeAdapterServer]:
    with FakeAdapterServer() as srv:
        yield srv


@pytest.fixture
def fake(server: FakeAdapterServer, monkeypatch: pytest.MonkeyPatch) -> FakeAdapterServer:
    server.reset()
    monkeypatch.delenv("QUIVER_ADMIN_TOKEN", raising=False)
    monkeypatch.setenv("QUIVER_SERVER", server.target)
    return server


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (d / "adapter_model.safetensors").write_bytes(b"\x00\x01" * 1000)
    return d


def cli(*argv: str) -> int:
    """Runs `quiver adapters ARGV`, registered as quiver.clients.cli registers it (without `serve` and torch)."""
    parser = argparse.ArgumentParser(prog="quiver")
    sub = parser.add_subparsers(dest="command", required=True)
    command = sub.add_parser("adapters", help=adapters.HELP)
    adapters.add_arguments(command)
    command.set_defaults(_run=adapters.run)
    args = parser.parse_args(["adapters", *argv])
    code: int = args._run(args)
    return code


def unused_target() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def seed(fake: FakeAdapterServer) -> None:
    fake.adapters.add(lora_info("summarize", 1))
    fake.adapters.add(lora_info("summarize", 2, description="second", prompt_template="Summarize:\n{input}"))
    soft = lora_info(
        "soft",
        kind=apb.ADAPTER_KIND_PROMPT_TUNING,
        peft_type="PROMPT_TUNING",
        rank=0,
        num_virtual_tokens=20,
        target_modules=[],
        size_bytes=100,
    )
    fake.adapters.add(soft)


# --- register -----------------------------------------------------------------------------------------


def test_register_prints_the_reference(
    fake: FakeAdapterServer, adapter_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli("register", str(adapter_dir), "--name", "summarize") == 0
    assert capsys.readouterr() == ("summarize@1\n", "")
    files = {p.name: p.read_bytes() for p in adapter_dir.iterdir()}
    assert fake.adapters.uploads["summarize@1"] == files
    options = fake.adapters.calls[-1].request[0].options
    assert options == apb.RegistrationOptions(name="summarize", mode=apb.REGISTER_MODE_CREATE)
    assert not options.HasField("prompt_template")


@pytest.mark.parametrize(
    ("mode", "wire"), [("new-version", apb.REGISTER_MODE_NEW_VERSION), ("replace", apb.REGISTER_MODE_REPLACE)]
)
def test_register_flags_map_onto_the_options(
    fake: FakeAdapterServer, adapter_dir: Path, capsys: pytest.CaptureFixture[str], mode: str, wire: int
) -> None:
    seed(fake)
    flags = ["--mode", mode, "--description", "better", "--prompt-template", "S: {input}"]
    assert cli("register", str(adapter_dir), "--name", "summarize", *flags) == 0
    assert capsys.readouterr().out == "summarize@3\n"
    options = fake.adapters.calls[-1].request[0].options
    assert options == apb.RegistrationOptions(
        name="summarize", mode=wire, description="better", prompt_template="S: {input}"
    )


def test_register_an_existing_name_fails(
    fake: FakeAdapterServer, adapter_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed(fake)
    assert cli("register", str(adapter_dir), "--name", "summarize") == 1
    assert capsys.readouterr() == ("", "error: ALREADY_EXISTS: adapter 'summarize' already exists\n")


def test_register_a_missing_directory_fails_before_calling(
    fake: FakeAdapterServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli("register", str(tmp_path / "nope"), "--name", "summarize") == 1
    assert capsys.readouterr() == ("", f"error: {tmp_path / 'nope'}: no such directory\n")
    assert fake.adapters.calls == []


def test_unknown_mode_is_a_usage_error(adapter_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli("register", str(adapter_dir), "--name", "summarize", "--mode", "new_version")
    assert exit_.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# --- admin token --------------------------------------------------------------------------------------


def test_admin_token_flag(fake: FakeAdapterServer, adapter_dir: Path) -> None:
    fake.adapters.admin_token = TOKEN
    assert cli("register", str(adapter_dir), "--name", "summarize", "--admin-token", TOKEN) == 0
    assert cli("delete", "summarize", "--admin-token", TOKEN) == 0
    assert [c.metadata["authorization"] for c in fake.adapters.calls] == [f"Bearer {TOKEN}"] * 2


def test_admin_token_from_the_environment(
    fake: FakeAdapterServer, adapter_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUIVER_ADMIN_TOKEN", TOKEN)
    fake.adapters.admin_token = TOKEN
    assert cli("register", str(adapter_dir), "--name", "summarize") == 0
    assert fake.adapters.calls[-1].metadata["authorization"] == f"Bearer {TOKEN}"


def test_no_admin_token_sends_none_and_fails_where_one_is_needed(
    fake: FakeAdapterServer, capsys: pytest.CaptureFixture[str]
) -> None:
    seed(fake)
    fake.adapters.admin_token = TOKEN
    assert cli("delete", "summarize") == 1
    assert capsys.readouterr() == ("", "error: UNAUTHENTICATED: missing or wrong admin token\n")
    assert "authorization" not in fake.adapters.calls[-1].metadata
    assert "summarize" in fake.adapters.adapters


# --- list ---------------------------------------------------------------------------------------------

TABLE = f"""\
NAME       VERSION  KIND           RANK/TOKENS  SIZE     CREATED
soft       1        prompt_tuning  20           100 B    {CREATED_AT}
summarize  2        lora           8            4.0 KiB  {CREATED_AT}
"""


def test_list_prints_a_table(fake: FakeAdapterServer, capsys: pytest.CaptureFixture[str]) -> None:
    seed(fake)
    assert cli("list") == 0
    assert capsys.readouterr() == (TABLE, "")


def test_list_json_prints_one_object_per_line(fake: FakeAdapterServer, capsys: pytest.CaptureFixture[str]) -> None:
    seed(fake)
    assert cli("list", "--json") == 0
    soft, summarize = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert (soft["name"], soft["kind"], soft["rank"], soft["num_virtual_tokens"]) == ("soft", "prompt_tuning", None, 20)
    assert soft["prompt_template"] is None and soft["target_modules"] == []
    assert (summarize["version"], summarize["prompt_template"]) == (2, "Summarize:\n{input}")
    assert summarize["target_modules"] == ["q_proj", "v_proj"]
    assert len(summarize) == len(apb.AdapterInfo.DESCRIPTOR.fields)


def test_list_reads_every_page(fake: FakeAdapterServer, capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(101):
        fake.adapters.add(lora_info(f"a{i:03d}"))
    assert cli("list", "--json") == 0
    assert [json.loads(line)["name"] for line in capsys.readouterr().out.splitlines()] == [
        f"a{i:03d}" for i in range(101)
    ]
    assert len(fake.adapters.calls) == 2


def test_list_empty_prints_the_header(fake: FakeAdapterServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("list") == 0
    assert capsys.readouterr().out == "NAME  VERSION  KIND  RANK/TOKENS  SIZE  CREATED\n"


# --- show ---------------------------------------------------------------------------------------------

SHOW_LINES = f"""\
name: summarize
version: 2
kind: lora
peft_type: LORA
base_fingerprint: f1ngerpr1nt
base_architecture: FakeForCausalLM
size_bytes: 4096
num_parameters: 1024
rank: 8
num_virtual_tokens: -
target_modules: q_proj,v_proj
sha256: {"ab" * 32}
created_at: {CREATED_AT}
description: second
prompt_template: "Summarize:\\n{{input}}"
labels: 
versions: 1,2
"""


def test_show_prints_key_value_lines(fake: FakeAdapterServer, capsys: pytest.CaptureFixture[str]) -> None:
    seed(fake)
    assert cli("show", "summarize") == 0
    assert capsys.readouterr() == (SHOW_LINES, "")


def test_show_a_version(fake: FakeAdapterServer, capsys: pytest.CaptureFixture[str]) -> None:
    seed(fake)
    assert cli("show", "summarize@1") == 0
    lines = capsys.readouterr().out.splitlines()
    assert "version: 1" in lines and "prompt_template: -" in lines and "versions: 1,2" in lines
    assert fake.adapters.calls[-1].request.adapter == "summarize@1"


def test_show_json(fake: FakeAdapterServer, capsys: pytest.CaptureFixture[str]) -> None:
    seed(fake)
    assert cli("show", "soft", "--json") == 0
    values = json.loads(capsys.readouterr().out)
    assert values["versions"] == [1]
    assert (values["kind"], values["rank"], values["num_virtual_tokens"]) == ("prompt_tuning", None, 20)
    assert len(values) == len(SHOW_LINES.splitlines())


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_show_missing_fails(fake: FakeAdapterServer, capsys: pytest.CaptureFixture[str], json_flag: list[str]) -> None:
    assert cli("show", "nope", *json_flag) == 1
    assert capsys.readouterr() == ("", "error: NOT_FOUND: adapter 'nope' not found\n")


# --- delete -------------------------------------------------------------------------------------------


def test_delete_prints_each_deleted_version(fake: FakeAdapterServer, capsys: pytest.CaptureFixture[str]) -> None:
    seed(fake)
    assert cli("delete", "summarize") == 0
    assert capsys.readouterr() == ("summarize@1\nsummarize@2\n", "")
    assert cli("delete", "soft@1") == 0
    assert capsys.readouterr() == ("soft@1\n", "")
    assert fake.adapters.adapters == {}


def test_delete_missing_fails(fake: FakeAdapterServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("delete", "nope@3") == 1
    assert capsys.readouterr() == ("", "error: NOT_FOUND: adapter 'nope@3' not found\n")


# --- connection flags ---------------------------------------------------------------------------------


@pytest.mark.parametrize("action", [["list"], ["show", "x"], ["delete", "x"]])
def test_unreachable_server(capsys: pytest.CaptureFixture[str], action: list[str]) -> None:
    assert cli(*action, "--server", unused_target()) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"error: {grpc.StatusCode.UNAVAILABLE.name}: ")


def test_server_flag_overrides_the_environment(
    fake: FakeAdapterServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("QUIVER_SERVER", unused_target())
    assert cli("list", "--server", fake.target) == 0
    assert [c.method for c in fake.adapters.calls] == ["ListAdapters"]


def test_server_and_store_exclude_each_other(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli("list", "--server", "127.0.0.1:1", "--store", str(tmp_path))
    assert exit_.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_model_needs_store(fake: FakeAdapterServer, adapter_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("register", str(adapter_dir), "--name", "s", "--model", "some/model") == 2
    assert capsys.readouterr() == ("", "error: --model needs --store: a server validates against its own model\n")
    assert fake.adapters.calls == []


def test_an_action_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli()
    assert exit_.value.code == 2


def test_main_runs_adapters(fake: FakeAdapterServer, adapter_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["adapters", "register", str(adapter_dir), "--name", "summarize"]) == 0
    assert main(["adapters", "delete", "summarize", "--server", fake.target]) == 0
    assert capsys.readouterr() == ("summarize@1\nsummarize@1\n", "")
