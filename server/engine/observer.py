"""What the engine reports of its own work as it happens, for metrics: the engine calls an `EngineObserver`, and
knows nothing of Prometheus (the API layer implements one: server/api/engine_metrics.py).

Calls come from the engine thread (forwards, queue waits, device loads) and from the host tier's loader threads
(host loads), so an implementation must be thread-safe and fast: it runs inside a step.
"""

from __future__ import annotations

import enum


class Phase(enum.Enum):
    """Which kind of forward ran: a prefill (a group of prompts or one chunk of a long one) or a decode step."""

    PREFILL = "prefill"
    DECODE = "decode"


class Tier(enum.Enum):
    """Where an adapter was loaded to: host memory (from the store) or the device (from the host tier)."""

    HOST = "host"
    DEVICE = "device"


class EngineObserver:
    """Does nothing: the engine's default. Subclasses override what they record."""

    def forward(self, phase: Phase, seconds: float, rows: int, tokens: int) -> None:
        """One forward of `rows` rows and `tokens` positions took `seconds` (synchronized with the device)."""

    def queued(self, seconds: float) -> None:
        """A request started its first prefill `seconds` after it was submitted."""

    def adapter_loaded(self, tier: Tier, seconds: float) -> None:
        """A cold adapter took `seconds` to load into `tier`."""
