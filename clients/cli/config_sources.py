"""Where a config field's value comes from: the command line, the environment, a TOML file, or the field's default.

One precedence, flag > environment > file > default, for every field of every config dataclass a command takes.
Each value keeps the name of its source (`--max-running`, `QUIVER_MAX_RUNNING`, `quiver.toml: [engine]
max_running`) so that every error, from parsing or from a dataclass's own `__post_init__`, names the place the user
has to fix.

Invariants the rest of the CLI relies on:
- field `name` <-> flag `--name-with-dashes` <-> variable `QUIVER_NAME` <-> file key `[section] name`;
- an empty variable counts as unset (as `QUIVER_ADMIN_TOKEN=` always has);
- a list field's variable separates items with LIST_SEPARATOR; empty items are dropped;
- a higher source replaces a lower one's value whole (a list from a flag is not merged with the file's);
- no source can set a field to None: an unset `X | None` field keeps its default.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

ENV_PREFIX = "QUIVER_"
LIST_SEPARATOR = ","
"""Separates the items of a `tuple[str, ...]` field in its environment variable (`QUIVER_IMPORT_ROOTS=/a,/b`)."""
TRUE_WORDS = frozenset({"true", "1", "yes"})
FALSE_WORDS = frozenset({"false", "0", "no"})

_FLAG_TOKEN = re.compile(r"--[a-z0-9]+(?:-[a-z0-9]+)*")


@dataclass(frozen=True)
class Sourced:
    """A field's value and the name of where it came from, as an error message should name it."""

    value: Any
    source: str


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def field_types(cls: type) -> dict[str, Any]:
    """Each field's type with `X | None` unwrapped to X: None is what "unset" means, never a value to parse."""
    hints = typing.get_type_hints(cls)
    return {f.name: _unwrap_optional(hints[f.name]) for f in dataclasses.fields(cls)}


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


# --- the environment ------------------------------------------------------------------------------------------


def parse_text(text: str, tp: Any, source: str) -> Any:
    """An environment variable's text as a value of field type `tp`; ValueError naming `source` if it is not one."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if str(choice) == text:
                return choice
        raise ValueError(f"{source}: invalid choice {text!r} (choose from {', '.join(map(str, choices))})")
    if origin is tuple:
        item_type = typing.get_args(tp)[0]
        return tuple(parse_text(item, item_type, source) for item in text.split(LIST_SEPARATOR) if item)
    if tp is bool:
        word = text.strip().lower()
        if word in TRUE_WORDS | FALSE_WORDS:
            return word in TRUE_WORDS
        raise ValueError(f"{source}: invalid boolean {text!r} (use true/false, 1/0 or yes/no)")
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise ValueError(f"{source}: invalid {tp.__name__} value {text!r}") from None
    if tp is str:
        return text
    raise TypeError(f"unsupported config field type {tp!r}")


def read_environment(cls: type, environ: Mapping[str, str]) -> dict[str, Sourced]:
    """The fields of `cls` that `environ` sets (a non-empty QUIVER_<FIELD>), parsed."""
    found = {}
    for name, tp in field_types(cls).items():
        variable = env_name(name)
        if text := environ.get(variable):
            found[name] = Sourced(parse_text(text, tp, variable), variable)
    return found


# --- the TOML file --------------------------------------------------------------------------------------------


def read_file(path: str, sections: Mapping[str, type]) -> dict[str, dict[str, Sourced]]:
    """Section -> field -> value of the TOML file at `path`: one table per section, keys named as the fields.

    Unknown tables and keys, and values of the wrong TOML type, are ValueErrors naming them; an unreadable or
    malformed file is a ValueError naming the file.
    """
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as e:
        raise ValueError(f"--config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: {e}") from None
    tables = ", ".join(f"[{name}]" for name in sections)
    found: dict[str, dict[str, Sourced]] = {}
    for section, table in document.items():
        if not isinstance(table, dict):
            raise ValueError(f"{path}: {section}: unknown key (settings go in the tables {tables})")
        if section not in sections:
            raise ValueError(f"{path}: unknown table [{section}] (expected {tables})")
        types_ = field_types(sections[section])
        found[section] = {}
        for key, value in table.items():
            source = f"{path}: [{section}] {key}"
            if key not in types_:
                raise ValueError(f"{source}: unknown key (expected one of {', '.join(types_)})")
            found[section][key] = Sourced(check_value(value, types_[key], source), source)
    return found


def check_value(value: Any, tp: Any, source: str) -> Any:
    """A TOML value as field type `tp` (an array becomes a tuple, an integer a float where a float is due).

    Type errors do not echo the value: it may be a secret.
    """
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if any(value == choice and type(value) is type(choice) for choice in choices):
            return value
        raise ValueError(f"{source}: invalid choice {value!r} (choose from {', '.join(map(str, choices))})")
    if origin is tuple:
        if not isinstance(value, list):
            raise ValueError(f"{source}: expected an array, got {_toml_kind(value)}")
        item_type = typing.get_args(tp)[0]
        return tuple(check_value(item, item_type, source) for item in value)
    number = isinstance(value, int | float) and not isinstance(value, bool)
    fits = {bool: isinstance(value, bool), int: number and isinstance(value, int), float: number,
            str: isinstance(value, str)}.get(tp)
    if fits is None:
        raise TypeError(f"unsupported config field type {tp!r}")
    if not fits:
        raise ValueError(f"{source}: expected {_KINDS[tp]}, got {_toml_kind(value)}")
    return float(value) if tp is float else value


_KINDS: dict[Any, str] = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
                          list: "an array", dict: "a table"}


def _toml_kind(value: Any) -> str:
    return next((kind for tp, kind in _KINDS.items() if isinstance(value, tp)), "a date or time")


# --- precedence and validation --------------------------------------------------------------------------------


def resolve(sections: Mapping[str, type], flags: Mapping[str, Mapping[str, Any]], environ: Mapping[str, str],
            config_file: str | None) -> dict[str, Any]:
    """Section -> config instance, each field from its flag, else its variable, else the file, else its default.

    `flags` holds, per section, only the fields given on the command line. Any invalid value or combination is a
    ValueError naming its source.
    """
    from_file = read_file(config_file, sections) if config_file is not None else {}
    configs = {}
    for section, cls in sections.items():
        values = {**from_file.get(section, {}), **read_environment(cls, environ)}
        values.update({name: Sourced(value, flag_name(name)) for name, value in flags.get(section, {}).items()})
        configs[section] = build(cls, values)
    return configs


def build(cls: type, values: Mapping[str, Sourced]) -> Any:
    """`cls(**values)`; a ValueError from its `__post_init__` names each field by its source.

    `__post_init__` messages name fields by their flag (server/config.py's convention); a flag whose value came
    from the environment or the file is replaced by that source's name.
    """
    try:
        return cls(**{name: sourced.value for name, sourced in values.items()})
    except ValueError as e:
        raise ValueError(_name_sources(str(e), values)) from None


def _name_sources(message: str, values: Mapping[str, Sourced]) -> str:
    def source(match: re.Match[str]) -> str:
        sourced = values.get(match.group()[2:].replace("-", "_"))
        return sourced.source if sourced is not None else match.group()

    return _FLAG_TOKEN.sub(source, message)
