"""Adapter names and references, the one way to turn client input into a path under the store, and
list-page tokens (an adapter name, opaque to clients).

Adapter names travel from clients straight into file system paths (`<store>/<name>/<version>/`), so they are
held to a small ASCII alphabet checked with `re.fullmatch` on the raw string: no separators, no `..`, no
whitespace or NUL, no unicode look-alikes, and no trailing newline (which `$` would let through). Every path
built from client input then goes through `safe_child`, which re-checks after symlink resolution that the
result stays inside the root.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from pathlib import Path

from quiver.common.errors import InvalidArgument

NAME_MAX_LEN = 64
# The first character is alphanumeric, so a name is never ".", "..", only dots, or a hidden file name.
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}", re.ASCII)
# Versions are positive decimal integers written without leading zeros, so each version has one spelling.
_VERSION_RE = re.compile(r"[1-9][0-9]{0,9}", re.ASCII)
MAX_VERSION = 2**31 - 1  # fits the proto's int32 fields
# A file stored inside an adapter version (adapter_config.json, adapter_model.safetensors, README.md...).
_FILE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", re.ASCII)
_TOKEN_PREFIX = b"after:"


@dataclass(frozen=True)
class AdapterRef:
    """A client's reference to an adapter: `name` or `name@version`."""

    name: str
    """A validated adapter name (see `validate_name`)."""
    version: int | None
    """A specific version (>= 1), or None for the latest one."""

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


def _describe(text: str) -> str:
    """The offending input for an error message, escaped so control characters cannot forge log lines."""
    return ascii(text[:80])


def validate_name(name: str, field: str = "adapter") -> str:
    """Return `name` unchanged if it is a valid adapter name, else raise InvalidArgument(field, ...)."""
    if not isinstance(name, str):
        raise InvalidArgument(field, f"expected a string, got {type(name).__name__}")
    if not name.isascii():
        raise InvalidArgument(field, f"adapter name {_describe(name)} contains non-ASCII characters")
    if _NAME_RE.fullmatch(name) is None:
        raise InvalidArgument(
            field,
            f"adapter name {_describe(name)} must be 1-{NAME_MAX_LEN} characters from [a-z0-9._-] "
            "starting with a letter or digit",
        )
    return name


def parse_version(text: str, field: str = "adapter") -> int:
    """Parse a version written as a positive decimal integer without sign or leading zeros."""
    if not text.isascii() or _VERSION_RE.fullmatch(text) is None:
        raise InvalidArgument(field, f"version {_describe(text)} must be a positive integer without leading zeros")
    version = int(text)
    if version > MAX_VERSION:
        raise InvalidArgument(field, f"version {version} is larger than {MAX_VERSION}")
    return version


def parse_ref(text: str, field: str = "adapter") -> AdapterRef:
    """Parse `name` or `name@version` into an AdapterRef; anything else raises InvalidArgument(field, ...)."""
    if not isinstance(text, str):
        raise InvalidArgument(field, f"expected a string, got {type(text).__name__}")
    name, sep, version = text.partition("@")
    if not sep:
        return AdapterRef(validate_name(name, field), None)
    return AdapterRef(validate_name(name, field), parse_version(version, field))


def validate_ref(ref: AdapterRef, field: str = "adapter") -> AdapterRef:
    """Re-check an AdapterRef that may have been built directly rather than by `parse_ref`."""
    validate_name(ref.name, field)
    if ref.version is not None and (
        isinstance(ref.version, bool) or not isinstance(ref.version, int) or not 1 <= ref.version <= MAX_VERSION
    ):
        raise InvalidArgument(field, f"version {ref.version!r} must be an integer in 1..{MAX_VERSION}")
    return ref


def validate_file_name(name: str, field: str = "files") -> str:
    """Return `name` if it is a plain file name (no separators, not hidden, ASCII), else raise InvalidArgument."""
    if not isinstance(name, str) or not name.isascii() or _FILE_NAME_RE.fullmatch(name) is None:
        raise InvalidArgument(
            field, f"file name {_describe(str(name))} must be 1-128 characters from [A-Za-z0-9._-], no leading dot"
        )
    return name


def safe_child(root: Path, *parts: str, field: str = "adapter") -> Path:
    """`root / parts...`, refusing anything that could leave `root`.

    Each part must be a single plain path component; no existing component below `root` may be a symlink
    (a planted link could point anywhere); and the resolved result must lie inside `root.resolve()`.
    Components that do not exist yet are allowed, so this also builds paths about to be created.
    """
    base = root.resolve()
    path = base
    for part in parts:
        validate_file_name(part, field)
        path = path / part
        if path.is_symlink():
            raise InvalidArgument(field, f"{_describe(part)} is a symbolic link inside the adapter store")
    if not path.resolve().is_relative_to(base):
        raise InvalidArgument(field, f"{_describe('/'.join(parts))} resolves outside the adapter store")
    return path


def encode_page_token(last_name: str) -> str:
    """An opaque list-page token meaning 'continue after this name'."""
    return base64.urlsafe_b64encode(_TOKEN_PREFIX + last_name.encode("ascii")).decode("ascii")


def decode_page_token(token: str) -> str | None:
    """The name a page token continues after, or None for "" (the first page); InvalidArgument if forged."""
    if token == "":
        return None
    try:
        if not isinstance(token, str) or len(token) > 256:
            raise ValueError("not a string of at most 256 characters")
        raw = base64.b64decode(token.encode("ascii"), altchars=b"-_", validate=True)
        if not raw.startswith(_TOKEN_PREFIX):
            raise ValueError("no prefix")
        return validate_name(raw[len(_TOKEN_PREFIX) :].decode("ascii"))
    except (ValueError, InvalidArgument) as e:  # binascii.Error and UnicodeError are ValueErrors
        raise InvalidArgument("page_token", "not a token returned by a previous list call") from e
