"""`quiver serve`'s configuration sources: flags, QUIVER_<FIELD> variables and a `--config` TOML file, merged as
flag > environment > file > default; `--print-config`; errors naming their source; secrets never shown.

Every test parses a real command line with the real parser; none loads a model (one starts `quiver serve` on a
model path that does not exist, to see the start-up log line).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import subprocess
import sys
import time
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, NamedTuple

import pytest

from quiver.clients.cli import main, serve, serve_ray, train
from quiver.clients.cli.config_render import SECRET_FIELDS, config_toml, toml_value
from quiver.clients.cli.config_sources import env_name, field_types
from quiver.clients.cli.dataclass_args import configs_from_args, sourced_configs_from_args

QUIVER = Path(sys.executable).with_name("quiver")  # the console script of this environment
FILE = "quiver.toml"
SECRETS = ("s3cret-admin-token", "s3cret-api-key")
TRICKY = 'we"ird \\ dir\twith\nall ünïcode-名前'


def _field_variables() -> set[str]:
    classes = {*serve.CONFIGS, *serve_ray.CONFIGS, *train.CONFIGS}
    return {env_name(f.name) for cls in classes for f in dataclasses.fields(cls)}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No QUIVER_<FIELD> variable of the developer's shell leaks in; files are written to a fresh directory."""
    for variable in _field_variables():
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir(tmp_path)


def configs(*argv: str, command: types.ModuleType = serve) -> dict[str, Any]:
    """Section -> config as `quiver serve ARGV` (or another command taking sourced configs) builds them."""
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return sourced_configs_from_args(parser.parse_args(argv), command.SECTIONS)


def write_config(text: str) -> None:
    Path(FILE).write_text(text)


def serve_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The usage error `quiver serve ARGV` fails with (exit status 2, as report_usage_error gives)."""
    assert main(["serve", "--print-config", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


def printed(capsys: pytest.CaptureFixture[str], *argv: str, command: str = "serve") -> str:
    assert main([command, "--print-config", *argv]) == 0
    return capsys.readouterr().out


def subprocess_env(**variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _field_variables()}
    return {**env, **variables}


# --- precedence -----------------------------------------------------------------------------------------------


class Layers(NamedTuple):
    section: str
    field: str
    default: Any
    file_toml: str
    env_text: str
    flag_argv: tuple[str, ...]
    from_file: Any
    from_env: Any
    from_flag: Any


LAYERS = [
    Layers("engine", "max_running", 32, "5", "4", ("--max-running", "3"), 5, 4, 3),
    Layers("engine", "preempt", False, "true", "No", ("--preempt",), True, False, True),
    Layers("model", "device", "auto", '"cpu"', "cuda", ("--device", "cpu"), "cpu", "cuda", "cpu"),
    Layers("adapters", "import_roots", (), '["/f1", "/f2"]', "/e1,/e2",
           ("--import-roots", "/a", "--import-roots", "/b"), ("/f1", "/f2"), ("/e1", "/e2"), ("/a", "/b")),
    Layers("server", "served_model_name", None, '"file-name"', "env-name", ("--served-model-name", "flag-name"),
           "file-name", "env-name", "flag-name"),
]


@pytest.mark.parametrize("layers", LAYERS, ids=[case.field for case in LAYERS])
def test_flag_beats_environment_beats_file_beats_default(layers: Layers, monkeypatch: pytest.MonkeyPatch) -> None:
    def value(*argv: str) -> Any:
        return getattr(configs(*argv)[layers.section], layers.field)

    assert value() == layers.default
    write_config(f"[{layers.section}]\n{layers.field} = {layers.file_toml}\n")
    assert value("--config", FILE) == layers.from_file
    monkeypatch.setenv(env_name(layers.field), layers.env_text)
    assert value("--config", FILE) == layers.from_env
    assert value("--config", FILE, *layers.flag_argv) == layers.from_flag


@pytest.mark.parametrize(("text", "expected"), [("true", True), ("TRUE", True), ("yes", True), ("1", True),
                                                ("false", False), ("No", False), ("0", False)])
def test_boolean_variables_take_true_false_yes_no_one_zero(text: str, expected: bool,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUIVER_REFLECTION", text)
    assert configs()["server"].reflection is expected


def test_an_empty_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """As `QUIVER_ADMIN_TOKEN=` always meant no token (and --admin-token refuses an empty one)."""
    monkeypatch.setenv("QUIVER_ADMIN_TOKEN", "")
    monkeypatch.setenv("QUIVER_MAX_RUNNING", "")
    resolved = configs()
    assert resolved["adapters"].admin_token is None
    assert resolved["engine"].max_running == 32


def test_the_secrets_variables_keep_working(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUIVER_ADMIN_TOKEN", SECRETS[0])
    monkeypatch.setenv("QUIVER_API_KEY", SECRETS[1])
    resolved = configs()
    assert (resolved["adapters"].admin_token, resolved["server"].api_key) == SECRETS
    assert configs("--api-key", "from-flag")["server"].api_key == "from-flag"


def test_serve_ray_leaves_the_secret_variables_to_its_replicas(capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve's application arguments are visible in its dashboard and config: the replicas read the secrets'
    variables from their own environment instead (server/api/core.py access_policy)."""
    monkeypatch.setenv("QUIVER_ADMIN_TOKEN", SECRETS[0])
    monkeypatch.setenv("QUIVER_API_KEY", SECRETS[1])
    monkeypatch.setenv("QUIVER_ENGINE_REPLICAS", "3")
    text = printed(capsys, command="serve-ray")
    assert "# admin_token = (unset)" in text and "# api_key = (unset)" in text
    assert tomllib.loads(text)["ray"]["engine_replicas"] == 3  # every other variable still applies
    assert "# admin_token = (set, redacted)" in printed(capsys)  # `quiver serve` runs the server itself


def test_flags_only_commands_ignore_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """`quiver train` shares field names with `serve` (model, device, admin_token): it reads no QUIVER_<FIELD>."""
    monkeypatch.setenv("QUIVER_EPOCHS", "9")
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(["--data", "rows.jsonl", "--output", "adapter"])
    train_config = configs_from_args(args, train.CONFIGS)[2]
    assert train_config.epochs == 3.0


def test_serve_ray_takes_the_same_sources(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    monkeypatch.setenv("QUIVER_ENGINE_REPLICAS", "3")
    write_config("[ray]\nengine_cpus = 2\n")
    document = tomllib.loads(printed(capsys, "--config", FILE, command="serve-ray"))
    assert list(document) == ["model", "engine", "adapters", "ray"]
    assert (document["ray"]["engine_replicas"], document["ray"]["engine_cpus"]) == (3, 2.0)


# --- errors name their source ---------------------------------------------------------------------------------


def test_a_bad_number_in_the_environment_names_the_variable(capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUIVER_MAX_RUNNING", "many")
    assert serve_error(capsys) == "error: QUIVER_MAX_RUNNING: invalid int value 'many'\n"


@pytest.mark.parametrize(("variable", "text"), [("QUIVER_PREEMPT", "maybe"), ("QUIVER_DEVICE", "tpu")])
def test_a_bad_word_in_the_environment_names_the_variable(variable: str, text: str,
                                                          capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(variable, text)
    assert serve_error(capsys).startswith(f"error: {variable}: invalid ")


@pytest.mark.parametrize(("toml", "message"), [
    ('[model]\ndevice = "tpu"\n', "quiver.toml: [model] device: invalid choice 'tpu' (choose from auto, cuda, cpu)"),
    ("[engine]\nmax_runing = 3\n", "quiver.toml: [engine] max_runing: unknown key"),
    ("[engines]\nmax_running = 3\n", "quiver.toml: unknown table [engines] (expected [model], [engine], [server], "
                                     "[adapters])"),
    ("max_running = 3\n", "quiver.toml: max_running: unknown key (settings go in the tables [model],"),
    ('[engine]\nmax_running = "3"\n', "quiver.toml: [engine] max_running: expected an integer, got a string"),
    ("[engine]\nmax_running = true\n", "quiver.toml: [engine] max_running: expected an integer, got a boolean"),
    ("[engine]\nmax_running = [1]\n", "quiver.toml: [engine] max_running: expected an integer, got an array"),
    ("[adapters]\nimport_roots = \"/a\"\n", "quiver.toml: [adapters] import_roots: expected an array, got a string"),
    ("[engine\n", "quiver.toml: "),
], ids=["choice", "key", "table", "flat-key", "string-for-int", "bool-for-int", "array-for-int", "string-for-list",
        "syntax"])
def test_a_bad_file_names_the_key(toml: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    write_config(toml)
    assert serve_error(capsys, "--config", FILE).startswith(f"error: {message}")


def test_a_secret_of_the_wrong_type_is_not_echoed(capsys: pytest.CaptureFixture[str]) -> None:
    write_config("[adapters]\nadmin_token = 987654321\n")
    error = serve_error(capsys, "--config", FILE)
    assert error == "error: quiver.toml: [adapters] admin_token: expected a string, got an integer\n"


def test_a_missing_file_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert serve_error(capsys, "--config", "absent.toml") == (
        "error: --config absent.toml: No such file or directory\n")


@pytest.mark.parametrize(("source", "named"), [
    ("flag", "--max-running"), ("env", "QUIVER_MAX_RUNNING"), ("file", "quiver.toml: [engine] max_running")])
def test_a_dataclass_check_names_the_source_of_the_value(source: str, named: str, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["--max-running", "0"] if source == "flag" else []
    if source == "env":
        monkeypatch.setenv("QUIVER_MAX_RUNNING", "0")
    write_config("[engine]\nmax_running = 0\n" if source == "file" else "")
    assert serve_error(capsys, "--config", FILE, *argv) == f"error: {named} must be >= 1\n"


def test_a_bad_combination_names_each_source(capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    write_config("[engine]\nmax_new_tokens_limit = 100\n")
    monkeypatch.setenv("QUIVER_DEFAULT_MAX_NEW_TOKENS", "200")
    assert serve_error(capsys, "--config", FILE) == (
        "error: QUIVER_DEFAULT_MAX_NEW_TOKENS must not exceed quiver.toml: [engine] max_new_tokens_limit\n")


# --- --print-config -------------------------------------------------------------------------------------------


def test_print_config_reads_back_to_the_same_configs(capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    write_config('[engine]\nmax_running = 7\npack_cpu_weights = false\n[adapters]\nstore = "s3://bucket/prefix"\n')
    monkeypatch.setenv("QUIVER_DEVICE", "cpu")
    argv = ["--config", FILE, "--model", TRICKY, "--preempt", "--no-reflection", "--served-model-name", "name",
            "--import-roots", "/r1", "--import-roots", "/with,comma"]
    effective = configs(*argv)
    Path("printed.toml").write_text(printed(capsys, *argv))
    monkeypatch.delenv("QUIVER_DEVICE")
    assert configs("--config", "printed.toml") == effective


def _changed(cls: type) -> Any:
    """`cls` with every field but the secrets set to a valid value other than its default."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp, default = field_types(cls)[f.name], typing.cast(Any, f.default)
        if f.name in SECRET_FIELDS:
            continue
        if typing.get_origin(tp) is Literal:
            values[f.name] = next(choice for choice in typing.get_args(tp) if choice != default)
        elif typing.get_origin(tp) is tuple:
            values[f.name] = ("/a", "/with,comma")
        elif tp is bool:
            values[f.name] = not default
        elif tp in (int, float):
            values[f.name] = (default or 0) + (1 if tp is int else 0.5)
        else:
            values[f.name] = TRICKY
    return cls(**values)


@pytest.mark.parametrize("command", [serve, serve_ray], ids=["serve", "serve-ray"])
def test_every_field_reads_back_from_the_printed_config(command: types.ModuleType) -> None:
    changed = {section: _changed(cls) for section, cls in command.SECTIONS.items()}
    Path("printed.toml").write_text(config_toml(changed))
    assert configs("--config", "printed.toml", command=command) == changed


@pytest.mark.parametrize("value", [0, -3, 2**40, 0.1, 2.5e-07, 1e300, -0.0, math.inf, -math.inf, True, False, "",
                                   TRICKY, "\x7f\x00", (), ("a", TRICKY)])
def test_toml_values_read_back(value: Any) -> None:
    read = tomllib.loads(f"v = {toml_value(value)}")["v"]
    assert (tuple(read) if isinstance(read, list) else read) == value
    assert type(read) is (list if isinstance(value, tuple) else type(value))


def test_print_config_comments_out_unset_fields(capsys: pytest.CaptureFixture[str]) -> None:
    text = printed(capsys)
    assert "# store = (unset)\n" in text
    document = tomllib.loads(text)
    assert "store" not in document["adapters"]
    assert document["adapters"]["import_roots"] == []


def test_secrets_are_never_printed(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUIVER_API_KEY", SECRETS[1])
    text = printed(capsys, "--admin-token", SECRETS[0])
    assert not any(secret in text for secret in SECRETS)
    assert "# admin_token = (set, redacted)\n" in text
    assert "# api_key = (set, redacted)\n" in text
    # Read back, the secrets are unset; the rest is the same.
    Path("printed.toml").write_text(text)
    monkeypatch.delenv("QUIVER_API_KEY")
    reread = configs("--config", "printed.toml")
    assert reread["adapters"].admin_token is None and reread["server"].api_key is None
    assert reread == configs()


def test_help_names_each_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    assert all(f"${env_name(name)}" in help_text for name in ("max_running", "preempt", "import_roots", "api_key"))


# --- as a process ---------------------------------------------------------------------------------------------


def test_the_console_script_prints_the_config_fast() -> None:
    started = time.monotonic()
    done = subprocess.run([str(QUIVER), "serve", "--print-config"], capture_output=True, text=True, timeout=60,
                          env=subprocess_env(QUIVER_MAX_RUNNING="7"), check=False)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 10, "--print-config should not import torch or load a model"
    assert tomllib.loads(done.stdout)["engine"]["max_running"] == 7


def test_print_config_imports_neither_torch_nor_the_server_app() -> None:
    code = ("import sys; from quiver.clients.cli import main; code = main(['serve', '--print-config']); "
            "heavy = [m for m in ('torch', 'transformers', 'quiver.server.app') if m in sys.modules]; "
            "sys.exit(f'imported {heavy}' if heavy else code)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=subprocess_env(), check=False)
    assert done.returncode == 0, done.stderr


def test_serve_logs_the_effective_configuration_before_loading_the_model(tmp_path: Path) -> None:
    """One line, secrets redacted, before the model loads (here: fails to, its path being absent)."""
    env = subprocess_env(QUIVER_API_KEY=SECRETS[1], QUIVER_MAX_RUNNING="5", HOME=str(tmp_path),
                         QUIVER_CACHE_DIR=str(tmp_path / "cache"), QUIVER_STORE_DIR=str(tmp_path / "store"))
    done = subprocess.run([str(QUIVER), "serve", "--model", str(tmp_path / "absent"), "--admin-token", SECRETS[0]],
                          capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 1, done.stderr
    assert not any(secret in done.stderr + done.stdout for secret in SECRETS)
    lines = done.stderr.splitlines()
    logged = [i for i, line in enumerate(lines) if "quiver.config: effective configuration: " in line]
    assert len(logged) == 1, done.stderr
    line = lines[logged[0]]
    assert "engine.max_running=5" in line and f'model.model="{tmp_path / "absent"}"' in line
    assert "adapters.admin_token=(set, redacted)" in line and "server.api_key=(set, redacted)" in line
    assert logged[0] < next(i for i, line in enumerate(lines) if line.startswith("error: "))
