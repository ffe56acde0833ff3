"""The adapter admin service every front calls: register from a directory (an upload or a path under the
operator's import roots), list, read and delete. gRPC's AdapterService (server/grpc_front/adapter_service.py)
and the HTTP front's vLLM-compatible routes (server/http/admin.py) translate onto these methods, so a path is
checked and a name refused the same way on both.

Every method blocks on disk I/O; async callers run them in a worker thread.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from quiver.adapters.names import parse_ref
from quiver.adapters.registry import AdapterRegistry, RegistrationOptions
from quiver.adapters.store import StoredAdapter
from quiver.common.errors import FailedPrecondition, InvalidArgument, NotFound, QuiverError

_PAGE = 500


class AdapterCatalog:
    """Registration, listing, resolution and deletion over one registry. `fingerprint` is the served base model's:
    only adapters registered for it are listed or served (a store may be shared by servers of several bases);
    `reserved` names are the served base model's id, which no adapter may take (a request's `model` must name one
    thing)."""

    def __init__(self, registry: AdapterRegistry, fingerprint: str, import_roots: tuple[Path, ...] = (),
                 reserved: frozenset[str] = frozenset()) -> None:
        self.registry = registry
        self._fingerprint = fingerprint
        self._import_roots = tuple(root.resolve() for root in import_roots)
        self._reserved = reserved
        self.on_registration: Callable[[str | None, QuiverError | None], None] | None = None
        """Told of every registration: the adapter's kind when accepted, the error when refused (metrics)."""
        self.on_deletion: Callable[[builtins.list[StoredAdapter]], None] | None = None
        """Told of every deletion's adapters (the engine drops them from its host tier)."""
        self._servable_count: tuple[float, int] | None = None  # (when counted, count)

    def resolve(self, ref: str, field: str = "adapter") -> StoredAdapter:
        """The adapter a request names, for serving: NotFound if there is none, FailedPrecondition if it was
        registered for another base."""
        stored = self.registry.store.get(parse_ref(ref, field=field))
        if stored.metadata.base_fingerprint != self._fingerprint:
            raise FailedPrecondition(
                f"adapter {ref!r} was registered for base {stored.metadata.base_fingerprint}, "
                f"not for this server's base {self._fingerprint}"
            )
        return stored

    def servable(self) -> Iterator[StoredAdapter]:
        """The latest version of every adapter registered for this base, by name."""
        return (s for s in self.latest() if s.metadata.base_fingerprint == self._fingerprint)

    def register(self, directory: Path, options: RegistrationOptions, field: str = "options.name") -> StoredAdapter:
        """Validate the PEFT adapter in `directory` against the base and store it (the directory may be removed
        afterwards)."""
        try:
            if options.name in self._reserved:
                raise InvalidArgument(field, f"{options.name!r} is the served base model's id; choose another name")
            stored = self.registry.register(directory, options)
        except QuiverError as e:
            self._registered(None, e)
            raise
        self._registered(stored.metadata.kind, None)
        return stored

    def _registered(self, kind: str | None, error: QuiverError | None) -> None:
        self._servable_count = None
        if self.on_registration is not None:
            self.on_registration(kind, error)

    def count_servable(self, max_age_s: float = 30.0) -> int:
        """How many adapters this server can serve, counted at most every `max_age_s` seconds (a store may be
        shared: other servers register too) and again after this server registers or deletes one."""
        now = time.monotonic()
        if self._servable_count is None or now - self._servable_count[0] > max_age_s:
            self._servable_count = (now, sum(1 for _ in self.servable()))
        return self._servable_count[1]

    def import_path(self, raw: str, options: RegistrationOptions, field: str = "path",
                    name_field: str = "options.name") -> StoredAdapter:
        """Register the adapter directory `raw`, an absolute path under one of the server's import roots."""
        return self.register(self.importable(raw, field), options, name_field)

    def importable(self, raw: str, field: str = "path") -> Path:
        """`raw` resolved, if it is a directory under an import root with no link leading out of it."""
        if not self._import_roots:
            raise FailedPrecondition("importing from server paths is disabled: the server has no --import-roots")
        path = Path(raw)
        if not path.is_absolute() or "\x00" in raw:
            raise InvalidArgument(field, "must be an absolute path")
        try:
            resolved = path.resolve()
            if not any(resolved.is_relative_to(root) for root in self._import_roots):
                raise InvalidArgument(field, "is not under any of the server's import roots")
            if not resolved.is_dir():
                raise InvalidArgument(field, "is not a directory")
            for child in resolved.iterdir():
                if child.is_symlink() and not child.resolve().is_relative_to(resolved):
                    raise InvalidArgument(field, f"{child.name} links outside the adapter directory")
        except OSError as e:  # a name too long, a loop of links, no permission: the path is the caller's mistake
            raise InvalidArgument(field, f"cannot be read: {e.strerror or type(e).__name__}") from None
        return resolved

    def page(self, page_size: int, page_token: str = "") -> tuple[builtins.list[StoredAdapter], str]:
        """One page of adapters (the latest version of each name), by name."""
        return self.registry.store.list(page_size, page_token)

    def latest(self) -> Iterator[StoredAdapter]:
        """Every adapter's latest version, by name, a page at a time."""
        token = ""
        while True:
            page, token = self.page(_PAGE, token)
            yield from page
            if not token:
                return

    def get(self, ref: str, field: str = "adapter") -> tuple[StoredAdapter, builtins.list[int]]:
        """The adapter `ref` names (`name` or `name@version`) and every version its name has."""
        parsed = parse_ref(ref, field=field)
        stored = self.registry.store.get(parsed)
        return stored, [v.metadata.version for v in self.registry.store.versions(parsed.name)]

    def delete(self, ref: str, field: str = "adapter") -> builtins.list[StoredAdapter]:
        """Delete one version (`name@version`) or every version of a name; running requests finish on theirs."""
        deleted = self.registry.store.delete(parse_ref(ref, field=field))
        self._servable_count = None
        if self.on_deletion is not None:
            self.on_deletion(deleted)
        return deleted

    def taken_reserved(self) -> builtins.list[str]:
        """Reserved names an adapter in the store already has (registered before, or offline)."""
        taken = []
        for name in sorted(self._reserved):
            try:
                self.registry.store.versions(name)
            except (NotFound, InvalidArgument):  # none, or not even a valid adapter name
                continue
            taken.append(name)
        return taken
