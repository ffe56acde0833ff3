"""`$QUIVER_ADMIN_TOKEN` protects adapter changes of a server started the way users start one: `quiver serve` as a
process with the token only in its environment. ImportAdapter (and HTTP's load route) is UNAUTHENTICATED / 401
without the token or with a wrong one and accepted with it; the `quiver adapters` command reads the same variable
on the client side. The server process takes ~10 s to import torch on two busy cores."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from quiver.clients.cli import main as cli
from quiver.clients.client import QuiverClient
from quiver.clients.errors import QuiverRpcError

from .grpc_front.cli_served import serve_configs

TOKEN = "env-t0ken"
START_TIMEOUT_S = 120.0
LISTENING = re.compile(r"^quiver: listening on [\d.]+:(\d+) \(gRPC\), HTTP on [\d.]+:(\d+); loading the model$")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Served:
    """`quiver serve` running as a process; stdout lines as they come."""

    def __init__(self, argv: list[str], env: dict[str, str], stderr: Path) -> None:
        with stderr.open("w") as err:
            self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        self.stderr = stderr
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, prefix: str) -> str:
        end = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < end and self.process.poll() is None:
            found = [line for line in self.lines if line.startswith(prefix)]
            if found:
                return found[0]
            time.sleep(0.05)
        pytest.fail(f"no {prefix!r} line (exit {self.process.poll()}); stdout {self.lines}; "
                    f"stderr:\n{self.stderr.read_text(errors='replace')[-4000:]}")


@pytest.fixture(scope="module")
def served(served_base_dir: Path, served_adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[str, str]]:
    """(gRPC target, HTTP base URL) of `quiver serve` with the admin token only in $QUIVER_ADMIN_TOKEN."""
    out = tmp_path_factory.mktemp("serve-admin")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUIVER_")}
    env |= {"QUIVER_ADMIN_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"}
    imports = str(served_adapter_dirs["lora"].parent)
    argv = [str(Path(sys.executable).with_name("quiver")), "serve", "--model", str(served_base_dir),
            "--host", "127.0.0.1", "--port", "0", "--http-port", str(_free_port()), "--metrics-port", "0",
            "--store", str(out / "store"), "--cache-dir", str(out / "cache"), "--device", "cpu",
            "--quantize", "none", "--import-roots", imports, "--drain-seconds", "1"]
    server = Served(argv, env, out / "stderr.txt")
    try:
        match = LISTENING.match(server.wait_line("quiver: listening on "))
        assert match is not None, server.lines
        server.wait_line("quiver: serving ")
        yield f"127.0.0.1:{match[1]}", f"http://127.0.0.1:{match[2]}"
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 0
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(10)


def test_import_adapter_needs_the_token_from_the_servers_environment(served: tuple[str, str],
                                                                     served_adapter_dirs: dict[str, Path]):
    target, _ = served
    path = str(served_adapter_dirs["lora"])
    for token, problem in ((None, "missing"), ("not-" + TOKEN, "wrong")):
        with QuiverClient(target, admin_token=token) as client, pytest.raises(QuiverRpcError) as refused:
            client.import_adapter(path, "imported")
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED and problem in refused.value.details, token
    with QuiverClient(target) as client:
        with pytest.raises(QuiverRpcError) as missing:
            client.get_adapter("imported")  # nothing refused was stored
        assert missing.value.code == grpc.StatusCode.NOT_FOUND
    with QuiverClient(target, admin_token=TOKEN) as admin:
        info = admin.import_adapter(path, "imported")
        assert (info.name, info.version, info.kind) == ("imported", 1, "lora")
    with QuiverClient(target) as client:  # inference needs no token (no --api-key)
        assert client.generate("w9 w8", adapter="imported", max_new_tokens=3).completion_tokens == 3


def test_http_load_route_needs_the_token_too(served: tuple[str, str], served_adapter_dirs: dict[str, Path]):
    _, http = served
    body = {"lora_name": "loaded-over-http", "lora_path": str(served_adapter_dirs["prompt"])}
    for headers in ({}, {"Authorization": f"Bearer not-{TOKEN}"}):
        refused = httpx.post(f"{http}/v1/load_lora_adapter", json=body, headers=headers, timeout=30)
        assert refused.status_code == 401, (headers, refused.text)
    accepted = httpx.post(f"{http}/v1/load_lora_adapter", json=body, headers={"Authorization": f"Bearer {TOKEN}"},
                          timeout=30)
    assert accepted.status_code == 200, accepted.text
    assert "loaded-over-http" in {m["id"] for m in httpx.get(f"{http}/v1/models", timeout=30).json()["data"]}


def test_the_adapters_command_reads_the_token_from_its_environment(served: tuple[str, str],
                                                                   served_adapter_dirs: dict[str, Path],
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]):
    target, _ = served
    register = ["adapters", "register", str(served_adapter_dirs["prefix"]), "--name", "by-cli", "--server", target]
    monkeypatch.delenv("QUIVER_ADMIN_TOKEN", raising=False)
    capsys.readouterr()
    assert cli(register) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: UNAUTHENTICATED: ") and "missing" in err, err
    monkeypatch.setenv("QUIVER_ADMIN_TOKEN", TOKEN)
    assert cli(register) == 0
    assert capsys.readouterr().out.strip() == "by-cli@1"
    assert cli(["adapters", "delete", "by-cli", "--server", target]) == 0
    assert capsys.readouterr().out.strip() == "by-cli@1"


def test_serve_builds_the_token_from_the_environment_and_a_flag_wins(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]):
    store = ["--store", str(tmp_path / "store")]
    monkeypatch.setenv("QUIVER_ADMIN_TOKEN", TOKEN)
    assert serve_configs(store)["adapters"].admin_token == TOKEN
    assert serve_configs([*store, "--admin-token", "from-flag"])["adapters"].admin_token == "from-flag"
    capsys.readouterr()
    assert cli(["serve", *store, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert TOKEN not in printed and re.search(r"admin_token.*set, redacted", printed), printed
    monkeypatch.setenv("QUIVER_ADMIN_TOKEN", "")  # empty counts as unset
    assert serve_configs(store)["adapters"].admin_token is None
