"""Whether the server serves, shared by both fronts, health and readiness: one state, so gRPC health, HTTP
`/ready` and `/health`, and the refusal of new calls never disagree.

    LOADING -> SERVING <-> STALLED          (the engine has work but ended no step within --engine-stall-seconds)
                  |            |
                  v            v
               DRAINING      DEAD           (the engine thread died: the process exits non-zero)

New calls are refused (UNAVAILABLE / 503) while LOADING, DRAINING or DEAD; while STALLED they still queue (the
engine may recover) but readiness says no. Liveness (`/health`) fails only when DEAD or STALLED: what a restart
cures. Health, reflection, metrics, `/health` and `/ready` answer in every phase.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from quiver.common.errors import QuiverError, Unavailable


class Phase(enum.Enum):
    LOADING = "loading"
    SERVING = "serving"
    STALLED = "stalled"
    DRAINING = "draining"
    DEAD = "dead"


_REFUSALS = {
    Phase.LOADING: "the server is loading its model",
    Phase.DRAINING: "the server is shutting down",
    Phase.DEAD: "the engine stopped after an internal error; the server is restarting",
}


@dataclass
class ServingState:
    """The serving phase and the calls in flight on both fronts (event-loop thread only). A state made without a
    phase serves: fronts built around an already running core (Ray Serve's ingress) start there."""

    phase: Phase = Phase.SERVING
    in_flight: int = 0

    @property
    def ready(self) -> bool:
        """Whether a Generate would be served now: gRPC health SERVING, HTTP /ready 200."""
        return self.phase is Phase.SERVING

    @property
    def live(self) -> bool:
        """Whether the process is worth keeping: HTTP /health 200."""
        return self.phase not in (Phase.DEAD, Phase.STALLED)

    @property
    def draining(self) -> bool:
        return self.phase is Phase.DRAINING

    def refusal(self) -> QuiverError | None:
        """The error a new call gets now, or None when it may go on."""
        reason = _REFUSALS.get(self.phase)
        return Unavailable(reason) if reason is not None else None

    def enter(self, phase: Phase) -> bool:
        """Move to `phase` unless the server is already leaving (DRAINING and DEAD are final); whether it moved."""
        if self.phase in (Phase.DRAINING, Phase.DEAD) and phase is not Phase.DEAD:
            return False
        self.phase = phase
        return True
