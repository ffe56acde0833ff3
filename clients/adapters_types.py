"""What the sync and async clients share for quiver.v1.AdapterService: result dataclasses, requests, replies."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import grpc

from quiver.clients.errors import QuiverRpcError
from quiver.v1 import adapters_pb2 as apb

AdapterKind = Literal["lora", "prompt_tuning", "prefix_tuning"]
RegisterMode = Literal["create", "new_version", "replace"]

_KINDS: dict[int, AdapterKind] = {
    apb.ADAPTER_KIND_LORA: "lora",
    apb.ADAPTER_KIND_PROMPT_TUNING: "prompt_tuning",
    apb.ADAPTER_KIND_PREFIX_TUNING: "prefix_tuning",
}
_MODES: dict[RegisterMode, apb.RegisterMode.ValueType] = {
    "create": apb.REGISTER_MODE_CREATE,
    "new_version": apb.REGISTER_MODE_NEW_VERSION,
    "replace": apb.REGISTER_MODE_REPLACE,
}


@dataclass(frozen=True)
class AdapterInfo:
    """One stored adapter version; mirrors quiver.v1.AdapterInfo field for field."""

    name: str
    """Validated identifier."""
    version: int
    """Version number, from 1."""
    kind: AdapterKind
    """Adapter method."""
    peft_type: str
    """PEFT's name of the method, e.g. "LORA"."""
    base_fingerprint: str
    """Fingerprint of the base model the adapter was validated against."""
    base_architecture: str
    """Architecture of that base model, e.g. "LlamaForCausalLM"."""
    size_bytes: int
    """Bytes of all stored files."""
    num_parameters: int
    """Trainable parameters in the adapter weights."""
    rank: int | None
    """LoRA rank; None for other kinds."""
    num_virtual_tokens: int | None
    """Virtual tokens of a prompt or prefix; None for LoRA."""
    target_modules: tuple[str, ...]
    """Leaf names of the linear modules a LoRA adapts."""
    sha256: str
    """SHA-256 of adapter_model.safetensors, hex."""
    created_at: str
    """Registration time, ISO-8601 UTC."""
    description: str
    """Free text given at registration."""
    prompt_template: str | None
    """Hard prompt with one `{input}` the server formats requests into; None when the adapter has none."""
    labels: tuple[str, ...] = ()
    """A classification adapter's class names by head output; empty for generation adapters."""
    chat_template: bool = False
    """Trained through the base's chat template: a plain text request is served as one user turn of it."""

    @property
    def ref(self) -> str:
        """`name@version`, the reference that names exactly this version."""
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class AdapterPage:
    """One page of `list_adapters`: the latest version of each adapter, sorted by name."""

    adapters: list[AdapterInfo]
    next_page_token: str
    """Pass it as `page_token` for the next page; empty on the last page."""


@dataclass(frozen=True)
class AdapterDetails:
    """What `get_adapter` returns."""

    adapter: AdapterInfo
    """The version asked for (the latest one when the reference names no version)."""
    versions: list[int]
    """Every stored version number of this name, ascending."""


def registration_options(
    name: str, mode: RegisterMode, description: str, prompt_template: str | None, labels: Sequence[str] = ()
) -> apb.RegistrationOptions:
    """The options message of RegisterAdapter and ImportAdapter; ValueError for a mode the wire lacks."""
    if mode not in _MODES:
        raise ValueError(f"mode: expected one of {', '.join(_MODES)}, got {mode!r}")
    options = apb.RegistrationOptions(name=name, mode=_MODES[mode], description=description, labels=list(labels))
    if prompt_template is not None:
        options.prompt_template = prompt_template  # `optional`: an empty template is sent, not dropped.
    return options


def list_request(page_size: int, page_token: str) -> apb.ListAdaptersRequest:
    try:
        return apb.ListAdaptersRequest(page_size=page_size, page_token=page_token)
    except (TypeError, ValueError) as e:
        raise ValueError(f"page_size: {e}") from e


def admin_metadata(metadata: Sequence[tuple[str, str]], token: str | None) -> tuple[tuple[str, str], ...]:
    """`metadata`, plus `token` (the API key or the admin token) as a bearer token when there is one."""
    if token is None:
        return tuple(metadata)
    return (*metadata, ("authorization", f"Bearer {token}"))


def adapter_info_from_proto(info: apb.AdapterInfo) -> AdapterInfo:
    kind = _KINDS.get(info.kind)
    if kind is None:
        # The server always sets it; a reply without one is a broken call, not a result.
        raise QuiverRpcError(grpc.StatusCode.INTERNAL, f"adapter {info.name!r} has no kind (got {info.kind})")
    return AdapterInfo(
        name=info.name,
        version=info.version,
        kind=kind,
        peft_type=info.peft_type,
        base_fingerprint=info.base_fingerprint,
        base_architecture=info.base_architecture,
        size_bytes=info.size_bytes,
        num_parameters=info.num_parameters,
        rank=info.rank or None,
        num_virtual_tokens=info.num_virtual_tokens or None,
        target_modules=tuple(info.target_modules),
        sha256=info.sha256,
        created_at=info.created_at,
        description=info.description,
        prompt_template=info.prompt_template or None,
        labels=tuple(info.labels),
        chat_template=info.chat_template,
    )


def page_from_response(response: apb.ListAdaptersResponse) -> AdapterPage:
    return AdapterPage([adapter_info_from_proto(a) for a in response.adapters], response.next_page_token)


def details_from_response(response: apb.GetAdapterResponse) -> AdapterDetails:
    return AdapterDetails(adapter_info_from_proto(response.adapter), list(response.versions))


def deleted_from_response(response: apb.DeleteAdapterResponse) -> list[AdapterInfo]:
    return [adapter_info_from_proto(a) for a in response.deleted]
