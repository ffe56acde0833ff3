"""The effective configuration as text: the TOML `--print-config` prints (and `--config` reads back), and the one
line a starting server logs. Secrets never appear in either.

The printed TOML holds one table per section, keys named as the fields; a field whose value is None (unset) and
every secret are comments, since TOML has no null and a printed secret would leak. So reading the output back with
`--config` gives the same configs, secrets aside.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

SECRET_FIELDS = frozenset({"admin_token", "api_key"})
"""Fields never printed or logged; only whether they are set."""

log = logging.getLogger("quiver.config")

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_value(value: Any) -> str:
    """A str, int, float, bool or tuple/list of them as a TOML value."""
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)  # TOML spells them inf, -inf and nan
    if isinstance(value, str):
        return '"' + "".join(_escape(c) for c in value) + '"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def _escape(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    return f"\\u{ord(char):04x}" if ord(char) < 0x20 or ord(char) == 0x7F else char


def _unprintable(name: str, value: Any) -> str | None:
    """What stands for a value that is not shown, or None if the value may be shown."""
    if name in SECRET_FIELDS:
        return "(unset)" if value is None else "(set, redacted)"
    return "(unset)" if value is None else None


def config_toml(configs: Mapping[str, Any]) -> str:
    """Section -> config instance as a TOML document `--config` accepts."""
    lines = ["# The effective configuration: flags > environment (QUIVER_<FIELD>) > --config file > defaults.",
             "# Read it back with --config FILE; secrets are never printed."]
    for section, config in configs.items():
        lines += ["", f"[{section}]"]
        if doc := (type(config).__doc__ or "").strip():
            lines.append(f"# {doc.splitlines()[0]}")
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            hidden = _unprintable(f.name, value)
            lines.append(f"# {f.name} = {hidden}" if hidden else f"{f.name} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def config_line(configs: Mapping[str, Any]) -> str:
    """Section -> config instance as one line of `section.field=value` pairs, secrets redacted."""
    pairs = []
    for section, config in configs.items():
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            pairs.append(f"{section}.{f.name}={_unprintable(f.name, value) or toml_value(value)}")
    return " ".join(pairs)


def log_config(configs: Mapping[str, Any]) -> None:
    """Log the effective configuration, once, at start-up: what the server runs with, whichever source set it."""
    log.info("effective configuration: %s", config_line(configs))
