"""POST /v1/embeddings (OpenAI's Embeddings API) and POST /v1/classify (vLLM's) on the embedding core
(server/api/embeddings.py).

`input` is a string, a list of strings, token ids or a list of token-id lists; `model` names the base model or an
adapter of any kind, whose prompt template applies to text inputs. Vectors come back as floats, or base64
(little-endian float32) as the `openai` client asks by default. Quiver's `pooling` ("mean" or "last") and
`normalize` go through the client's `extra_body`.
"""

from __future__ import annotations

import base64
import time
import uuid

import torch
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from quiver.common.errors import InvalidArgument, Unsupported
from quiver.server.api.embeddings import Embedder, EmbeddingInput
from quiver.server.api.generation import GenerationBackend
from quiver.server.engine.pooling import EmbedSpec, Pooling
from quiver.server.http.errors import error_response
from quiver.server.http.schema import ClassifyRequest, EmbeddingRequest, parse
from quiver.server.http.translate import adapter_of

_FORMATS = ("float", "base64")
_POOLINGS = {p.value: p for p in Pooling}
_PARAMS = {"adapter": "model"}


class Embeddings:
    def __init__(self, generator: GenerationBackend, base_id: str) -> None:
        self._embedder = Embedder(generator)
        self._base_id = base_id

    async def handle(self, request: Request) -> Response:
        try:
            body = parse(EmbeddingRequest, await request.body())
            done = await self._embedder.embed(_embedding_input(body, self._base_id))
        except Exception as e:
            return error_response(e, _PARAMS)
        data = [{"object": "embedding", "index": i, "embedding": _encoded(vector, body.encoding_format)}
                for i, vector in enumerate(done.vectors)]
        usage = {"prompt_tokens": done.total_tokens, "total_tokens": done.total_tokens}
        return JSONResponse({"object": "list", "data": data, "model": body.model, "usage": usage})


class Classify:
    """POST /v1/classify, vLLM's shape: per input the most likely `label`, `probs` in the head's order and
    `num_classes` (the label names are the adapter's, in `GET /v1/models/{id}`)."""

    def __init__(self, generator: GenerationBackend, base_id: str) -> None:
        self._embedder = Embedder(generator)
        self._base_id = base_id

    async def handle(self, request: Request) -> Response:
        try:
            body = parse(ClassifyRequest, await request.body())
            done = await self._embedder.classify(EmbeddingInput(inputs_of(body.input),
                                                                adapter_of(body.model, self._base_id)))
        except Exception as e:
            return error_response(e, _PARAMS)
        data = [{"index": i, "label": done.labels[max(range(len(p)), key=p.__getitem__)], "probs": p,
                 "num_classes": len(p)} for i, p in enumerate(done.probabilities)]
        usage = {"prompt_tokens": done.total_tokens, "total_tokens": done.total_tokens, "completion_tokens": 0}
        return JSONResponse({"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                             "model": body.model, "data": data, "usage": usage})


def inputs_of(raw: str | list[str] | list[int] | list[list[int]]) -> tuple[str | tuple[int, ...], ...]:
    """OpenAI's `input`: one text, one token-id list, or a list of either."""
    if isinstance(raw, str):
        return (raw,)
    if raw and all(isinstance(x, int) for x in raw):
        return (tuple(raw),)  # type: ignore[arg-type]
    return tuple(x if isinstance(x, str) else tuple(x) for x in raw)  # type: ignore[union-attr,arg-type]


def _embedding_input(body: EmbeddingRequest, base_id: str) -> EmbeddingInput:
    if body.encoding_format not in _FORMATS:
        raise InvalidArgument("encoding_format", f"must be one of {list(_FORMATS)}")
    if body.pooling not in _POOLINGS:
        raise InvalidArgument("pooling", f"must be one of {sorted(_POOLINGS)}")
    if body.dimensions is not None:
        raise Unsupported("dimensions", "cannot shorten this model's embeddings; leave it unset")
    spec = EmbedSpec(_POOLINGS[body.pooling], body.normalize)
    return EmbeddingInput(inputs_of(body.input), adapter_of(body.model, base_id), spec)


def _encoded(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(torch.tensor(vector, dtype=torch.float32).numpy().astype("<f4").tobytes()).decode()
