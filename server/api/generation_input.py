"""A generation request as every front hands it to the core: one typed value, no wire types.

gRPC (server/grpc_front/service.py) and the OpenAI-compatible HTTP front (server/http/) each translate their own
messages into a `GenerationInput`; `RequestBuilder` (server/api/request_builder.py) validates and tokenizes it in
one place. Errors name fields by the names below (`top_p`, `max_new_tokens`, `messages[2].role`); each front
renames them to its own spelling (`FIELD_NAMES` in server/grpc_front/service.py, `param` in the HTTP errors), so a
rule and its message exist once.
"""

from __future__ import annotations

from dataclasses import dataclass

from quiver.server.engine.pooling import EmbedSpec


@dataclass(frozen=True)
class ChatMessage:
    """One chat turn; roles are checked by the builder (`system`, `user`, `assistant`)."""

    role: str
    content: str


@dataclass(frozen=True)
class GenerationInput:
    """What a client asked for. Exactly one of `text`, `messages` and `token_ids` is set; None elsewhere means
    "not given" (the server's default applies), which is not the same as a zero."""

    adapter: str = ""
    """`name` or `name@version` of a registered adapter; empty for the base model."""
    text: str | None = None
    """A raw prompt, formatted by the adapter's prompt template when it has one."""
    messages: tuple[ChatMessage, ...] | None = None
    """Chat turns, rendered by the model's chat template (the adapter's template wraps the last user turn)."""
    token_ids: tuple[int, ...] | None = None
    """A prompt given as token ids, sent to the model as they are (an adapter's template cannot apply)."""
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    max_new_tokens: int | None = None
    stop_sequences: tuple[str, ...] = ()
    ignore_eos: bool = False
    """Generate past end-of-sequence tokens up to `max_new_tokens` (vLLM's `ignore_eos`, for benchmarks)."""
    logprobs: int | None = None
    """None: no log-probabilities; n: each generated token's and the n most likely ones at its position."""
    prompt_logprobs: int | None = None
    """None: none; n: each prompt token's log-probability (the first has none) and the n most likely ones."""
    embed: EmbedSpec | None = None
    """An embedding instead of a generation: the input's pooled hidden states (server/api/embeddings.py)."""
