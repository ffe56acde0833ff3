"""LocalAdapterStore: modes, reads, paging, deletion, restart, locking, and consistency after SIGKILL mid-write."""

from __future__ import annotations

import base64
import errno
import fcntl
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from quiver.adapters import store as store_module
from quiver.adapters.metadata import METADATA_FILE, sha256_file
from quiver.adapters.names import AdapterRef, parse_ref
from quiver.adapters.store import AdapterStore, LocalAdapterStore, RegisterMode, StoredAdapter, default_store_dir
from quiver.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

from .crash_writer import KillPoint, metadata_factory, run_and_kill, staged_at_least, write_big_source

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def write_source(directory: Path, seed: int = 0) -> dict[str, Path]:
    """A tiny adapter to register: a config and a real (4x4) safetensors file whose content depends on `seed`."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 4, "seed": seed}))
    save_file({"lora_A": torch.full((4, 4), float(seed))}, str(directory / WEIGHTS))
    return {CONFIG: directory / CONFIG, WEIGHTS: directory / WEIGHTS}


def put(
    store: LocalAdapterStore, name: str, files: dict[str, Path], mode: RegisterMode = "new_version", **extra: object
) -> StoredAdapter:
    size = sum(p.stat().st_size for p in files.values())
    return store.put(name, files, metadata_factory(name, sha256_file(files[WEIGHTS]), size, **extra), mode)


@pytest.fixture
def store(tmp_path: Path) -> LocalAdapterStore:
    return LocalAdapterStore(tmp_path / "store")


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    return write_source(tmp_path / "src")


def staging_entries(store: LocalAdapterStore) -> list[Path]:
    return list((store.root / ".staging").iterdir())


# --- put modes and reads ----------------------------------------------------------------------------------------


def test_create_stores_version_one_with_files_and_metadata(store: LocalAdapterStore, files: dict[str, Path]) -> None:
    backend: AdapterStore = store  # mypy checks LocalAdapterStore against the protocol here
    stored = put(store, "sentiment", files, "create", description="d")
    assert backend.get(parse_ref("sentiment")) == stored
    assert stored.metadata.version == 1
    assert stored.path == store.root / "sentiment" / "1"
    assert sorted(p.name for p in stored.path.iterdir()) == [CONFIG, WEIGHTS, METADATA_FILE]
    assert sha256_file(stored.path / WEIGHTS) == stored.metadata.sha256 == sha256_file(files[WEIGHTS])
    assert store.get(parse_ref("sentiment")) == stored == store.get(parse_ref("sentiment@1"))
    assert staging_entries(store) == []


def test_create_refuses_an_existing_name(store: LocalAdapterStore, files: dict[str, Path]) -> None:
    put(store, "a", files, "create")
    with pytest.raises(AlreadyExists):
        put(store, "a", files, "create")
    assert [v.metadata.version for v in store.versions("a")] == [1]


def test_new_version_adds_and_keeps_older(store: LocalAdapterStore, tmp_path: Path) -> None:
    first = put(store, "a", write_source(tmp_path / "s1", seed=1), "new_version")
    second = put(store, "a", write_source(tmp_path / "s2", seed=2), "new_version")
    assert (first.metadata.version, second.metadata.version) == (1, 2)
    assert store.get(parse_ref("a")) == second
    assert store.get(parse_ref("a@1")) == first
    assert store.versions("a") == [first, second]
    assert first.metadata.sha256 != second.metadata.sha256


def test_replace_adds_a_version_and_drops_the_older_ones(store: LocalAdapterStore, files: dict[str, Path]) -> None:
    put(store, "a", files)
    put(store, "a", files)
    replaced = put(store, "a", files, "replace")
    assert replaced.metadata.version == 3
    assert store.versions("a") == [replaced]
    assert sorted(p.name for p in (store.root / "a").iterdir()) == ["3"]
    with pytest.raises(NotFound):
        store.get(parse_ref("a@1"))


@pytest.mark.parametrize("mode", ["new_version", "replace"])
def test_other_modes_start_a_new_name_at_version_one(
    store: LocalAdapterStore, files: dict[str, Path], mode: RegisterMode
) -> None:
    assert put(store, "fresh", files, mode).metadata.version == 1


def test_unknown_mode_is_invalid(store: LocalAdapterStore, files: dict[str, Path]) -> None:
    with pytest.raises(InvalidArgument) as caught:
        put(store, "a", files, "upsert")  # type: ignore[arg-type]
    assert caught.value.field == "mode"


@pytest.mark.parametrize(
    "bad_files",
    [
        lambda f: {CONFIG: f[CONFIG]},
        lambda f: {**f, "../escape": f[CONFIG]},
        lambda f: {**f, "sub/file": f[CONFIG]},
        lambda f: {**f, ".hidden": f[CONFIG]},
        lambda f: {**f, METADATA_FILE: f[CONFIG]},
        lambda f: {**f, "extra.bin": f[CONFIG].parent},  # a directory, not a file
        lambda f: {**f, "extra.bin": f[CONFIG].parent / "missing"},
    ],
)
def test_bad_file_sets_are_invalid(
    store: LocalAdapterStore, files: dict[str, Path], bad_files: Callable[[dict[str, Path]], dict[str, Path]]
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        store.put("a", bad_files(files), metadata_factory("a", "0" * 64, 0), "create")
    assert caught.value.field == "files"
    assert not (store.root / "a").exists()


def test_extra_files_are_stored(store: LocalAdapterStore, files: dict[str, Path], tmp_path: Path) -> None:
    extra = tmp_path / "prefix.safetensors"
    save_file({"prefix": torch.zeros(2, 3)}, str(extra))
    stored = put(store, "p", {**files, "quiver_prefix.safetensors": extra})
    assert (stored.path / "quiver_prefix.safetensors").read_bytes() == extra.read_bytes()


@pytest.mark.parametrize("name", ["../x", "A", "a/b", ".staging", ""])
def test_put_refuses_bad_names(store: LocalAdapterStore, files: dict[str, Path], name: str) -> None:
    with pytest.raises(InvalidArgument):
        store.put(name, files, metadata_factory("a", "0" * 64, 0), "create")


def test_failed_writes_leave_nothing_behind(store: LocalAdapterStore, files: dict[str, Path]) -> None:
    with pytest.raises(FailedPrecondition):  # metadata that does not describe the copied bytes
        store.put("a", files, metadata_factory("a", "0" * 64, 1), "create")
    with pytest.raises(ValueError, match="make_metadata"):  # metadata for another version
        store.put("a", files, lambda v: metadata_factory("a", "0" * 64, 1)(v + 1), "create")
    with pytest.raises(InvalidArgument):  # make_metadata refusing a client field
        put(store, "a", files, prompt_template="no placeholder")
    assert not (store.root / "a").exists() or not any((store.root / "a").iterdir())
    assert staging_entries(store) == []
    assert put(store, "a", files).metadata.version == 1


def test_disk_full_is_resource_exhausted(
    store: LocalAdapterStore, files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(source: Path, dest: Path) -> tuple[int, str]:
        dest.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module, "_copy_synced", full)
    with pytest.raises(ResourceExhausted):
        put(store, "a", files)
    assert staging_entries(store) == []


def test_get_missing_is_not_found(store: LocalAdapterStore, files: dict[str, Path]) -> None:
    with pytest.raises(NotFound):
        store.get(parse_ref("nothing"))
    put(store, "a", files)
    with pytest.raises(NotFound):
        store.get(parse_ref("a@2"))
    with pytest.raises(NotFound):
        store.versions("nothing")


@pytest.mark.parametrize("ref", [AdapterRef("../x", None), AdapterRef("a", 0), AdapterRef(".staging", None)])
def test_get_revalidates_refs(store: LocalAdapterStore, ref: AdapterRef) -> None:
    with pytest.raises(InvalidArgument):
        store.get(ref)


# --- incomplete versions, symlinks, restart ------------------------------------------------------------------


def test_versions_without_valid_metadata_are_ignored(
    store: LocalAdapterStore, files: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    good = put(store, "a", files)
    (store.root / "a" / "2").mkdir()  # no metadata at all
    (store.root / "a" / "3").mkdir()
    (store.root / "a" / "3" / METADATA_FILE).write_text("{truncated")
    other = store.root / "a" / "4"
    other.mkdir()
    (other / METADATA_FILE).write_text(good.metadata.to_json())  # says version 1
    (store.root / "a" / "05").mkdir()  # not a version spelling
    (store.root / "b" / "1").mkdir(parents=True)  # a name with nothing complete
    with caplog.at_level(logging.WARNING, logger="quiver.adapters.store"):
        assert store.get(parse_ref("a")) == good
        assert store.versions("a") == [good]
        assert store.list(10) == ([good], "")
    assert "ignoring incomplete adapter version" in caplog.text
    for ref in ("a@2", "a@3", "a@4", "b"):
        with pytest.raises(NotFound):
            store.get(parse_ref(ref))
    assert put(store, "a", files).metadata.version == 5  # never reuses a number on disk
    assert put(store, "b", files, "create").metadata.version == 2


def test_symlinked_name_outside_the_store_is_refused(
    store: LocalAdapterStore, files: dict[str, Path], tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    planted = put(LocalAdapterStore(outside), "evil", files)
    os.symlink(outside / "evil", store.root / "evil")
    with pytest.raises(InvalidArgument):
        store.get(parse_ref("evil"))
    with pytest.raises(InvalidArgument):
        put(store, "evil", files)
    with pytest.raises(InvalidArgument):
        store.delete(parse_ref("evil"))
    assert store.list(10) == ([], "")
    assert LocalAdapterStore(outside).versions("evil") == [planted]  # nothing written or removed outside


def test_symlinked_version_dir_is_ignored(store: LocalAdapterStore, files: dict[str, Path], tmp_path: Path) -> None:
    put(store, "a", files)
    os.symlink(store.root / "a" / "1", store.root / "a" / "2")
    assert [v.metadata.version for v in store.versions("a")] == [1]
    with pytest.raises(InvalidArgument):
        store.get(parse_ref("a@2"))


def test_restart_finds_everything_and_clears_stale_staging(store: LocalAdapterStore, tmp_path: Path) -> None:
    stored = [put(store, name, write_source(tmp_path / name)) for name in ("x", "y")]
    stored.append(put(store, "x", write_source(tmp_path / "x2", seed=2)))
    debris = store.root / ".staging" / "x@3.dead"
    debris.mkdir()
    (debris / WEIGHTS).write_bytes(b"half")
    reopened = LocalAdapterStore(store.root)
    assert staging_entries(reopened) == []
    assert reopened.versions("x") == [stored[0], stored[2]]
    assert reopened.list(10) == ([stored[2], stored[1]], "")


# --- list paging ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("count", "page_size"), [(7, 3), (6, 3), (1, 1), (3, 1000)])
def test_list_pages_through_every_name_once(
    store: LocalAdapterStore, files: dict[str, Path], count: int, page_size: int
) -> None:
    names = [f"n{i:02d}" for i in reversed(range(count))]
    for name in names:
        put(store, name, files)
    put(store, names[0], files)  # a second version: list shows the latest
    seen: list[StoredAdapter] = []
    token, pages = "", 0
    while True:
        page, token = store.list(page_size, token)
        pages += 1
        assert 0 < len(page) <= page_size
        seen += page
        if not token:
            break
    assert [s.metadata.name for s in seen] == sorted(names)
    assert pages == -(-count // page_size)  # no empty trailing page
    assert next(s for s in seen if s.metadata.name == names[0]).metadata.version == 2


def test_list_of_an_empty_store(store: LocalAdapterStore) -> None:
    assert store.list(5) == ([], "")


@pytest.mark.parametrize("page_size", [0, -1, 1001, True])
def test_list_refuses_bad_page_sizes(store: LocalAdapterStore, page_size: int) -> None:
    with pytest.raises(InvalidArgument) as caught:
        store.list(page_size)
    assert caught.value.field == "page_size"


@pytest.mark.parametrize(
    "token",
    [
        "garbage!",
        "é",
        "YWJj",  # base64 of "abc": no prefix
        base64.urlsafe_b64encode(b"after:../x").decode(),
        base64.urlsafe_b64encode(b"after:\xff").decode(),
        "QQ",  # bad padding
        "x" * 300,
    ],
)
def test_list_refuses_forged_tokens(store: LocalAdapterStore, token: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        store.list(10, token)
    assert caught.value.field == "page_token"


# --- delete --------------------------------------------------------------------------------------------------


def test_delete_one_version(store: LocalAdapterStore, files: dict[str, Path]) -> None:
    first, second = put(store, "a", files), put(store, "a", files)
    assert store.delete(parse_ref("a@1")) == [first]
    assert store.versions("a") == [second]
    with pytest.raises(NotFound):
        store.delete(parse_ref("a@1"))
    assert store.delete(parse_ref("a@2")) == [second]
    assert not (store.root / "a").exists()  # the last version takes the name with it
    assert staging_entries(store) == []


def test_delete_all_versions(store: LocalAdapterStore, files: dict[str, Path]) -> None:
    stored = [put(store, "a", files) for _ in range(3)]
    kept = put(store, "b", files)
    assert store.delete(parse_ref("a")) == stored
    assert not (store.root / "a").exists()
    assert store.list(10) == ([kept], "")
    with pytest.raises(NotFound):
        store.delete(parse_ref("a"))


def test_open_files_survive_delete(store: LocalAdapterStore, files: dict[str, Path]) -> None:
    stored = put(store, "a", files)
    with open(stored.path / WEIGHTS, "rb") as reader:
        store.delete(parse_ref("a"))
        assert not stored.path.exists()
        assert reader.read() == files[WEIGHTS].read_bytes()


# --- locking -------------------------------------------------------------------------------------------------


def test_writers_wait_for_another_process_lock(store: LocalAdapterStore, files: dict[str, Path]) -> None:
    done = threading.Event()

    def write() -> None:
        put(store, "a", files)
        done.set()

    worker = threading.Thread(target=write)
    with open(store.root / ".lock", "ab") as held:  # a separate open file description, as another process has
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        worker.start()
        assert not done.wait(0.3)
        assert not (store.root / "a").exists()
    worker.join(timeout=30)
    assert done.is_set()


def test_opening_while_another_process_writes_keeps_its_staging(store: LocalAdapterStore) -> None:
    live = store.root / ".staging" / "a@1.live"
    live.mkdir()
    with open(store.root / ".lock", "ab") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        LocalAdapterStore(store.root)  # must neither block nor clear a live writer's staging
        assert live.exists()


def test_concurrent_threads_get_distinct_versions(store: LocalAdapterStore, files: dict[str, Path]) -> None:
    threads = [threading.Thread(target=put, args=(store, "a", files)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert [v.metadata.version for v in store.versions("a")] == [1, 2, 3, 4]


def test_default_store_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QUIVER_STORE_DIR", str(tmp_path / "explicit"))
    assert default_store_dir() == tmp_path / "explicit"
    monkeypatch.delenv("QUIVER_STORE_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_store_dir() == tmp_path / "xdg" / "quiver" / "adapters"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_store_dir() == tmp_path / "home" / ".local" / "share" / "quiver" / "adapters"


# --- crash consistency ---------------------------------------------------------------------------------------

BIG_MIB = 64


@pytest.fixture(scope="module")
def big_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, int]:
    """A 64 MiB adapter source (so a copy takes a moment), its weights' sha256, and its total size."""
    directory = tmp_path_factory.mktemp("big")
    return (directory, *write_big_source(directory, BIG_MIB))


KILL_POINTS: dict[str, KillPoint] = {
    "staging-created": KillPoint(staged_at_least(0), inside_write=True),
    "first-mebibytes": KillPoint(staged_at_least(4 << 20), inside_write=True),
    "mostly-copied": KillPoint(staged_at_least((BIG_MIB - 8) << 20), inside_write=True),
    # All bytes copied: fsyncing, writing the metadata or renaming; the rename may win the race.
    "fully-copied": KillPoint(staged_at_least(BIG_MIB << 20), inside_write=False),
    # The writer takes ~0.2 s here: this lands before, inside or after the write depending on load.
    "after-0.15s": KillPoint(lambda _, elapsed: elapsed >= 0.15, inside_write=False),
}


@pytest.mark.parametrize("kill_point", KILL_POINTS)
def test_sigkill_mid_write_leaves_the_previous_version_intact(
    tmp_path: Path, big_source: tuple[Path, str, int], kill_point: str
) -> None:
    source, big_sha, big_size = big_source
    point = KILL_POINTS[kill_point]
    # On a loaded machine the poller may miss a kill point; try again rather than test nothing.
    for attempt in range(5):
        store = LocalAdapterStore(tmp_path / f"store{attempt}")
        first = put(store, "big", write_source(tmp_path / "v1"))
        run_and_kill(store.root, source, "big", big_sha, big_size, point.when)
        mid_write = bool(staging_entries(store))  # the rename empties the staging area: debris means unfinished
        if mid_write or not point.inside_write:
            break
    else:
        pytest.fail(f"the writer finished five times before {kill_point!r} could be caught")

    reopened = LocalAdapterStore(store.root)
    assert staging_entries(reopened) == []
    versions = reopened.versions("big")
    assert versions[0] == first
    assert sha256_file(first.path / WEIGHTS) == first.metadata.sha256
    assert sorted(p.name for p in (store.root / "big").iterdir()) == [str(v.metadata.version) for v in versions]
    latest = reopened.get(parse_ref("big"))
    if mid_write:
        assert versions == [first] and latest == first
    elif len(versions) == 2:  # the kill came after the rename, or never: the new version must be whole
        assert latest.metadata.version == 2
        assert sha256_file(latest.path / WEIGHTS) == big_sha
        assert sum(p.stat().st_size for p in latest.path.iterdir() if p.name != METADATA_FILE) == big_size
    assert put(reopened, "big", write_source(tmp_path / "v3", seed=3)).metadata.version == len(versions) + 1
