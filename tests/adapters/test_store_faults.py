"""Store faults: a registration SIGKILLed at each of its steps (local directory and S3), a full disk, a corrupt
cached copy. Afterwards the store, opened afresh as a restarted server opens it, lists no partial version, every
version passes its checksums, the latest complete version is what serving resolves and loads, and registering works.

The kills are deterministic. A helper process imports the registration stack (torch) once and forks a child per
run, which runs the real registration (`open_registry(...).register`, as `quiver adapters register --store` does)
counting the store's state-changing calls (local: opens for writing, writes, fsyncs, mkdirs, renames, removals; S3:
every API call), and SIGKILLs itself just before the k-th, or halfway into the k-th write, for every k a counting run
found. The hooks live in the child only. The full disk is a 1 MiB tmpfs (root may mount, here and in CI), else a
loop-mounted ext4 image, else simulated (store writes fail with ENOSPC past a budget); QUIVER_TEST_SMALL_DISK
(tmpfs, ext4, simulated) forces one.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest
import torch
from safetensors.torch import load_file

from quiver.adapters import store as store_module
from quiver.adapters import version_cache as cache_module
from quiver.adapters.base_spec import BaseModelSpec, base_spec_from_checkpoint
from quiver.adapters.metadata import METADATA_FILE, sha256_file
from quiver.adapters.names import AdapterRef
from quiver.adapters.registry import AdapterRegistry, RegistrationOptions, open_registry
from quiver.adapters.store import CONFIG_DIGEST, CONFIG_FILE, WEIGHTS_FILE, LocalAdapterStore, StoredAdapter
from quiver.adapters.stores import StoreOptions, open_store
from quiver.adapters.validation import ValidationLimits
from quiver.common.errors import ResourceExhausted

NAME = "x"
ROOT = Path(__file__).resolve().parents[2]
MIN_RUNS = 20
SMALL_DISK_BYTES = 1 << 20

# --- the child: one registration, killed at a chosen step --------------------------------------------------------


class _Tracer:
    """Counts the steps of a registration; SIGKILLs the process just before step `kill_at` (halfway into it, for
    a write, with `half`)."""

    def __init__(self, kill_at: int | None, half: bool) -> None:
        self.kill_at, self.half = kill_at, half
        self.events: list[str] = []

    def step(self, label: str, half_done: Callable[[], object] | None = None) -> None:
        if len(self.events) == self.kill_at:
            if self.half and half_done is not None:
                half_done()
            os.kill(os.getpid(), signal.SIGKILL)
        self.events.append(label)


class _File:
    """A file whose every write goes through `before(data)` first."""

    def __init__(self, file: Any, before: Callable[[Any], object]) -> None:
        self._file, self._before = file, before

    def write(self, data: Any) -> int:
        self._before(data)
        return int(self._file.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __enter__(self) -> _File:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._file.close()


def _trace_local(tracer: _Tracer, root: Path) -> None:
    def inside(path: object) -> str | None:
        resolved = Path(os.fsdecode(path)).resolve()  # type: ignore[arg-type]
        return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else None

    def traced_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if not set(mode) & set("wxa") or (label := inside(file)) is None:
            return builtins.open(file, mode, *args, **kwargs)
        tracer.step(f"open {label}")
        f = builtins.open(file, mode, *args, **kwargs)  # noqa: SIM115  # the store closes it

        def half(data: Any) -> None:
            f.write(data[: len(data) // 2])
            f.flush()

        return _File(f, lambda data: tracer.step(f"write {label}", lambda: half(data)))

    def traced(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            paths = [inside(a) for a in args[:2] if isinstance(a, str | Path)]
            if name in ("fsync", "unlink", "rmdir") or any(p is not None for p in paths):
                tracer.step(f"{name} " + " -> ".join(p or "?" for p in paths))
            return real(*args, **kwargs)
        return call

    store_module.open = traced_open  # type: ignore[attr-defined]  # shadows the builtin in the store only
    store_module._COPY_CHUNK = 4096  # several writes per file, so kills land inside one
    for name in ("fsync", "mkdir", "rename", "unlink", "rmdir"):
        setattr(os, name, traced(name, getattr(os, name)))


def _trace_s3(tracer: _Tracer) -> None:
    from botocore.client import BaseClient

    real = BaseClient._make_api_call

    def traced(self: Any, operation: str, params: dict[str, Any]) -> Any:
        tracer.step(f"{operation} {params.get('Key', '')}".strip())
        return real(self, operation, params)

    BaseClient._make_api_call = traced  # type: ignore[method-assign]


def _child(job: dict[str, Any]) -> NoReturn:
    code = 1
    try:
        os.environ.update(job["env"])
        registry = open_registry(job["store"], job["model"])
        tracer = _Tracer(job["kill_at"], job["half"])
        if job["store"].startswith("s3://"):
            _trace_s3(tracer)
        else:
            _trace_local(tracer, Path(job["store"]).resolve())
        registry.register(Path(job["source"]), RegistrationOptions(NAME, mode=job["mode"]))
        tracer.step("done")
        Path(job["events"]).write_text(json.dumps(tracer.events))
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def _serve_forks() -> None:
    """The helper process: fork one child per job read from stdin; answer how each ended."""
    import boto3

    boto3.client("s3", region_name="us-east-1")  # loads botocore's models into the default session, once
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            _child(json.loads(line))
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        print(json.dumps({"killed": killed, "exit": os.waitstatus_to_exitcode(status)}), flush=True)


# --- the parent: runs, kill points, and what must hold after each -----------------------------------------------


class Forks:
    """The helper process, started once per module."""

    def __init__(self) -> None:
        command = [sys.executable, "-m", "tests.adapters.test_store_faults"]
        self._proc = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, **job: Any) -> dict[str, Any]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(job) + "\n")
        self._proc.stdin.flush()
        answer: dict[str, Any] = json.loads(self._proc.stdout.readline())
        return answer

    def close(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        self._proc.wait(timeout=30)


@dataclass(frozen=True)
class World:
    """What every run shares: the base checkpoint, its spec, adapter sources (one per version number), a tmp dir."""

    forks: Forks
    model: Path
    base: BaseModelSpec
    sources: dict[int, Path]
    tmp: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    forks = Forks()  # imports while the adapters are made
    from ..conftest import write_tiny_checkpoint
    from .adapter_factory import make_lora

    tmp = tmp_path_factory.mktemp("faults")
    model = write_tiny_checkpoint(tmp / "base")
    sources = {v: make_lora(model, tmp / f"v{v}", r=8, seed=v) for v in (1, 2, 3)}
    sources[0] = make_lora(model, tmp / "big", r=256, target_modules="all-linear")  # 2 MiB
    yield World(forks, model, base_spec_from_checkpoint(model), sources, tmp)
    forks.close()


def kill_points(events: list[str]) -> list[tuple[int, bool]]:
    """(k, half) for every step k: before it, and halfway into it for a write."""
    return [(k, False) for k in range(len(events))] + [(k, True) for k, e in enumerate(events) if e.startswith("write")]


def check_version(stored: StoredAdapter, source: Path) -> None:
    """The version's files are whole: they pass the store's own check and equal the source's."""
    with stored.opened() as path:
        files = sorted(p.name for p in path.iterdir() if p.name != METADATA_FILE)
        assert files == sorted([CONFIG_FILE, WEIGHTS_FILE])
        assert sha256_file(path / WEIGHTS_FILE) == stored.metadata.sha256 == sha256_file(source / WEIGHTS_FILE)
        assert sha256_file(path / CONFIG_FILE) == stored.metadata.extra[CONFIG_DIGEST]
        assert all((path / f).read_bytes() == (source / f).read_bytes() for f in files)


def check_restarted(world: World, registry: AdapterRegistry, expected: int) -> None:
    """A restarted server's view: whole versions only, `expected` the latest, served and loaded; then registering
    again takes the next number."""
    from quiver.server.api.adapter_catalog import AdapterCatalog
    from quiver.server.engine.adapter_tiers import load_host_adapter

    versions = registry.store.versions(NAME)
    assert versions[-1].metadata.version == expected
    for stored in versions:
        check_version(stored, world.sources[stored.metadata.version])
    served = AdapterCatalog(registry, world.base.fingerprint).resolve(NAME)
    assert served.metadata.version == expected
    host = load_host_adapter(served)
    reference = load_file(world.sources[expected] / WEIGHTS_FILE)
    assert host.key.version == expected and host.tensors.keys() == reference.keys()
    assert all(torch.equal(host.tensors[k], reference[k]) for k in reference)
    later = registry.register(world.sources[3], RegistrationOptions(NAME, mode="new_version"))
    assert later.metadata.version == expected + 1
    check_version(registry.store.get(AdapterRef(NAME, None)), world.sources[3])


def kill_everywhere(world: World, new_store: Callable[[int], str], commit: str,
                    reopen: Callable[[str], AdapterRegistry], env: dict[str, str]) -> int:
    """Kill registrations of version 2 at every step, in modes new_version and replace; returns how many were killed.

    `new_store(i)`: a fresh store location holding version 1; `commit` ends the label of the step that publishes
    version 2; `reopen(location)`: the registry of a restarted process."""
    runs = kills = 0
    for mode in ("new_version", "replace"):
        points: list[tuple[int | None, bool]] = [(None, False)]  # the first run counts the steps
        steps: list[str] = []
        published = -1
        while points:
            kill_at, half = points.pop(0)
            location = new_store(runs)
            events = world.tmp / f"events{runs}.json"
            job = {"store": location, "model": str(world.model), "source": str(world.sources[2]), "mode": mode,
                   "kill_at": kill_at, "half": half, "events": str(events), "env": env}
            answer = world.forks.run(**job)
            assert answer["killed"] == (kill_at is not None), answer
            if kill_at is None:
                steps = json.loads(events.read_text())
                published = next(k for k, e in enumerate(steps) if e.endswith(commit))
                points.extend(kill_points(steps))
            expected = 2 if kill_at is None or kill_at > published else 1
            try:
                check_restarted(world, reopen(location), expected)
            except AssertionError as e:
                label = "end" if kill_at is None else steps[kill_at]
                raise AssertionError(f"{mode}: killed at step {kill_at} ({label}, half={half}): {e}") from e
            runs += 1
            kills += kill_at is not None
    return kills


def test_sigkill_at_every_step_of_a_local_registration(world: World) -> None:
    template = world.tmp / "template"
    registry = AdapterRegistry(LocalAdapterStore(template), world.base, ValidationLimits())
    registry.register(world.sources[1], RegistrationOptions(NAME))

    def new_store(i: int) -> str:
        return str(shutil.copytree(template, world.tmp / f"local{i}", symlinks=True))

    def reopen(location: str) -> AdapterRegistry:
        root = Path(location)
        store = LocalAdapterStore(root)  # as a restarting server does: clears what the killed writer staged
        assert not any((root / ".staging").iterdir())
        assert {p.name for p in root.iterdir()} <= {NAME, ".staging", ".lock"}
        listed = [str(s.metadata.version) for s in store.versions(NAME)]
        assert sorted(os.listdir(root / NAME), key=int) == listed  # no partial version directory
        return AdapterRegistry(store, world.base, ValidationLimits())

    assert kill_everywhere(world, new_store, f" -> {NAME}/2", reopen, {}) >= MIN_RUNS


def test_sigkill_at_every_step_of_an_s3_registration(world: World, s3_endpoint: str, s3_bucket: str) -> None:
    from ..s3_server import CREDENTIALS, client

    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint, "QUIVER_CACHE_DIR": str(world.tmp / "child-cache")}

    def registry_at(location: str) -> AdapterRegistry:  # a cache of its own, as a new process would have
        options = StoreOptions(location, s3_endpoint, cache_dir=tempfile.mkdtemp(dir=world.tmp))
        return AdapterRegistry(open_store(options), world.base, ValidationLimits())

    def new_store(i: int) -> str:
        registry_at(f"s3://{s3_bucket}/run{i}").register(world.sources[1], RegistrationOptions(NAME))
        return f"s3://{s3_bucket}/run{i}"

    def reopen(location: str) -> AdapterRegistry:
        registry = registry_at(location)
        listing = client(s3_endpoint).list_objects_v2(Bucket=s3_bucket, Prefix=location.split("/", 3)[3] + "/versions/")
        manifests = [o["Key"].rsplit("/", 1)[1] for o in listing.get("Contents", [])]
        assert manifests == [f"{s.metadata.version:010d}.json" for s in registry.store.versions(NAME)]
        return registry

    assert kill_everywhere(world, new_store, f"/versions/{NAME}/0000000002.json", reopen, env) >= MIN_RUNS


# --- a full disk ------------------------------------------------------------------------------------------------


class SmallDisk:
    """A small file system at `root`, mounted by `method`; `fill(leave)` takes all of its free space but `leave`."""

    def __init__(self, root: Path, method: str) -> None:
        self.root, self.method = root, method
        self.budget = SMALL_DISK_BYTES  # what a simulated disk has left

    def free(self) -> int:
        stats = os.statvfs(self.root)
        return self.budget if self.method == "simulated" else stats.f_bavail * stats.f_frsize

    def blocks(self, size: int) -> int:
        """The bytes a file of `size` bytes takes."""
        block = 1 if self.method == "simulated" else os.statvfs(self.root).f_frsize
        return -(-size // block) * block

    def fill(self, leave: int) -> None:
        self.budget = leave
        if self.method != "simulated":
            with open(self.root / "filler", "wb") as f:  # ext4 may take blocks of its own: then less is left
                while (room := self.free() - leave) > 0:
                    try:
                        f.write(bytes(min(room, 1 << 16)))
                        f.flush()
                    except OSError as e:
                        assert e.errno == errno.ENOSPC
                        break
        assert self.free() <= leave

    def unfill(self) -> None:
        self.budget = SMALL_DISK_BYTES
        (self.root / "filler").unlink(missing_ok=True)

    def open(self, file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        """Simulated: `open` for the store's modules, failing writes under `root` past the budget with ENOSPC."""
        f = builtins.open(file, mode, *args, **kwargs)  # noqa: SIM115  # the caller closes it
        inside = set(mode) & set("wxa") and Path(os.fsdecode(file)).resolve().is_relative_to(self.root)
        return _File(f, self._spend) if inside else f

    def _spend(self, data: Any) -> None:
        if len(data) > self.budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= len(data)


def _mount(root: Path, method: str) -> bool:
    if method == "tmpfs":
        command = ["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK_BYTES}", "tmpfs", str(root)]
    else:
        image = root.with_suffix(".img")
        image.write_bytes(bytes(2 * SMALL_DISK_BYTES))
        mkfs = ["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", str(image)]
        if shutil.which(mkfs[0]) is None or subprocess.run(mkfs, capture_output=True).returncode != 0:
            return False
        command = ["mount", "-o", "loop", str(image), str(root)]
    return shutil.which("mount") is not None and subprocess.run(command, capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SmallDisk]:
    root = tmp_path / "disk"
    root.mkdir()
    forced = os.environ.get("QUIVER_TEST_SMALL_DISK")
    method = next((m for m in ("tmpfs", "ext4") if forced in (None, m) and _mount(root, m)), "simulated")
    disk = SmallDisk(root, method)
    if method == "simulated":
        monkeypatch.setattr(store_module, "open", disk.open, raising=False)
        monkeypatch.setattr(cache_module, "open", disk.open, raising=False)
    yield disk
    if method != "simulated" and subprocess.run(["umount", str(root)]).returncode != 0:
        subprocess.run(["umount", "-l", str(root)], check=True)


LEAVE = {"bigger than the disk": None, "at the config": 0, "in the weights": 4096, "at the metadata": -1}


@pytest.mark.parametrize("where", LEAVE)
def test_a_full_disk_fails_registration_with_resource_exhausted(world: World, small_disk: SmallDisk,
                                                               where: str) -> None:
    store = LocalAdapterStore(small_disk.root / "store")
    registry = AdapterRegistry(store, world.base, ValidationLimits())
    first = registry.register(world.sources[1], RegistrationOptions(NAME))
    source = world.sources[0 if LEAVE[where] is None else 2]
    if (leave := LEAVE[where]) is not None:  # -1: room for the files, none for the metadata written last
        files = sum(small_disk.blocks((source / f).stat().st_size) for f in (CONFIG_FILE, WEIGHTS_FILE))
        small_disk.fill(files if leave < 0 else leave)
    free = small_disk.free()
    with pytest.raises(ResourceExhausted, match="out of disk space"):
        registry.register(source, RegistrationOptions(NAME, mode="new_version"))
    if small_disk.method != "simulated":
        assert small_disk.free() == free  # nothing half-written kept
    assert not any((store.root / ".staging").iterdir())
    assert sorted(os.listdir(store.root / NAME)) == ["1"]
    reopened = AdapterRegistry(LocalAdapterStore(store.root), world.base, ValidationLimits())
    assert reopened.store.versions(NAME) == [first]
    check_version(first, world.sources[1])
    small_disk.unfill()
    assert reopened.register(world.sources[2], RegistrationOptions(NAME, mode="new_version")).metadata.version == 2
    check_version(reopened.store.get(AdapterRef(NAME, None)), world.sources[2])


def test_a_full_cache_disk_fails_an_s3_fetch_with_resource_exhausted(world: World, small_disk: SmallDisk,
                                                                    s3_endpoint: str, s3_bucket: str) -> None:
    location = f"s3://{s3_bucket}/full"
    store = open_store(StoreOptions(location, s3_endpoint, cache_dir=str(small_disk.root / "cache")))
    registry = AdapterRegistry(store, world.base, ValidationLimits())
    big = registry.register(world.sources[0], RegistrationOptions("big"))
    small = registry.register(world.sources[1], RegistrationOptions(NAME))
    free = small_disk.free()
    with pytest.raises(ResourceExhausted, match="out of disk space"), big.opened():
        pass
    if small_disk.method != "simulated":
        assert small_disk.free() == free
    assert not any((small_disk.root / "cache" / ".tmp").iterdir())
    assert not big.path.exists()
    check_version(small, world.sources[1])


def test_a_corrupt_cached_copy_of_an_s3_version_is_fetched_again(world: World, s3_endpoint: str, s3_bucket: str,
                                                                  tmp_path: Path) -> None:
    store = open_store(StoreOptions(f"s3://{s3_bucket}/cached", s3_endpoint, cache_dir=str(tmp_path / "cache")))
    registry = AdapterRegistry(store, world.base, ValidationLimits())
    stored = registry.register(world.sources[1], RegistrationOptions(NAME))
    check_version(stored, world.sources[1])
    weights = stored.path / WEIGHTS_FILE
    for damage in (b"\xff" * weights.stat().st_size, b"short"):  # same size, other bytes; truncated
        weights.write_bytes(damage)
        check_version(stored, world.sources[1])


if __name__ == "__main__":
    _serve_forks()
