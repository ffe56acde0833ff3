"""OpenAI's request bodies as strict pydantic models: types are checked here, values by the core.

Each model forbids fields it does not list, so a field Quiver does not know is a 400 naming it, never silently
ignored. Fields OpenAI defines that Quiver cannot honour are listed with their neutral value and refused
(`Unsupported`) when a request sets anything else (server/http/translate.py); `top_k`, `repetition_penalty` and
`ignore_eos` are vLLM's extensions, which the `openai` client sends through `extra_body`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from quiver.common.errors import InvalidArgument, Unsupported

_STRICT = ConfigDict(extra="forbid", strict=True)


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = False
    """Send a last chunk with the whole request's usage (and `"usage": null` in every other chunk)."""


class _Sampling(BaseModel):
    """Fields both endpoints share."""

    model_config = _STRICT

    model: str
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the caller's own bookkeeping; it does not change the output
    top_k: int | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False  # vLLM's: generate to max_tokens (benchmarks)
    # Accepted only at their neutral value:
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(BaseModel):
    """One part of a message's content; only text parts are supported (others are refused by type)."""

    model_config = ConfigDict(extra="allow", strict=True)

    type: str
    text: str | None = None


class ChatMessageIn(BaseModel):
    model_config = _STRICT

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessageIn]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    web_search_options: dict[str, Any] | None = None


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings; `pooling` and `normalize` are Quiver's (through the `openai` client's `extra_body`)."""

    model_config = _STRICT

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: str = "float"  # "float" or "base64" (little-endian float32, what the `openai` client asks for)
    user: str | None = None
    pooling: str = "mean"  # "mean" or "last"
    normalize: bool = True
    # Accepted only at its neutral value: a model's hidden size is what it is.
    dimensions: int | None = None


class ClassifyRequest(BaseModel):
    """POST /v1/classify, as vLLM's: `model` names a classification adapter."""

    model_config = _STRICT

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    user: str | None = None


class LoadLoraRequest(BaseModel):
    """POST /v1/load_lora_adapter, as vLLM's runtime adapter loading (any PEFT kind, despite the name)."""

    model_config = _STRICT

    lora_name: str
    lora_path: str
    load_inplace: bool = False  # True: a new version under an existing name instead of ALREADY_EXISTS


class UnloadLoraRequest(BaseModel):
    """POST /v1/unload_lora_adapter."""

    model_config = _STRICT

    lora_name: str
    lora_int_id: int | None = Field(default=None)  # vLLM's numeric id; ignored (names identify adapters)


def _location(loc: tuple[int | str, ...]) -> str:
    """pydantic's error location as a request field: ("messages", 0, "role") -> messages[0].role."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[str]", "list[int]", "list[list[int]]", "list[ContentPart]", "dict[str,any]"):
            continue  # the member of a union that failed, not a field
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def parse(model: type[BaseModel], body: bytes) -> Any:
    """`body` (JSON) validated into `model`; the first problem becomes InvalidArgument naming the field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        field = _location(tuple(first["loc"]))
        if first["type"] == "json_invalid":
            raise InvalidArgument("body", f"is not valid JSON: {first['msg']}") from None
        if first["type"] == "extra_forbidden":
            raise Unsupported(field, "is not a field Quiver knows (unrecognized request argument)") from None
        if first["type"] == "missing":
            raise InvalidArgument(field, "is required") from None
        raise InvalidArgument(field, first["msg"]) from None
