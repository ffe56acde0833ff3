"""QuiverClient's adapter calls against a real Quiver server: what an upload stores (checked against the files on
disk and by serving it), registration modes, imports from the server's disk, paging, reads, deletes, and the
statuses of each mistake (unknown, existing, outside the import roots, missing or wrong admin token)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import grpc
import pytest

from quiver.clients import AdapterPage, QuiverClient, QuiverRpcError, RegisterMode, upload

from ..server_thread import ServerThread
from .conftest import CLASSIFIER, LABELS, SERVED


def rejected(call: object) -> QuiverRpcError:
    with pytest.raises(QuiverRpcError) as error:
        call()  # type: ignore[operator]
    assert isinstance(error.value.__cause__, grpc.RpcError)
    return error.value


# --- register -----------------------------------------------------------------------------------------


def test_register_uploads_the_adapter_in_chunks(admin: QuiverClient, served_adapter_dirs: dict[str, Path]) -> None:
    """Uploaded 1,000 bytes a message, the adapter arrives whole: its hash is the local weights', and it is stored
    and serves exactly as the same directory registered in one piece ("lora")."""
    directory = served_adapter_dirs["lora"]
    info = admin.register_adapter(directory, "chunked", description="d", chunk_size=1000)
    whole = admin.get_adapter("lora").adapter
    assert info.sha256 == hashlib.sha256((directory / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert (info.ref, info.description) == ("chunked@1", "d")
    assert (info.sha256, info.size_bytes, info.num_parameters, info.rank) == (
        whole.sha256, whole.size_bytes, whole.num_parameters, whole.rank)
    same = admin.generate("w1 w2", adapter="chunked", max_new_tokens=6, temperature=0)
    assert same == admin.generate("w1 w2", adapter="lora", max_new_tokens=6, temperature=0)


def test_registered_info_describes_the_adapter(admin: QuiverClient, served_adapter_dirs: dict[str, Path]) -> None:
    """Fields the wire leaves unset for a kind (a LoRA's virtual tokens, a soft prompt's rank) read as None."""
    fingerprint = admin.model_info().fingerprint
    for name, kind in [("lora", "lora"), ("prompt", "prompt_tuning"), ("prefix", "prefix_tuning")]:
        info = admin.get_adapter(name).adapter
        config = json.loads((served_adapter_dirs[name] / "adapter_config.json").read_text())
        assert (info.kind, info.peft_type, info.base_fingerprint) == (kind, config["peft_type"], fingerprint)
        assert info.rank == config.get("r") and info.num_virtual_tokens == config.get("num_virtual_tokens")
        assert (info.prompt_template, info.labels, info.description) == (None, (), "")
    assert set(admin.get_adapter("lora").adapter.target_modules) >= {"q_proj", "v_proj"}
    assert admin.get_adapter("prompt").adapter.target_modules == ()
    assert admin.get_adapter(CLASSIFIER).adapter.labels == LABELS


@pytest.mark.parametrize(("mode", "versions"), [("new_version", [1, 2]), ("replace", [2])])
def test_register_modes(admin: QuiverClient, served_adapter_dirs: dict[str, Path], mode: RegisterMode,
                        versions: list[int]) -> None:
    admin.register_adapter(served_adapter_dirs["lora"], "moded")
    info = admin.register_adapter(served_adapter_dirs["prompt"], "moded", mode=mode)
    assert (info.ref, info.kind) == ("moded@2", "prompt_tuning")
    assert admin.get_adapter("moded").versions == versions


def test_register_an_existing_name_is_already_exists(admin: QuiverClient, served_adapter_dirs: dict[str, Path]
                                                     ) -> None:
    for call in (lambda: admin.register_adapter(served_adapter_dirs["prompt"], "lora"),
                 lambda: admin.import_adapter(str(served_adapter_dirs["prompt"]), "lora")):
        error = rejected(call)
        assert error.code == grpc.StatusCode.ALREADY_EXISTS and "'lora' already exists" in error.details
    assert admin.get_adapter("lora").versions == [1]


def test_register_raises_a_read_error_rather_than_a_cancelled_call(
        admin: QuiverClient, served_adapter_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    directory = served_adapter_dirs["lora"]
    listed = [*upload.adapter_files(directory), directory / "zz_gone.bin"]  # as if deleted while uploading
    monkeypatch.setattr(upload, "adapter_files", lambda _: listed)
    with pytest.raises(FileNotFoundError, match="zz_gone"):
        admin.register_adapter(directory, "gone")
    assert rejected(lambda: admin.get_adapter("gone")).code == grpc.StatusCode.NOT_FOUND


# --- import -------------------------------------------------------------------------------------------


def test_import_registers_a_directory_on_the_servers_disk(admin: QuiverClient, served_adapter_dirs: dict[str, Path]
                                                          ) -> None:
    info = admin.import_adapter(str(served_adapter_dirs["prefix"]), "imported", description="d",
                                prompt_template="w5 {input}")
    assert (info.ref, info.kind, info.description, info.prompt_template) == (
        "imported@1", "prefix_tuning", "d", "w5 {input}")
    assert info.sha256 == admin.get_adapter("prefix").adapter.sha256
    # The template crosses the wire: the server formats each request into it.
    templated = admin.generate("w1 w2", adapter="imported", max_new_tokens=6, temperature=0)
    direct = admin.generate("w5 w1 w2", adapter="prefix", max_new_tokens=6, temperature=0)
    assert templated.token_ids == direct.token_ids
    again = admin.import_adapter(str(served_adapter_dirs["lora"]), "imported", mode="new_version")
    assert (again.ref, again.kind) == ("imported@2", "lora")


@pytest.mark.parametrize(("path", "details"), [
    ("/etc", "path: is not under any of the server's import roots"),
    ("relative/dir", "path: must be an absolute path"),
])
def test_import_outside_the_roots_is_invalid_argument(admin: QuiverClient, path: str, details: str) -> None:
    error = rejected(lambda: admin.import_adapter(path, "x"))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.details.startswith(details)


def test_import_of_a_missing_directory_under_a_root(admin: QuiverClient, served_adapter_dirs: dict[str, Path]
                                                    ) -> None:
    missing = served_adapter_dirs["lora"].parent / "missing"
    error = rejected(lambda: admin.import_adapter(str(missing), "x"))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.details.startswith("path: is not a directory")


# --- list, get, delete --------------------------------------------------------------------------------


def test_list_pages_through_every_adapter(admin: QuiverClient) -> None:
    names, token = [], ""
    while True:
        page = admin.list_adapters(page_size=1, page_token=token)
        names += [a.name for a in page.adapters]
        if not (token := page.next_page_token):
            break
        assert len(page.adapters) == 1
    assert names == SERVED
    assert [a.name for a in admin.iter_adapters(page_size=3)] == SERVED
    assert admin.list_adapters().adapters == list(admin.iter_adapters(page_size=1))


def test_iter_adapters_fetches_pages_as_it_reaches_them(admin: QuiverClient, monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    pages: list[str] = []
    list_adapters = admin.list_adapters

    def recording(page_size: int, page_token: str) -> AdapterPage:
        pages.append(page_token)
        return list_adapters(page_size, page_token)

    monkeypatch.setattr(admin, "list_adapters", recording)
    adapters = admin.iter_adapters(page_size=2)
    assert pages == [] and next(adapters).name == SERVED[0]
    assert len(pages) == 1
    assert [a.name for a in adapters] == SERVED[1:]
    assert len(pages) == 2


def test_get_and_delete_versions(admin: QuiverClient, served_adapter_dirs: dict[str, Path]) -> None:
    made = [admin.register_adapter(served_adapter_dirs["prompt"], "versions", mode="new_version") for _ in range(3)]
    details = admin.get_adapter("versions")
    assert (details.adapter, details.versions) == (made[2], [1, 2, 3])
    assert admin.get_adapter("versions@2").adapter == made[1]
    assert admin.delete_adapter("versions@2") == [made[1]]
    assert admin.get_adapter("versions").versions == [1, 3]
    assert admin.delete_adapter("versions") == [made[0], made[2]]
    assert rejected(lambda: admin.get_adapter("versions")).code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(("method", "ref", "details"), [
    ("get_adapter", "nope", "adapter nope not found"),
    ("get_adapter", "lora@9", "adapter lora@9 not found"),
    ("delete_adapter", "nope", "adapter nope not found"),
    ("delete_adapter", "bad name!", "adapter: adapter name 'bad name!' must be"),
])
def test_unknown_adapters(admin: QuiverClient, method: str, ref: str, details: str) -> None:
    error = rejected(lambda: getattr(admin, method)(ref))
    code = grpc.StatusCode.INVALID_ARGUMENT if " " in ref else grpc.StatusCode.NOT_FOUND
    assert error.code == code and error.details.startswith(details)


# --- the admin token ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("token", "details"), [(None, "missing admin token"), ("wrong", "wrong admin token")])
def test_changes_need_the_admin_token(server: ServerThread, admin: QuiverClient,
                                      served_adapter_dirs: dict[str, Path], token: str | None, details: str) -> None:
    """Register, import and delete are refused without the right token; reading adapters and generating are not."""
    with QuiverClient(server.target, timeout=60, admin_token=token) as c:
        for call in (lambda: c.register_adapter(served_adapter_dirs["lora"], "x"),
                     lambda: c.import_adapter(str(served_adapter_dirs["lora"]), "x"),
                     lambda: c.delete_adapter("lora")):
            error = rejected(call)
            assert (error.code, error.details) == (grpc.StatusCode.UNAUTHENTICATED, details)
        assert [a.name for a in c.iter_adapters()] == SERVED
        assert c.get_adapter("lora").versions == [1]
        assert c.generate("w1", adapter="lora", max_new_tokens=2).completion_tokens == 2


def test_the_admin_token_goes_with_every_change(admin: QuiverClient, served_adapter_dirs: dict[str, Path]) -> None:
    registered = admin.register_adapter(served_adapter_dirs["lora"], "tokened")
    imported = admin.import_adapter(str(served_adapter_dirs["lora"]), "tokened", mode="new_version")
    assert [a.ref for a in admin.delete_adapter("tokened")] == [registered.ref, imported.ref]
