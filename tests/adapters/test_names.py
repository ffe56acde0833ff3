"""Adapter names and references: a corpus of valid and hostile inputs, and path confinement by safe_child."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from quiver.adapters.names import (
    AdapterRef,
    parse_ref,
    safe_child,
    validate_file_name,
    validate_name,
    validate_ref,
)
from quiver.common.errors import InvalidArgument

VALID_REFS = {
    "a": AdapterRef("a", None),
    "0": AdapterRef("0", None),
    "sentiment": AdapterRef("sentiment", None),
    "sql-v2.lora_r8": AdapterRef("sql-v2.lora_r8", None),
    "a..b": AdapterRef("a..b", None),  # dots inside a name are harmless: it is still one path component
    "x" * 64: AdapterRef("x" * 64, None),
    "sentiment@1": AdapterRef("sentiment", 1),
    "sentiment@42": AdapterRef("sentiment", 42),
    "a@2147483647": AdapterRef("a", 2**31 - 1),
}

INVALID_REFS = [
    "",
    ".",
    "..",
    "...",
    ".hidden",
    "-flag",
    "_x",
    "../x",
    "x/..",
    "/etc/passwd",
    "a/b",
    "a\\b",
    "x\x00",
    "\x00",
    "a b",
    " a",
    "a\t",
    "a\n",  # `$` would accept this; fullmatch does not
    "a\r",
    "Sentiment",
    "ABC",
    "\uff21\uff22\uff23",  # fullwidth ABC look-alikes
    "\uff41",  # fullwidth a
    "e\u0301",  # e + combining acute accent
    "é",
    "ß",
    "\u0430",  # Cyrillic a
    "x" * 65,
    "a:b",
    "a*",
    "~a",
    "a@",
    "@1",
    "a@0",
    "a@00",
    "a@01",
    "a@-1",
    "a@+1",
    "a@1.0",
    "a@1e3",
    "a@ 1",
    "a@1\n",
    "a@\u0661",  # Arabic-Indic digit one: int() would accept it
    "a@\uff11",  # fullwidth digit one
    "a@1@2",
    "a@latest",
    "a@2147483648",
    "a@99999999999999999999999",
]


@pytest.mark.parametrize(("text", "expected"), VALID_REFS.items())
def test_valid_refs_parse(text: str, expected: AdapterRef) -> None:
    assert parse_ref(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize("text", INVALID_REFS)
def test_invalid_refs_are_refused_naming_the_field(text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_ref(text, field="adapter_id")
    assert caught.value.field == "adapter_id"
    assert "\n" not in caught.value.message and "\x00" not in caught.value.message  # escaped for logs


@pytest.mark.parametrize("value", [None, 3, b"abc"])
def test_non_strings_are_refused(value: object) -> None:
    with pytest.raises(InvalidArgument):
        parse_ref(value)  # type: ignore[arg-type]


def test_validate_name_refuses_versions() -> None:
    assert validate_name("abc") == "abc"
    with pytest.raises(InvalidArgument):
        validate_name("abc@1")


@pytest.mark.parametrize(
    "ref", [AdapterRef("../x", None), AdapterRef("a", 0), AdapterRef("a", -1), AdapterRef("a", True)]
)
def test_validate_ref_rechecks_hand_built_refs(ref: AdapterRef) -> None:
    with pytest.raises(InvalidArgument):
        validate_ref(ref)


@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors", "README.md", "x"])
def test_plain_file_names_are_accepted(name: str) -> None:
    assert validate_file_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", ".env", "a/b", "../x", "/abs", "a\\b", "x\x00", "a b", "é.json"])
def test_file_names_with_separators_or_dots_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument):
        validate_file_name(name)


def test_safe_child_builds_paths_inside_root(tmp_path: Path) -> None:
    assert safe_child(tmp_path, "a", "1") == tmp_path.resolve() / "a" / "1"  # need not exist yet
    (tmp_path / "a").mkdir()
    assert safe_child(tmp_path, "a") == tmp_path.resolve() / "a"


@pytest.mark.parametrize("parts", [("..",), ("a", ".."), ("/etc",), ("a/../..",), ("",), ("x\x00",)])
def test_safe_child_refuses_traversal(tmp_path: Path, parts: tuple[str, ...]) -> None:
    with pytest.raises(InvalidArgument):
        safe_child(tmp_path, *parts)


def test_safe_child_refuses_symlink_escaping_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "store", tmp_path / "outside"
    (outside / "1").mkdir(parents=True)
    root.mkdir()
    os.symlink(outside, root / "evil")
    with pytest.raises(InvalidArgument, match="symbolic link"):
        safe_child(root, "evil")
    with pytest.raises(InvalidArgument, match="symbolic link"):
        safe_child(root, "evil", "1")


def test_safe_child_refuses_symlinks_even_inside_root(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "alias")
    with pytest.raises(InvalidArgument):
        safe_child(tmp_path, "alias")


def test_safe_child_accepts_a_symlinked_root(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "root-link")
    assert safe_child(tmp_path / "root-link", "a") == (tmp_path / "real" / "a").resolve()
