"""The embedding and classification service every front calls: a list of inputs, pooled under one adapter (or the
base model), or classified by a classification adapter's head.

Each input becomes a prefill-only row of the engine's continuous batch (server/engine/pooling.py), validated and
tokenized by the same `RequestBuilder` as a generation, so an adapter's prompt template, the prompt limits and
every error are the generation path's. gRPC's `Embed` and HTTP's `/v1/embeddings` only translate.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace

from quiver.common.errors import InvalidArgument
from quiver.server.api.generation import GenerationBackend
from quiver.server.api.generation_input import GenerationInput
from quiver.server.engine.pooling import EmbedSpec

MAX_INPUTS = 256
"""Inputs in one embedding request (OpenAI allows 2,048; each is a row of the batch, so fewer keep a request from
filling the queue on its own)."""


@dataclass(frozen=True)
class EmbeddingInput:
    """What a client asked to embed: texts (each formatted by the adapter's prompt template) or token id lists."""

    inputs: tuple[str | tuple[int, ...], ...]
    adapter: str = ""
    spec: EmbedSpec = field(default_factory=EmbedSpec)


@dataclass(frozen=True)
class Embeddings:
    vectors: list[list[float]]  # one per input, in order
    prompt_tokens: list[int]  # each input's tokens, templates included

    @property
    def total_tokens(self) -> int:
        return sum(self.prompt_tokens)


class Embedder:
    """Runs `EmbeddingInput`s on a generation backend (a local engine, or Ray Serve's replicas)."""

    def __init__(self, backend: GenerationBackend) -> None:
        self._backend = backend

    async def classify(self, request: EmbeddingInput) -> Classifications:
        """Each input's label probabilities under `request.adapter`, a classification adapter."""
        if not request.adapter:
            raise InvalidArgument("adapter", "name the classification adapter")
        done, labels = await self._run(replace(request, spec=EmbedSpec.classification()))
        return Classifications(labels, done.vectors, done.prompt_tokens)

    async def embed(self, request: EmbeddingInput) -> Embeddings:
        return (await self._run(request))[0]

    async def _run(self, request: EmbeddingInput) -> tuple[Embeddings, tuple[str, ...]]:
        """The rows' output vectors and the adapter's labels (empty for a generation adapter or the base)."""
        if not request.inputs:
            raise InvalidArgument("input", "give at least one input")
        if len(request.inputs) > MAX_INPUTS:
            raise InvalidArgument("input", f"at most {MAX_INPUTS} inputs per request, got {len(request.inputs)}")
        specs = [_generation_input(one, request) for one in request.inputs]
        first = await asyncio.gather(self._backend.prepare(specs[0]), return_exceptions=True)
        adapter = first[0].adapter if not isinstance(first[0], BaseException) else None
        if adapter is not None:  # every input under the version the first resolved, even if a new one lands now
            pinned = f"{adapter.metadata.name}@{adapter.metadata.version}"
            specs = [specs[0], *(replace(spec, adapter=pinned) for spec in specs[1:])]
        rest = await asyncio.gather(*(self._backend.prepare(spec) for spec in specs[1:]), return_exceptions=True)
        prepared = [*first, *rest]
        for i, outcome in enumerate(prepared):
            if isinstance(outcome, InvalidArgument):  # named by the input it is about: `input[2]: text: ...`
                field = f"input[{i}]" if len(specs) > 1 else "input"
                raise InvalidArgument(field, f"{outcome.field}: {outcome.problem}") from outcome
            if isinstance(outcome, BaseException):
                raise outcome
        requests = [r for r in prepared if not isinstance(r, BaseException)]
        vectors: list[list[float] | None] = [None] * len(requests)
        async for i, event in self._backend.run(requests):
            if event.embedding is not None:
                vectors[i] = event.embedding.tolist()
        assert all(v is not None for v in vectors), "every embedding row ends with its vector"
        labels = adapter.metadata.labels if adapter is not None else ()
        return Embeddings([v for v in vectors if v is not None], [len(r.prompt_ids) for r in requests]), labels


@dataclass(frozen=True)
class Classifications:
    labels: tuple[str, ...]  # the adapter's, in its head's order
    probabilities: list[list[float]]  # one per input, in order: one per label, summing to 1
    prompt_tokens: list[int]  # each input's tokens, templates included

    @property
    def total_tokens(self) -> int:
        return sum(self.prompt_tokens)


def _generation_input(one: str | tuple[int, ...], request: EmbeddingInput) -> GenerationInput:
    if isinstance(one, str):
        return GenerationInput(adapter=request.adapter, text=one, embed=request.spec)
    return GenerationInput(adapter=request.adapter, token_ids=one, embed=request.spec)
