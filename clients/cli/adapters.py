"""`quiver adapters`: register, list, show and delete task adapters, on a running server or offline on a store.

Every action runs against an `AdapterBackend`, chosen once from the flags: `ServerBackend` calls the server's
AdapterService; `StoreBackend` (`--store DIR`) works on a store directory in this process, the way the server
would, and imports quiver.adapters (torch) only then. Both yield the client's `AdapterInfo`, so both modes
print the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from quiver.clients.adapters_types import AdapterDetails, AdapterInfo, RegisterMode
from quiver.clients.cli.common import (
    EXIT_RPC_ERROR,
    add_server_argument,
    report_rpc_error,
    report_usage_error,
    tls_options,
)
from quiver.clients.client import QuiverClient
from quiver.clients.errors import QuiverRpcError
from quiver.common.errors import QuiverError

if TYPE_CHECKING:
    from quiver.adapters.metadata import AdapterMetadata
    from quiver.adapters.store import AdapterStore

HELP = "register, list, show or delete task adapters, on a server or offline on a store directory (--store)"

ADMIN_TOKEN_ENV = "QUIVER_ADMIN_TOKEN"
"""Environment variable holding the default `--admin-token`."""

MODES: dict[str, RegisterMode] = {"create": "create", "new-version": "new_version", "replace": "replace"}
"""`--mode` spellings -> the client's registration modes."""

STORE_PAGE_SIZE = 100
"""Adapters read per page when listing a store offline."""


class AdapterBackend(Protocol):
    """Where the actions run: a server, or a store directory."""

    def register(
        self, directory: Path, name: str, mode: RegisterMode, description: str, prompt_template: str | None,
        labels: tuple[str, ...] = (),
    ) -> AdapterInfo: ...

    def iter_adapters(self) -> Iterator[AdapterInfo]: ...

    def get(self, ref: str) -> AdapterDetails: ...

    def delete(self, ref: str) -> list[AdapterInfo]: ...

    def close(self) -> None: ...


class ServerBackend:
    """The actions as AdapterService calls; failures raise QuiverRpcError."""

    def __init__(self, target: str, admin_token: str | None, api_key: str | None = None,
                 tls: dict[str, str | None] | None = None) -> None:
        self._client = QuiverClient(target, admin_token=admin_token, api_key=api_key, **(tls or {}))

    def register(
        self, directory: Path, name: str, mode: RegisterMode, description: str, prompt_template: str | None,
        labels: tuple[str, ...] = (),
    ) -> AdapterInfo:
        return self._client.register_adapter(
            directory, name, mode=mode, description=description, prompt_template=prompt_template, labels=labels
        )

    def iter_adapters(self) -> Iterator[AdapterInfo]:
        return self._client.iter_adapters()

    def get(self, ref: str) -> AdapterDetails:
        return self._client.get_adapter(ref)

    def delete(self, ref: str) -> list[AdapterInfo]:
        return self._client.delete_adapter(ref)

    def close(self) -> None:
        self._client.close()


def info_from_metadata(metadata: AdapterMetadata) -> AdapterInfo:
    """The client's view of stored metadata, as the server would send it."""
    values = {f.name: getattr(metadata, f.name) for f in dataclasses.fields(AdapterInfo)}
    values["target_modules"] = tuple(values["target_modules"])
    values["prompt_template"] = values["prompt_template"] or None  # The wire cannot tell "" from none.
    return AdapterInfo(**values)


class StoreBackend:
    """The actions on a store directory, in this process; failures raise QuiverError.

    `model` is the base model registrations are validated against (None: the default model); only
    `register` loads its config, and nothing loads its weights.
    """

    def __init__(self, store: str, model: str | None) -> None:
        self._store_location = store
        self._model = model

    def register(
        self, directory: Path, name: str, mode: RegisterMode, description: str, prompt_template: str | None,
        labels: tuple[str, ...] = (),
    ) -> AdapterInfo:
        from quiver.adapters.registry import RegistrationOptions, open_registry

        registry = open_registry(self._store_location, self._model)
        options = RegistrationOptions(name=name, mode=mode, description=description, prompt_template=prompt_template,
                                      labels=labels or None)
        return info_from_metadata(registry.register(directory, options).metadata)

    def iter_adapters(self) -> Iterator[AdapterInfo]:
        store = self._store()
        page_token = ""
        while True:
            page, page_token = store.list(STORE_PAGE_SIZE, page_token)
            yield from (info_from_metadata(stored.metadata) for stored in page)
            if not page_token:
                return

    def get(self, ref: str) -> AdapterDetails:
        from quiver.adapters.names import parse_ref

        store = self._store()
        stored = store.get(parse_ref(ref))
        versions = [version.metadata.version for version in store.versions(stored.metadata.name)]
        return AdapterDetails(info_from_metadata(stored.metadata), sorted(versions))

    def delete(self, ref: str) -> list[AdapterInfo]:
        from quiver.adapters.names import parse_ref

        return [info_from_metadata(stored.metadata) for stored in self._store().delete(parse_ref(ref))]

    def close(self) -> None:
        pass

    def _store(self) -> AdapterStore:
        from quiver.adapters.stores import StoreOptions, open_store

        return open_store(StoreOptions(self._store_location))


def open_backend(args: argparse.Namespace) -> AdapterBackend:
    if args.store is not None:
        return StoreBackend(args.store, getattr(args, "model", None))
    return ServerBackend(args.server, args.admin_token, args.api_key, tls_options(args))


# --- output -------------------------------------------------------------------------------------------


def _json_values(info: AdapterInfo) -> dict[str, Any]:
    values = dataclasses.asdict(info)
    values["target_modules"] = list(info.target_modules)
    values["labels"] = list(info.labels)
    return values


def _text(value: object) -> str:
    """One `key: value` line's value: None as "-", booleans as yes/no, lists comma-separated, strings with newlines
    JSON-quoted."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, str) and not value.isprintable():
        return json.dumps(value)
    return str(value)


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _print_table(adapters: list[AdapterInfo]) -> None:
    header = ("NAME", "VERSION", "KIND", "RANK/TOKENS", "SIZE", "CREATED")
    rows = [
        (a.name, str(a.version), a.kind, _text(a.rank or a.num_virtual_tokens), _size(a.size_bytes), a.created_at)
        for a in adapters
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


# --- actions ------------------------------------------------------------------------------------------


def _register(backend: AdapterBackend, args: argparse.Namespace) -> None:
    labels = tuple(args.labels.split(",")) if args.labels else ()
    info = backend.register(Path(args.dir), args.name, MODES[args.mode], args.description, args.prompt_template,
                            labels)
    print(info.ref)


def _list(backend: AdapterBackend, args: argparse.Namespace) -> None:
    adapters = list(backend.iter_adapters())  # Every page first: a failure on a later one prints nothing.
    if args.json:
        for info in adapters:
            print(json.dumps(_json_values(info)))
    else:
        _print_table(adapters)


def _show(backend: AdapterBackend, args: argparse.Namespace) -> None:
    details = backend.get(args.ref)
    values = {**_json_values(details.adapter), "versions": details.versions}
    if args.json:
        print(json.dumps(values, indent=2))
    else:
        for key, value in values.items():
            print(f"{key}: {_text(value)}")


def _delete(backend: AdapterBackend, args: argparse.Namespace) -> None:
    for info in backend.delete(args.ref):
        print(info.ref)


Action = Callable[[AdapterBackend, argparse.Namespace], None]


# --- arguments ----------------------------------------------------------------------------------------


def _add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    add_server_argument(where)  # type: ignore[arg-type]  # A group takes add_argument like a parser.
    where.add_argument("--store", metavar="DIR|s3://BUCKET/PREFIX",
                       help="work offline on this adapter store (a directory or S3 location), without a server")
    parser.add_argument(
        "--admin-token",
        default=os.environ.get(ADMIN_TOKEN_ENV),
        metavar="TOKEN",
        help=f"the server's admin bearer token (default: ${ADMIN_TOKEN_ENV}, which keeps it out of `ps`)",
    )


def _add_register_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", help="PEFT adapter directory (its plain files are uploaded)")
    parser.add_argument("--name", required=True, help="name to register it under")
    parser.add_argument(
        "--mode",
        choices=list(MODES),
        default="create",
        help="if NAME exists: fail (create, the default), add a version (new-version), "
        "or add one and delete the older ones (replace)",
    )
    parser.add_argument("--description", default="", metavar="TEXT", help="free text stored with the adapter")
    parser.add_argument(
        "--prompt-template", metavar="TEXT", help="hard prompt with one {input}; overrides the adapter's own"
    )
    parser.add_argument("--labels", metavar="A,B,...",
                        help="a classification (SEQ_CLS) adapter's class names, by head output; overrides its own")
    parser.add_argument("--model", metavar="MODEL", help="with --store: base model to validate against (default model)")


def _add_list_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object per adapter and line")


def _add_show_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ref", metavar="NAME[@VERSION]", help="adapter (latest version unless VERSION is given)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")


def _add_delete_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ref", metavar="NAME[@VERSION]", help="one version, or every version of NAME")


# Action name -> (help, arguments, action).
ACTIONS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Action]] = {
    "register": ("validate and register an adapter directory; prints NAME@VERSION", _add_register_arguments, _register),
    "list": ("list the latest version of every adapter", _add_list_arguments, _list),
    "show": ("describe one adapter, one `key: value` per line", _add_show_arguments, _show),
    "delete": ("delete one version or all versions; prints each NAME@VERSION deleted", _add_delete_arguments, _delete),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="adapters_action", required=True, metavar="ACTION")
    for name, (help_text, add_action_arguments, action) in ACTIONS.items():
        action_parser = sub.add_parser(name, help=help_text, description=help_text)
        add_action_arguments(action_parser)
        _add_connection_arguments(action_parser)
        action_parser.set_defaults(_adapters_run=action)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "model", None) is not None and args.store is None:
        return report_usage_error(ValueError("--model needs --store: a server validates against its own model"))
    try:
        with closing(open_backend(args)) as backend:
            args._adapters_run(backend, args)
    except QuiverRpcError as e:
        return report_rpc_error(e)
    except (QuiverError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_RPC_ERROR
    except ValueError as e:
        return report_usage_error(e)
    return 0
