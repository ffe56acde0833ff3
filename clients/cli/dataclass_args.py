"""Command-line flags generated from config dataclasses, so each flag maps 1:1 onto a documented field.

Two ways to build the configs: `configs_from_args` takes flags only (`quiver train`); `sourced_configs_from_args`
(`quiver serve`, `quiver serve-ray`) also reads QUIVER_<FIELD> variables and a `--config` TOML file
(config_sources.py). The parsed namespace keeps each field's default, so `from_args` works for either; which flags
were actually given is recorded apart (_GIVEN), as a default cannot be told from the same value typed out.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar

from quiver.clients.cli.config_render import SECRET_FIELDS
from quiver.clients.cli.config_sources import LIST_SEPARATOR, env_name, field_types, flag_name, resolve

T = TypeVar("T")

_GIVEN = "_given_config_flags"
"""Namespace attribute: the dests of the config flags given on the command line."""


def _note_given(namespace: argparse.Namespace, dest: str) -> None:
    setattr(namespace, _GIVEN, {*getattr(namespace, _GIVEN, ()), dest})


class _Store(argparse.Action):
    """`store`, noting the flag as given."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        _note_given(namespace, self.dest)


class _Append(argparse.Action):
    """`append` (a repeatable flag), noting the flag as given."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), values])
        _note_given(namespace, self.dest)


class _Bool(argparse.BooleanOptionalAction):
    """`--name` / `--no-name`, noting the flag as given."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        super().__call__(parser, namespace, values, option_string)
        _note_given(namespace, self.dest)


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, *, env: bool = False) -> None:
    """Add one flag per field of dataclass `cls`; help comes from the field's `help` metadata (and names the
    field's QUIVER_<FIELD> variable where `env`)."""
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip())
    types = field_types(cls)
    for f in dataclasses.fields(cls):
        tp = types[f.name]
        help_text = f.metadata.get("help", "")
        variable = f"${env_name(f.name)}" if env else ""
        default_help = f" (default: %(default)s{'; ' + variable if env else ''})"
        kwargs: dict[str, Any] = {"dest": f"{cls.__name__}.{f.name}", "default": f.default}
        if typing.get_origin(tp) is Literal:
            kwargs.update(action=_Store, choices=list(typing.get_args(tp)), help=help_text + default_help)
        elif typing.get_origin(tp) is tuple:
            items = f" ({variable}, {LIST_SEPARATOR!r}-separated)" if env else ""
            kwargs.update(action=_Append, type=typing.get_args(tp)[0], help=help_text + items, default=None)
        elif tp is bool:  # BooleanOptionalAction appends the default itself
            kwargs.update(action=_Bool, help=help_text + (f" ({variable})" if env else ""))
        else:
            kwargs.update(action=_Store, type=tp, help=help_text + default_help)
        group.add_argument(flag_name(f.name), **kwargs)


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Build `cls` from the flags `add_dataclass_args` added (defaults where not given); the dataclass validates
    in __post_init__."""
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = getattr(args, f"{cls.__name__}.{f.name}")
        if value is None and f.default is not dataclasses.MISSING and f.default is not None:
            value = f.default  # a repeatable flag given zero times
        values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def _given_flags(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """Field -> value of the fields of `cls` whose flag the command line gave."""
    given: set[str] = getattr(args, _GIVEN, set())
    values = {}
    for f in dataclasses.fields(cls):
        dest = f"{cls.__name__}.{f.name}"
        if dest in given:
            value = getattr(args, dest)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return values


def add_log_level(parser: argparse.ArgumentParser, default: str = "INFO") -> None:
    """The `--log-level` flag the long-running commands share."""
    parser.add_argument("--log-level", default=default, choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def setup_logging(args: argparse.Namespace) -> None:
    """Configure logging from `--log-level` (see add_log_level)."""
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def add_config_arguments(parser: argparse.ArgumentParser, configs: Sequence[type]) -> None:
    """Every config's fields as flags, and --log-level: what a command built on typed configs from flags only
    takes."""
    for cls in configs:
        add_dataclass_args(parser, cls)
    add_log_level(parser)


def configs_from_args(args: argparse.Namespace, configs: Sequence[type]) -> list[Any]:
    """Logging set up, then each config from its flags; an invalid value raises ValueError naming the flag."""
    setup_logging(args)
    return [from_args(cls, args) for cls in configs]


def add_sourced_config_arguments(parser: argparse.ArgumentParser, sections: Mapping[str, type]) -> None:
    """Every config's fields as flags (each also settable by its variable and in the `--config` file), the
    `--config` and `--print-config` flags, and --log-level; `sections` maps each TOML table onto its config."""
    for cls in sections.values():
        add_dataclass_args(parser, cls, env=True)
    tables = ", ".join(f"[{name}]" for name in sections)
    group = parser.add_argument_group(
        "configuration sources",
        "Each flag --some-field can also be set by $QUIVER_SOME_FIELD (an empty variable counts as unset; booleans "
        f"take true/false, 1/0 or yes/no; lists are {LIST_SEPARATOR!r}-separated) or by `some_field` in its table "
        f"of the --config file ({tables}). A flag beats the variable, which beats the file, which beats the "
        "default.",
    )
    group.add_argument("--config", metavar="FILE", help="TOML file of settings, one table per config section")
    group.add_argument("--print-config", action="store_true",
                       help="print the effective configuration as TOML (--config reads it back) and exit")
    add_log_level(parser)


def sourced_configs_from_args(args: argparse.Namespace, sections: Mapping[str, type], *,
                              secrets_from_env: bool = True) -> dict[str, Any]:
    """Logging set up, then section -> config, each field from its flag, else $QUIVER_<FIELD>, else the --config
    file, else its default; an invalid value raises ValueError naming its source (flag, variable or file key).
    Without `secrets_from_env`, $QUIVER_API_KEY and $QUIVER_ADMIN_TOKEN stay for the server processes to read
    themselves (Ray Serve's replicas), so they never travel in an application's arguments."""
    setup_logging(args)
    flags = {section: _given_flags(args, cls) for section, cls in sections.items()}
    environ = os.environ if secrets_from_env else {
        k: v for k, v in os.environ.items() if k not in {env_name(f) for f in SECRET_FIELDS}}
    return resolve(sections, flags, environ, args.config)
