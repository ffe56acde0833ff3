"""Generation on Ray Serve's engine replicas, seen by the fronts as a `GenerationBackend`.

The ingress validates and tokenizes each request itself (the same `RequestBuilder`, over the same store), so a bad
request is refused at the door and the replica runs exactly the adapter version resolved there. What crosses to a
replica is a `PortableRequest`: the request without its store handle, naming the adapter's publication as
`name@version#digest`, which is also the multiplexed model id Ray routes on. Errors come back as the domain errors
raised in the replica; a replica that dies mid-request is UNAVAILABLE for the requests it was running."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from quiver.adapters.store import CONFIG_DIGEST, StoredAdapter
from quiver.common.errors import QuiverError, ResourceExhausted, Unavailable
from quiver.server.api.generation_input import GenerationInput
from quiver.server.api.request_builder import RequestBuilder
from quiver.server.engine.generation_events import GenerationEvent
from quiver.server.engine.request import GenerationRequest


@dataclass(frozen=True)
class PortableRequest:
    """A prepared request as it travels to a replica: `adapter_id` names one publication of an adapter version
    (`adapter_id`), "" for the base model."""

    request: GenerationRequest  # with adapter=None
    adapter_id: str


def adapter_id(stored: StoredAdapter) -> str:
    """`name@version#digest`: a version number may be reused after a delete, so the id also carries what tells two
    publications apart (weights, config, registration time), and a replica never mistakes one for the other."""
    m = stored.metadata
    publication = f"{m.sha256}|{m.extra.get(CONFIG_DIGEST, '')}|{m.created_at}"
    return f"{m.name}@{m.version}#{hashlib.sha256(publication.encode()).hexdigest()[:16]}"


def parse_adapter_id(value: str) -> tuple[str, str]:
    """`name@version#digest` -> ("name@version", "digest")."""
    ref, _, digest = value.partition("#")
    return ref, digest


def portable(request: GenerationRequest) -> PortableRequest:
    adapter = request.adapter
    return PortableRequest(replace(request, adapter=None), adapter_id(adapter) if adapter is not None else "")


def domain_error(error: BaseException) -> BaseException:
    """The error a front should answer with for what a replica call raised."""
    from ray import exceptions as ray_exceptions
    from ray.serve import exceptions as serve_exceptions

    if isinstance(error, QuiverError):  # raised in the replica; Ray re-raises it as an instance of its class
        return error
    if isinstance(error, serve_exceptions.BackPressureError):
        return ResourceExhausted(f"every engine replica's queue is full: {error}")
    if isinstance(error, ray_exceptions.RayActorError | ray_exceptions.ActorUnavailableError):
        return Unavailable(f"the engine replica running this request failed: {type(error).__name__}")
    return error


class RemoteEventStream:
    """The events of requests running on replicas, `(index, event)` as they arrive, like `EventStream`."""

    def __init__(self, engine: Any, requests: Sequence[GenerationRequest]) -> None:
        self._responses = []
        for request in requests:
            sent = portable(request)
            options = engine.options(stream=True, multiplexed_model_id=sent.adapter_id)
            self._responses.append(options.generate.remote(sent))

    def cancel(self) -> None:
        for response in self._responses:
            response.cancel()

    async def __aiter__(self) -> AsyncIterator[tuple[int, GenerationEvent]]:
        queue: asyncio.Queue[tuple[int, GenerationEvent | BaseException | None]] = asyncio.Queue()

        async def pump(i: int, response: Any) -> None:
            try:
                async for event in response:
                    await queue.put((i, event))
                await queue.put((i, None))
            except Exception as e:
                await queue.put((i, e))

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(self._responses)]
        running = len(tasks)
        try:
            while running:
                i, item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise domain_error(item)
                else:
                    yield i, item
        finally:
            self.cancel()
            for task in tasks:
                task.cancel()

    async def events(self) -> AsyncIterator[GenerationEvent]:
        try:
            async for _, event in self:
                yield event
        finally:
            self.cancel()


class RemoteGenerator:
    """`GenerationBackend` over the engine deployment's handle: prepared here, run on the replicas."""

    def __init__(self, builder: RequestBuilder, engine: Any) -> None:
        self._builder = builder
        self._engine = engine

    @property
    def tokenizer(self) -> Any:
        return self._builder.tokenizer

    async def prepare(self, spec: GenerationInput) -> GenerationRequest:
        return await asyncio.to_thread(self._builder.build, spec)

    def run(self, requests: Sequence[GenerationRequest]) -> RemoteEventStream:
        return RemoteEventStream(self._engine, requests)
