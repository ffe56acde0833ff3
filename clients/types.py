"""What the sync and async clients share: result dataclasses, request building and response decoding."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import grpc

from quiver.clients.errors import QuiverRpcError
from quiver.v1 import generation_pb2 as pb

DEFAULT_TARGET = "127.0.0.1:50051"
MAX_LOGPROBS = 20  # the most top tokens a request may ask for (GenerateRequest.logprobs)
"""Where the clients connect when no target is given; `quiver serve`'s default address."""

FinishReason = Literal["length", "eos_token", "stop_sequence"]

_FINISH_REASONS: dict[int, FinishReason] = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_EOS_TOKEN: "eos_token",
    pb.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
}

RequestT = TypeVar("RequestT", pb.GenerateRequest, pb.GenerateStreamRequest)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model, and the most likely tokens at its position."""

    token_id: int
    """The generated token."""
    logprob: float
    """Its natural-log probability (before temperature, top-k, top-p and repetition penalty)."""
    top: list[tuple[int, float]]
    """(token id, log-probability) of the `logprobs` most likely tokens, most likely first."""


@dataclass(frozen=True)
class Generation:
    """A whole completion."""

    text: str
    """The generated text, without the prompt and without any stop sequence."""
    token_ids: list[int]
    """Ids of the generated tokens, in order."""
    finish_reason: FinishReason
    """Why generation ended."""
    prompt_tokens: int
    """Tokens in the prompt after templating."""
    completion_tokens: int
    """Tokens generated."""
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    """One per token id when the request asked for `logprobs`, else empty."""


@dataclass(frozen=True)
class GenerationChunk:
    """One streamed piece of a completion; the finish fields are set on the last chunk only."""

    text: str
    """Newly decoded text (may be empty, e.g. in the last chunk)."""
    token_ids: list[int]
    """Ids of the tokens decoded since the previous chunk."""
    finish_reason: FinishReason | None
    """Why generation ended; last chunk only."""
    prompt_tokens: int | None
    """Tokens in the prompt after templating; last chunk only."""
    completion_tokens: int | None
    """Tokens generated in all; last chunk only."""
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    """One per token id of this chunk when the request asked for `logprobs`, else empty."""


@dataclass(frozen=True)
class ModelInfo:
    """The resident base model; mirrors quiver.v1.ModelInfoResponse field for field."""

    model_name: str
    fingerprint: str
    quantization: str
    device: str
    context_length: int
    resident_bytes: int
    dtype: str
    architecture: str
    max_new_tokens_limit: int
    has_chat_template: bool


def build_request(
    request_cls: type[RequestT],
    *,
    prompt: str | None,
    messages: Sequence[Mapping[str, str]] | None,
    adapter: str,
    max_new_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    repetition_penalty: float | None,
    stop: Sequence[str],
    seed: int | None,
    logprobs: int | None = None,
    ignore_eos: bool = False,
) -> RequestT:
    """A GenerateRequest or GenerateStreamRequest; arguments left as None stay unset on the wire.

    Raises ValueError for a request the wire cannot carry (both or neither input, a malformed message,
    a value out of a field's range); everything else is the server's to judge.
    """
    if isinstance(stop, str):
        raise ValueError("stop: expected a sequence of strings, got one string")
    request = request_cls(adapter=adapter)
    if prompt is not None and messages is None:
        request.text = prompt
    elif messages is not None and prompt is None:
        request.chat.SetInParent()  # An empty conversation is still chat input; the server rejects it.
        request.chat.messages.extend(_chat_message(i, m) for i, m in enumerate(messages))
    else:
        raise ValueError("give exactly one of prompt and messages")
    sampling = {
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "repetition_penalty": repetition_penalty,
        "seed": seed,
    }
    _set_present(request.sampling, sampling, "sampling")
    _set_present(request.stopping, {"max_new_tokens": max_new_tokens}, "stopping")
    if stop:
        request.stopping.stop_sequences.extend(stop)
    if ignore_eos:
        request.stopping.ignore_eos = True
    if logprobs is not None:
        if not isinstance(logprobs, int) or not 0 <= logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs: must be an integer in [0, {MAX_LOGPROBS}], got {logprobs!r}")
        request.logprobs = logprobs
    return request


def _chat_message(index: int, message: Mapping[str, str]) -> pb.ChatMessage:
    unknown = set(message) - {"role", "content"}
    if unknown or "role" not in message or "content" not in message:
        raise ValueError(f"messages[{index}]: expected exactly the keys 'role' and 'content'")
    return pb.ChatMessage(role=message["role"], content=message["content"])


def _set_present(message: Any, values: Mapping[str, object], prefix: str) -> None:
    """Sets each field whose value is not None, so unset ones keep presence false (server defaults)."""
    for name, value in values.items():
        if value is None:
            continue
        try:
            setattr(message, name, value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{prefix}.{name}: {e}") from e


def _finish_reason(value: int) -> FinishReason | None:
    return _FINISH_REASONS.get(value)


def generation_from_response(response: pb.GenerateResponse) -> Generation:
    finish_reason = _finish_reason(response.finish_reason)
    if finish_reason is None:
        # The server always sets it; a reply without one is a broken call, not a result.
        details = f"reply has no finish_reason (got {response.finish_reason})"
        raise QuiverRpcError(grpc.StatusCode.INTERNAL, details)
    return Generation(
        text=response.text,
        token_ids=list(response.token_ids),
        finish_reason=finish_reason,
        prompt_tokens=response.usage.prompt_tokens,
        completion_tokens=response.usage.completion_tokens,
        logprobs=_logprobs(response.logprobs),
    )


def chunk_from_response(response: pb.GenerateStreamResponse) -> GenerationChunk:
    has_usage = response.HasField("usage")
    return GenerationChunk(
        text=response.text,
        token_ids=list(response.token_ids),
        finish_reason=_finish_reason(response.finish_reason),
        prompt_tokens=response.usage.prompt_tokens if has_usage else None,
        completion_tokens=response.usage.completion_tokens if has_usage else None,
        logprobs=_logprobs(response.logprobs),
    )


def _logprobs(entries: Iterable[pb.TokenLogprob]) -> list[TokenLogprob]:
    return [TokenLogprob(e.token_id, e.logprob, [(t.token_id, t.logprob) for t in e.top]) for e in entries]


def model_info_from_response(response: pb.ModelInfoResponse) -> ModelInfo:
    return ModelInfo(**{f.name: getattr(response, f.name) for f in dataclasses.fields(ModelInfo)})


Pooling = Literal["mean", "last"]
_POOLINGS: dict[str, pb.Pooling.ValueType] = {"mean": pb.POOLING_MEAN, "last": pb.POOLING_LAST}


@dataclass(frozen=True)
class Embeddings:
    """The vectors of an Embed call, one per input in order, and each input's prompt tokens (templates
    included)."""

    vectors: list[list[float]]
    prompt_tokens: list[int]


def build_embed_request(inputs: str | Sequence[int] | Sequence[str | Sequence[int]], adapter: str, pooling: str,
                        normalize: bool) -> pb.EmbedRequest:
    """An EmbedRequest: `inputs` is one text, one list of token ids, or a list of either. ValueError for arguments
    the wire cannot carry."""
    if pooling not in _POOLINGS:
        raise ValueError(f"pooling: must be one of {sorted(_POOLINGS)}, got {pooling!r}")
    one_input = isinstance(inputs, str) or bool(inputs and all(isinstance(x, int) for x in inputs))
    several: Sequence[str | Sequence[int]] = [inputs] if one_input else inputs  # type: ignore[list-item,assignment]
    messages = []
    for one in several:
        if isinstance(one, str):
            messages.append(pb.EmbedInput(text=one))
        elif all(isinstance(x, int) and 0 <= x < 2**32 for x in one):
            messages.append(pb.EmbedInput(tokens=pb.TokenIds(ids=one)))
        else:
            raise ValueError("inputs: each must be a text or a list of token ids in [0, 2**32)")
    return pb.EmbedRequest(adapter=adapter, inputs=messages, pooling=_POOLINGS[pooling], normalize=normalize)


def embeddings_from_response(response: pb.EmbedResponse) -> Embeddings:
    return Embeddings([list(e.values) for e in response.embeddings], [e.prompt_tokens for e in response.embeddings])


@dataclass(frozen=True)
class Classification:
    """One input's classification: every label's probability, in the adapter head's order."""

    probabilities: dict[str, float]
    prompt_tokens: int

    @property
    def label(self) -> str:
        """The most likely label."""
        return max(self.probabilities, key=self.probabilities.__getitem__)


def build_classify_request(inputs: str | Sequence[int] | Sequence[str | Sequence[int]], adapter: str
                           ) -> pb.ClassifyRequest:
    """A ClassifyRequest (inputs as `build_embed_request` takes them); ValueError for what the wire cannot carry."""
    if not adapter:
        raise ValueError("adapter: name the classification adapter")
    return pb.ClassifyRequest(adapter=adapter, inputs=build_embed_request(inputs, adapter, "mean", True).inputs)


def classifications_from_response(response: pb.ClassifyResponse) -> list[Classification]:
    return [Classification({p.label: p.probability for p in r.labels}, r.prompt_tokens) for r in response.results]
