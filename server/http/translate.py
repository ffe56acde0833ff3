"""OpenAI request bodies -> the core's `GenerationInput`s, one per choice (prompt x n), and back for errors.

The model name picks the adapter: the served base model's id means none, anything else is an adapter reference
(`name` or `name@version`) that the core resolves, so an unknown one is NOT_FOUND / 404, never a base answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from quiver.adapters.names import parse_ref
from quiver.common.errors import InvalidArgument, NotFound, Unsupported
from quiver.server.api.generation_input import ChatMessage, GenerationInput
from quiver.server.http.schema import ChatCompletionRequest, ChatMessageIn, CompletionRequest

MAX_CHOICES = 128  # prompts x n of one request
# Roles OpenAI has that map onto the chat template's: "developer" is the newer name of "system".
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

# The core's field names (server/api/generation_input.py) as each endpoint spells them.
COMPLETION_PARAMS = {"adapter": "model", "text": "prompt", "token_ids": "prompt", "input": "prompt",
                     "max_new_tokens": "max_tokens", "stop_sequences": "stop", "prompt_logprobs": "logprobs"}
CHAT_PARAMS = {"adapter": "model", "input": "messages", "stop_sequences": "stop", "logprobs": "top_logprobs",
               "max_new_tokens": "max_completion_tokens"}


@dataclass(frozen=True)
class Choices:
    """What one request runs: a `GenerationInput` per choice, in OpenAI's order (prompt-major, then n)."""

    inputs: tuple[GenerationInput, ...]
    n: int  # choices per prompt
    params: Mapping[str, str]  # core field -> request field, for errors


def adapter_of(model: str, base_id: str) -> str:
    """The adapter reference `model` names ("" for the base model); a name no adapter can have is NotFound, as
    OpenAI answers any unknown model."""
    if not model:
        raise InvalidArgument("model", "must name the base model or an adapter")
    if model == base_id:
        return ""
    try:
        parse_ref(model, field="model")
    except InvalidArgument:
        raise NotFound(f"model {model!r} not found: neither the base model {base_id!r} nor an adapter") from None
    return model


def _neutral(request: Any, allowed: Mapping[str, Any]) -> None:
    """Refuse every field in `allowed` that the request sets to something other than a neutral value."""
    for field, neutral in allowed.items():
        value = getattr(request, field)
        if field in request.model_fields_set and value is not None and value not in neutral:
            raise Unsupported(field, f"{value!r} is not supported by Quiver (only {', '.join(map(repr, neutral))})")


_SHARED_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},),
}


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _common(request: CompletionRequest | ChatCompletionRequest, base_id: str) -> GenerationInput:
    if not 1 <= request.n <= MAX_CHOICES:
        raise InvalidArgument("n", f"must be in [1, {MAX_CHOICES}], got {request.n}")
    if request.stream_options is not None and not request.stream:
        raise InvalidArgument("stream_options", "is only allowed with stream: true")
    return GenerationInput(
        adapter=adapter_of(request.model, base_id),
        temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
        repetition_penalty=request.repetition_penalty, seed=request.seed, stop_sequences=_stops(request.stop),
        ignore_eos=request.ignore_eos,
    )


def _fan_out(per_prompt: list[GenerationInput], n: int) -> tuple[GenerationInput, ...]:
    """Each prompt n times; with a seed, choice j draws from seed + j, so the choices differ but repeat."""
    if len(per_prompt) * n > MAX_CHOICES:
        raise InvalidArgument("n", f"prompts x n must be at most {MAX_CHOICES}, got {len(per_prompt) * n}")
    return tuple(
        replace(spec, seed=spec.seed + j if spec.seed is not None else None) for spec in per_prompt for j in range(n)
    )


def completion_choices(request: CompletionRequest, base_id: str) -> Choices:
    _neutral(request, {**_SHARED_NEUTRAL, "suffix": ("",), "best_of": (request.n,)})
    common = _common(request, base_id)
    logprobs = request.logprobs
    common = replace(common, max_new_tokens=request.max_tokens, logprobs=logprobs,
                     prompt_logprobs=logprobs if request.echo else None)
    prompts = _prompts(request.prompt)
    per_prompt = [replace(common, text=p) if isinstance(p, str) else replace(common, token_ids=p) for p in prompts]
    return Choices(_fan_out(per_prompt, request.n), request.n, COMPLETION_PARAMS)


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | tuple[int, ...]]:
    """A prompt, a batch of prompts, token ids, or a batch of token-id prompts, as a list of prompts."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidArgument("prompt", "must not be empty")
    if all(isinstance(p, int) for p in prompt):
        return [tuple(p for p in prompt if isinstance(p, int))]
    return [p if isinstance(p, str) else tuple(p) for p in prompt if not isinstance(p, int)]


_CHAT_NEUTRAL: dict[str, tuple[Any, ...]] = {
    **_SHARED_NEUTRAL,
    "response_format": ({"type": "text"},), "tools": ([],), "tool_choice": ("none", "auto"), "functions": ([],),
    "function_call": ("none", "auto"), "modalities": (["text"],), "audio": (), "prediction": (),
    "reasoning_effort": (), "web_search_options": (), "service_tier": ("auto", "default"), "store": (False,),
}


def chat_choices(request: ChatCompletionRequest, base_id: str) -> Choices:
    _neutral(request, _CHAT_NEUTRAL)
    if request.top_logprobs is not None and not request.logprobs:
        raise InvalidArgument("top_logprobs", "needs logprobs: true")
    common = _common(request, base_id)
    budget, param = request.max_completion_tokens, "max_completion_tokens"
    if budget is None and request.max_tokens is not None:
        budget, param = request.max_tokens, "max_tokens"
    messages = tuple(_message(i, m) for i, m in enumerate(request.messages))
    spec = replace(common, messages=messages, max_new_tokens=budget,
                   logprobs=(request.top_logprobs or 0) if request.logprobs else None)
    return Choices(_fan_out([spec], request.n), request.n, {**CHAT_PARAMS, "max_new_tokens": param})


def _message(i: int, message: ChatMessageIn) -> ChatMessage:
    field = f"messages[{i}]"
    if message.role not in _ROLES:
        raise Unsupported(f"{field}.role", f"{message.role!r} is not supported (system, developer, user, assistant)")
    for name in ("name", "tool_calls", "tool_call_id"):
        if getattr(message, name) is not None:
            raise Unsupported(f"{field}.{name}")
    content = message.content
    if content is None:
        raise InvalidArgument(f"{field}.content", "is required")
    if isinstance(content, list):
        for j, part in enumerate(content):
            if part.type != "text" or part.text is None:
                raise Unsupported(f"{field}.content[{j}].type", f"{part.type!r} parts are not supported (text only)")
        content = "\n".join(part.text or "" for part in content)
    return ChatMessage(_ROLES[message.role], content)
