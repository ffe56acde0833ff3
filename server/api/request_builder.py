"""Turns a `GenerationInput` into a validated, tokenized `GenerationRequest` for the engine.

Every user mistake becomes `InvalidArgument` naming the offending field (by `GenerationInput`'s names; each front
renames them to its own), so clients get INVALID_ARGUMENT / 400 with a precise message and the engine only ever
sees valid requests.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from quiver.adapters.store import StoredAdapter
from quiver.common.errors import FailedPrecondition, InvalidArgument, NotFound
from quiver.server.api.generation_input import ChatMessage, GenerationInput
from quiver.server.engine.logprobs import MAX_TOP_LOGPROBS
from quiver.server.engine.request import GenerationRequest, virtual_tokens
from quiver.server.engine.sampling import SamplingParams

MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 256
CHAT_ROLES = frozenset({"system", "user", "assistant"})
MAX_SEED = 2**64  # seeds are uint64, as in the proto


@dataclass(frozen=True)
class RequestLimits:
    """What a request may ask for on this server."""

    context_length: int
    max_new_tokens_limit: int
    default_max_new_tokens: int
    max_input_tokens: int = 0
    """Most prompt tokens (after any template; 0: the context length is the only bound)."""


# Sampling field -> (test a set value must pass, what the message says otherwise).
_SAMPLING_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "temperature": (lambda v: math.isfinite(v) and v >= 0, "must be a finite number >= 0"),
    "top_p": (lambda v: math.isfinite(v) and 0 < v <= 1, "must be in (0, 1]"),
    "top_k": (lambda v: v >= 0, "must be >= 0"),
    "repetition_penalty": (lambda v: 0.01 <= v <= 100, "must be in [0.01, 100]"),
    "seed": (lambda v: 0 <= v < MAX_SEED, "must be in [0, 2**64)"),
}


class AdapterResolver(Protocol):
    """Finds a registered adapter by `name` or `name@version`; raises NotFound (or InvalidArgument)."""

    def __call__(self, ref: str) -> StoredAdapter: ...


def _no_adapters(ref: str) -> StoredAdapter:
    raise NotFound(f"adapter {ref!r} not found")


class RequestBuilder:
    """Validates and tokenizes requests against one tokenizer and one set of limits."""

    def __init__(self, tokenizer: Any, limits: RequestLimits, resolve_adapter: AdapterResolver = _no_adapters) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = len(tokenizer)
        self._limits = limits
        # No token spells more characters than its longest vocabulary entry, so a text longer than the prompt limit
        # times that (with room for Unicode normalisation) cannot fit: refused without tokenizing it.
        longest = max((len(piece) for piece in tokenizer.get_vocab()), default=1)
        self._max_chars = 4 * longest * (limits.max_input_tokens or limits.context_length)
        self._resolve_adapter = resolve_adapter

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def build(self, request: GenerationInput) -> GenerationRequest:
        # Unknown names fail here with NOT_FOUND: never a base-model answer.
        adapter = self._resolve_adapter(request.adapter) if request.adapter else None
        template = adapter.metadata.prompt_template if adapter else None
        virtual = virtual_tokens(adapter)
        _check_task(request, adapter)
        chat = adapter is not None and adapter.metadata.chat_template
        prompt_ids = self._prompt_ids(request, template, virtual, chat)
        if request.embed is not None:  # a prefill-only row
            return GenerationRequest(tuple(prompt_ids), SamplingParams(), 0, (), adapter, embed=request.embed)
        max_new_tokens = self._max_new_tokens(request.max_new_tokens, len(prompt_ids) + virtual)
        return GenerationRequest(
            prompt_ids=tuple(prompt_ids),
            sampling=_sampling_params(request),
            max_new_tokens=max_new_tokens,
            stop_sequences=_stop_sequences(request.stop_sequences),
            adapter=adapter,
            logprobs=_top_count("logprobs", request.logprobs),
            prompt_logprobs=_top_count("prompt_logprobs", request.prompt_logprobs),
            ignore_eos=request.ignore_eos,
        )

    def _prompt_ids(self, request: GenerationInput, template: str | None, virtual: int, chat: bool) -> list[int]:
        """The prompt's tokens; `chat`: the adapter was trained through the chat template, so a plain text is
        rendered as its one user turn, exactly as the trainer rendered its rows."""
        given = [name for name in ("text", "messages", "token_ids") if getattr(request, name) is not None]
        if len(given) != 1:
            raise InvalidArgument("input", "set exactly one of text, messages and token_ids")
        kind = given[0]
        characters = len(request.text or "") + sum(len(m.content) for m in request.messages or ())
        if characters > self._max_chars:
            raise InvalidArgument(kind, f"prompt of {characters} characters is longer than this server's prompts "
                                  f"can be ({self._limits.max_input_tokens or self._limits.context_length} tokens)")
        if request.text is not None:
            if not request.text:
                raise InvalidArgument("text", "must not be empty")
            if chat:
                ids = self._chat_ids((ChatMessage(role="user", content=request.text),), template)
            else:
                text = request.text if template is None else template.format(input=request.text)
                ids = list(self._tokenizer(text, add_special_tokens=False)["input_ids"])
        elif request.messages is not None:
            ids = self._chat_ids(request.messages, template)
        else:
            self._check_input_tokens(kind, len(request.token_ids or ()))  # before copying a huge list
            ids = self._token_ids(request.token_ids or (), template)
        if not ids:
            raise InvalidArgument(kind, "tokenizes to no tokens")
        self._check_input_tokens(kind, len(ids))
        if len(ids) + virtual >= self._limits.context_length:
            raise InvalidArgument(
                kind, f"prompt is {len(ids) + virtual} tokens; the context holds {self._limits.context_length}"
            )
        return ids

    def _check_input_tokens(self, kind: str, count: int) -> None:
        limit = self._limits.max_input_tokens
        if limit and count > limit:
            raise InvalidArgument(kind, f"prompt is {count} tokens; this server accepts at most {limit} "
                                  "(--max-input-tokens)")

    def _token_ids(self, ids: tuple[int, ...], template: str | None) -> list[int]:
        if template is not None:  # the adapter was trained on text around its template: ids cannot be templated
            raise InvalidArgument("token_ids", "this adapter has a prompt template; send the prompt as text")
        for i, token in enumerate(ids):
            if not 0 <= token < self._vocab_size:
                raise InvalidArgument(f"token_ids[{i}]", f"{token} is not a token id (vocabulary of "
                                      f"{self._vocab_size})")
        return list(ids)

    def _chat_ids(self, chat: tuple[ChatMessage, ...], template: str | None) -> list[int]:
        if not chat:
            raise InvalidArgument("messages", "must hold at least one message")
        for i, message in enumerate(chat):
            if message.role not in CHAT_ROLES:
                raise InvalidArgument(f"messages[{i}].role", f"must be one of {sorted(CHAT_ROLES)}")
            if not message.content:
                raise InvalidArgument(f"messages[{i}].content", "must not be empty")
        if not self._tokenizer.chat_template:
            raise FailedPrecondition("this model has no chat template; send text instead")
        messages = [{"role": m.role, "content": m.content} for m in chat]
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if template is not None and users:  # the adapter was trained on its template around the user's words
            messages[users[-1]]["content"] = template.format(input=messages[users[-1]]["content"])
        rendered: str = self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The template already holds any special tokens the model expects.
        return list(self._tokenizer(rendered, add_special_tokens=False)["input_ids"])

    def _max_new_tokens(self, value: int | None, prompt_len: int) -> int:
        room = self._limits.context_length - prompt_len
        if value is None:
            return min(self._limits.default_max_new_tokens, room)
        limit = self._limits.max_new_tokens_limit
        if not 1 <= value <= limit:
            raise InvalidArgument("max_new_tokens", f"must be in [1, {limit}], got {value}")
        if value > room:
            raise InvalidArgument(
                "max_new_tokens",
                f"prompt ({prompt_len} tokens) plus {value} new tokens exceeds the context "
                f"({self._limits.context_length} tokens)",
            )
        return value


def _check_task(request: GenerationInput, adapter: StoredAdapter | None) -> None:
    """A classification needs a classification adapter, and a classification adapter only classifies or embeds
    (its head is not a language model's)."""
    classifier = adapter is not None and adapter.metadata.task == "classify"
    if request.embed is not None and request.embed.classify and not classifier:
        what = f"adapter {request.adapter!r} is not" if adapter is not None else "the base model has no"
        raise FailedPrecondition(f"{what} a classification head: classify with a SEQ_CLS adapter")
    if request.embed is None and classifier:
        raise FailedPrecondition(f"adapter {request.adapter!r} is a classification adapter: use Classify "
                                 "(or Embed), not generation")


# Below this a temperature only overflows the softmax; such requests decode greedily, as in vLLM.
GREEDY_BELOW = 1e-5


def _sampling_params(request: GenerationInput) -> SamplingParams:
    values: dict[str, Any] = {}
    for name, (valid, problem) in _SAMPLING_RULES.items():
        value = getattr(request, name)
        if value is None:
            continue
        if not valid(value):
            raise InvalidArgument(name, f"{problem}, got {value}")
        values[name] = value
    if values.get("temperature", 0.0) < GREEDY_BELOW:
        values["temperature"] = 0.0
    return SamplingParams(**values)


def _top_count(field: str, value: int | None) -> int | None:
    if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
        raise InvalidArgument(field, f"must be in [0, {MAX_TOP_LOGPROBS}], got {value}")
    return value


def _stop_sequences(stops: tuple[str, ...]) -> tuple[str, ...]:
    if len(stops) > MAX_STOP_SEQUENCES:
        raise InvalidArgument("stop_sequences", f"at most {MAX_STOP_SEQUENCES} are allowed")
    for i, stop in enumerate(stops):
        if not stop:
            raise InvalidArgument(f"stop_sequences[{i}]", "must not be empty")
        if len(stop) > MAX_STOP_SEQUENCE_CHARS:
            raise InvalidArgument(f"stop_sequences[{i}]", f"longer than {MAX_STOP_SEQUENCE_CHARS} characters")
    return stops
