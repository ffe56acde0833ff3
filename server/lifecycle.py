"""The server's life after start-up: health that follows the engine, and the drain at shutdown.

`HealthMonitor` watches the engine from the event loop: a dead engine thread makes the server DEAD (every
waiting call fails with UNAVAILABLE at once, and `died` is set so the process exits non-zero for the
orchestrator to restart it); an engine that has work but ends no step within `--engine-stall-seconds` makes it
STALLED until steps resume. `drain` is SIGTERM's path: refuse new calls, let running generations finish within
`--drain-seconds` (or until `force` is set by a second signal), then end the rest with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from quiver.server.api.serving_state import Phase, ServingState

log = logging.getLogger(__name__)

_POLL_S = 0.05
MONITOR_PERIOD_S = 0.25


class WatchedEngine(Protocol):
    """What the monitor and the drain read of the engine (server/engine/engine.py)."""

    failure: BaseException | None

    @property
    def alive(self) -> bool: ...

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    def stalled_seconds(self) -> float: ...

    def fail_pending(self) -> None: ...

    def stop(self) -> None: ...


class Health:
    """gRPC health for every service name, kept equal to the serving state's readiness."""

    def __init__(self, servicer: health_aio.HealthServicer, names: tuple[str, ...]) -> None:
        self.servicer = servicer
        self._names = ("", *names)

    async def follow(self, state: ServingState) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if state.ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self._names:
            await self.servicer.set(name, status)


class HealthMonitor:
    """Moves the serving state with the engine's health (module doc); `died` is set when the engine thread died."""

    def __init__(self, engine: WatchedEngine, state: ServingState, health: Health, stall_seconds: float) -> None:
        self._engine = engine
        self._state = state
        self._health = health
        self._stall = stall_seconds
        self.died = asyncio.Event()

    async def run(self) -> None:
        while True:
            await self.check()
            if self.died.is_set():
                return
            await asyncio.sleep(MONITOR_PERIOD_S)

    async def check(self) -> None:
        """One look at the engine."""
        engine, state = self._engine, self._state
        if state.phase is Phase.DRAINING:  # the engine stops on purpose now
            return
        if not engine.alive:
            log.critical("the engine thread died (%r): failing every call and exiting", engine.failure)
            state.enter(Phase.DEAD)
            engine.fail_pending()
            await self._health.follow(state)
            self.died.set()
            return
        stalled = engine.stalled_seconds()
        if state.phase is Phase.SERVING and stalled > self._stall:
            log.error("the engine has had work but finished no step for %.1fs: not serving", stalled)
            state.enter(Phase.STALLED)
            await self._health.follow(state)
        elif state.phase is Phase.STALLED and stalled <= self._stall:
            log.warning("the engine finishes steps again: serving")
            state.enter(Phase.SERVING)
            await self._health.follow(state)


async def drain(state: ServingState, health: Health, engine: WatchedEngine, seconds: float,
                force: asyncio.Event | None = None) -> None:
    """Refuse new calls, let work finish within `seconds` (or until `force`), then stop the engine: what is still
    running or waiting ends with UNAVAILABLE."""
    state.enter(Phase.DRAINING)
    await health.servicer.enter_graceful_shutdown()  # NOT_SERVING for every name, and kept so
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while (state.in_flight or engine.num_running or engine.num_waiting) and loop.time() < end:
        if force is not None and force.is_set():
            break
        await asyncio.sleep(_POLL_S)
    left = engine.num_running + engine.num_waiting
    if left:
        log.warning("drain: %d generations still running after %.1fs end with UNAVAILABLE", left, seconds)
    await asyncio.to_thread(engine.stop)
