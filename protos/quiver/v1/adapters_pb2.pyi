from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdapterKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_KIND_UNSPECIFIED: _ClassVar[AdapterKind]
    ADAPTER_KIND_LORA: _ClassVar[AdapterKind]
    ADAPTER_KIND_PROMPT_TUNING: _ClassVar[AdapterKind]
    ADAPTER_KIND_PREFIX_TUNING: _ClassVar[AdapterKind]

class RegisterMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REGISTER_MODE_CREATE: _ClassVar[RegisterMode]
    REGISTER_MODE_NEW_VERSION: _ClassVar[RegisterMode]
    REGISTER_MODE_REPLACE: _ClassVar[RegisterMode]
ADAPTER_KIND_UNSPECIFIED: AdapterKind
ADAPTER_KIND_LORA: AdapterKind
ADAPTER_KIND_PROMPT_TUNING: AdapterKind
ADAPTER_KIND_PREFIX_TUNING: AdapterKind
REGISTER_MODE_CREATE: RegisterMode
REGISTER_MODE_NEW_VERSION: RegisterMode
REGISTER_MODE_REPLACE: RegisterMode

class AdapterInfo(_message.Message):
    __slots__ = ("name", "version", "kind", "peft_type", "base_fingerprint", "base_architecture", "size_bytes", "num_parameters", "rank", "num_virtual_tokens", "target_modules", "sha256", "created_at", "description", "prompt_template", "labels", "chat_template")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PEFT_TYPE_FIELD_NUMBER: _ClassVar[int]
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    BASE_ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    NUM_VIRTUAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    kind: AdapterKind
    peft_type: str
    base_fingerprint: str
    base_architecture: str
    size_bytes: int
    num_parameters: int
    rank: int
    num_virtual_tokens: int
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    sha256: str
    created_at: str
    description: str
    prompt_template: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    chat_template: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., kind: _Optional[_Union[AdapterKind, str]] = ..., peft_type: _Optional[str] = ..., base_fingerprint: _Optional[str] = ..., base_architecture: _Optional[str] = ..., size_bytes: _Optional[int] = ..., num_parameters: _Optional[int] = ..., rank: _Optional[int] = ..., num_virtual_tokens: _Optional[int] = ..., target_modules: _Optional[_Iterable[str]] = ..., sha256: _Optional[str] = ..., created_at: _Optional[str] = ..., description: _Optional[str] = ..., prompt_template: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., chat_template: _Optional[bool] = ...) -> None: ...

class RegistrationOptions(_message.Message):
    __slots__ = ("name", "mode", "description", "prompt_template", "labels")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    mode: RegisterMode
    description: str
    prompt_template: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., mode: _Optional[_Union[RegisterMode, str]] = ..., description: _Optional[str] = ..., prompt_template: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("file_name", "data")
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    file_name: str
    data: bytes
    def __init__(self, file_name: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class RegisterAdapterRequest(_message.Message):
    __slots__ = ("options", "chunk")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    options: RegistrationOptions
    chunk: FileChunk
    def __init__(self, options: _Optional[_Union[RegistrationOptions, _Mapping]] = ..., chunk: _Optional[_Union[FileChunk, _Mapping]] = ...) -> None: ...

class RegisterAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterInfo
    def __init__(self, adapter: _Optional[_Union[AdapterInfo, _Mapping]] = ...) -> None: ...

class ImportAdapterRequest(_message.Message):
    __slots__ = ("path", "options")
    PATH_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    path: str
    options: RegistrationOptions
    def __init__(self, path: _Optional[str] = ..., options: _Optional[_Union[RegistrationOptions, _Mapping]] = ...) -> None: ...

class ImportAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterInfo
    def __init__(self, adapter: _Optional[_Union[AdapterInfo, _Mapping]] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters", "next_page_token")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterInfo]
    next_page_token: str
    def __init__(self, adapters: _Optional[_Iterable[_Union[AdapterInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetAdapterRequest(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    def __init__(self, adapter: _Optional[str] = ...) -> None: ...

class GetAdapterResponse(_message.Message):
    __slots__ = ("adapter", "versions")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterInfo
    versions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, adapter: _Optional[_Union[AdapterInfo, _Mapping]] = ..., versions: _Optional[_Iterable[int]] = ...) -> None: ...

class DeleteAdapterRequest(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    def __init__(self, adapter: _Optional[str] = ...) -> None: ...

class DeleteAdapterResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: _containers.RepeatedCompositeFieldContainer[AdapterInfo]
    def __init__(self, deleted: _Optional[_Iterable[_Union[AdapterInfo, _Mapping]]] = ...) -> None: ...
