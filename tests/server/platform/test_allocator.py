"""--malloc-arenas: glibc's arena limit is set where glibc is the allocator, and nowhere else."""

from __future__ import annotations

import platform

import pytest

from quiver.server.config import ServerConfig
from quiver.server.platform.allocator import limit_malloc_arenas


def test_the_limit_is_set_on_glibc_and_zero_leaves_the_default(caplog: pytest.LogCaptureFixture):
    caplog.set_level("INFO", logger="quiver.server.platform.allocator")
    assert limit_malloc_arenas(0) is False
    glibc = platform.libc_ver()[0] == "glibc"
    assert limit_malloc_arenas(2) is glibc
    assert ("at most 2 (glibc)" if glibc else "no effect") in caplog.text  # chosen once at start-up, and logged


def test_a_negative_count_is_refused():
    with pytest.raises(ValueError, match="--malloc-arenas"):
        ServerConfig(malloc_arenas=-1)
