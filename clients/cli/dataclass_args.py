"""Command-line flags generated from config dataclasses, so each flag maps 1:1 onto a documented field."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, TypeVar

T = TypeVar("T")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(tp: Any) -> Any:
    """`X | None` -> X; other types unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of dataclass `cls`; help comes from the field's `help` metadata."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip())
    for f in dataclasses.fields(cls):
        tp = _unwrap_optional(hints[f.name])
        help_text = f.metadata.get("help", "")
        default = f.default
        kwargs: dict[str, Any] = {"dest": f"{cls.__name__}.{f.name}", "default": default}
        if typing.get_origin(tp) is Literal:
            kwargs.update(choices=list(typing.get_args(tp)), help=f"{help_text} (default: %(default)s)")
        elif typing.get_origin(tp) is tuple:
            kwargs.update(action="append", type=typing.get_args(tp)[0], help=help_text)
            kwargs["default"] = None
        elif tp is bool:
            kwargs.update(action=argparse.BooleanOptionalAction, help=help_text)
        else:
            kwargs.update(type=tp, help=f"{help_text} (default: %(default)s)")
        group.add_argument(_flag(f.name), **kwargs)


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Build `cls` from the flags `add_dataclass_args` added; the dataclass validates in __post_init__."""
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = getattr(args, f"{cls.__name__}.{f.name}")
        if value is None and f.default is not dataclasses.MISSING and f.default is not None:
            value = f.default  # a repeatable flag given zero times
        values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def add_log_level(parser: argparse.ArgumentParser, default: str = "INFO") -> None:
    """The `--log-level` flag the long-running commands share."""
    parser.add_argument("--log-level", default=default, choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def setup_logging(args: argparse.Namespace) -> None:
    """Configure logging from `--log-level` (see add_log_level)."""
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def add_config_arguments(parser: argparse.ArgumentParser, configs: Sequence[type]) -> None:
    """Every config's fields as flags, and --log-level: what a command built on typed configs takes."""
    for cls in configs:
        add_dataclass_args(parser, cls)
    add_log_level(parser)


def configs_from_args(args: argparse.Namespace, configs: Sequence[type]) -> list[Any]:
    """Logging set up, then each config from its flags; an invalid value raises ValueError naming the flag."""
    setup_logging(args)
    return [from_args(cls, args) for cls in configs]
