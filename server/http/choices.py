"""One HTTP request's choices as the engine reports them, shaped into OpenAI's objects.

`ChoiceState` accumulates one choice's text, tokens and log-probabilities from its events; `completion_*` and
`chat_*` turn states and events into response bodies and stream chunks. Token strings are the tokenizer's
decoding of each id alone, as vLLM reports them (`bytes` are their UTF-8).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from quiver.server.engine.generation_events import FinishReason, GenerationEvent
from quiver.server.engine.logprobs import TokenLogprob

FINISH_REASONS = {FinishReason.LENGTH: "length", FinishReason.EOS_TOKEN: "stop", FinishReason.STOP_SEQUENCE: "stop"}


class TokenTexts:
    """Each token id's text alone, cached (a vocabulary is small, and top log-probabilities repeat ids)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.text = functools.lru_cache(maxsize=1 << 16)(self._decode)

    def _decode(self, token_id: int) -> str:
        text: str = self._tokenizer.decode([token_id])
        return text

    def prompt_text(self, ids: tuple[int, ...]) -> str:
        text: str = self._tokenizer.decode(list(ids))
        return text


@dataclass
class ChoiceState:
    """What one choice has produced so far."""

    index: int
    texts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None

    def add(self, event: GenerationEvent) -> None:
        self.texts.append(event.text)
        self.logprobs.extend(event.logprobs)
        if event.prompt_logprobs:
            self.prompt_logprobs = event.prompt_logprobs
        self.prompt_tokens, self.completion_tokens = event.prompt_tokens, event.completion_tokens
        if event.finish_reason is not None:
            self.finish_reason = FINISH_REASONS[event.finish_reason]

    @property
    def text(self) -> str:
        return "".join(self.texts)


def usage(states: list[ChoiceState], n: int) -> dict[str, int]:
    """Token counts of a whole request: each prompt counted once (not once per choice), as vLLM does."""
    prompt = sum(s.prompt_tokens for s in states[::n])
    completion = sum(s.completion_tokens for s in states)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# -- completions ---------------------------------------------------------------------------------------------


def completion_logprobs(
    texts: TokenTexts, tokens: list[tuple[int, TokenLogprob | None]], offset: int
) -> dict[str, list[Any]]:
    """OpenAI's legacy logprobs object for `tokens`, (id, log-probability) pairs whose log-probability is None for
    a prompt's first token (nothing predicts it); `offset` is where the first token's text starts in the choice's
    text. The chosen token is always in its top map, as OpenAI documents."""
    strings: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for token_id, entry in tokens:
        token_text = texts.text(token_id)
        strings.append(token_text)
        offsets.append(offset)
        offset += len(token_text)
        if entry is None:
            values.append(None)
            tops.append(None)
            continue
        values.append(entry.logprob)
        top = {texts.text(t): v for t, v in entry.top}
        top.setdefault(token_text, entry.logprob)
        tops.append(top)
    return {"tokens": strings, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def joined(first: dict[str, list[Any]], then: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Two logprobs objects one after the other (an echoed prompt's, then the completion's)."""
    return {key: [*first[key], *then[key]] for key in first}


def scored_prompt(prompt_ids: tuple[int, ...], scored: tuple[TokenLogprob | None, ...]
                  ) -> list[tuple[int, TokenLogprob | None]]:
    """The prompt's tokens with their log-probabilities for an echo (all None when none were scored)."""
    return [(token, scored[j] if j < len(scored) else None) for j, token in enumerate(prompt_ids)]


def generated(entries: list[TokenLogprob]) -> list[tuple[int, TokenLogprob | None]]:
    return [(e.token_id, e) for e in entries]


# -- chat ----------------------------------------------------------------------------------------------------


def chat_logprobs(texts: TokenTexts, entries: list[TokenLogprob]) -> dict[str, list[dict[str, Any]]]:
    """OpenAI's chat logprobs object: each token with its top alternatives (`bytes`: the text's UTF-8)."""

    def one(token_id: int, logprob: float) -> dict[str, Any]:
        text = texts.text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [
        {**one(e.token_id, e.logprob), "top_logprobs": [one(t, v) for t, v in e.top]} for e in entries
    ]}
