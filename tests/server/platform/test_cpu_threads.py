"""The engine thread's claim on torch CPU threads, and its fallbacks when the OpenMP runtime is out of reach."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from quiver.server.platform import cpu_threads


def _on_new_thread(fn: Callable[[], Any]) -> Any:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.skipif(cpu_threads.openmp_runtime() is None, reason="needs torch's OpenMP runtime (Linux)")
def test_the_claiming_thread_gets_its_count_and_threads_started_later_get_one():
    claimed = _on_new_thread(lambda: (cpu_threads.claim_for_this_thread(3), torch.get_num_threads()))
    assert claimed == (3, 3)
    assert _on_new_thread(torch.get_num_threads) == 1


@pytest.mark.skipif(cpu_threads.openmp_runtime() is None or cpu_threads.mkl_threads() is None,
                    reason="needs torch's OpenMP runtime and MKL (x86 Linux builds)")
def test_the_claiming_thread_runs_mkl_on_its_count_too():
    """torch.set_num_threads(1), the process default the claim sets, also sets the calling thread's MKL count."""
    assert _on_new_thread(lambda: (cpu_threads.claim_for_this_thread(3), cpu_threads.mkl_threads())) == (3, 3)


def test_without_the_runtime_the_count_applies_to_every_thread(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(cpu_threads, "openmp_runtime", lambda: None)
    assert _on_new_thread(lambda: cpu_threads.claim_for_this_thread(3)) == 3
    assert _on_new_thread(torch.get_num_threads) == 3


class _IgnoringRuntime:
    """A runtime that is not the one torch uses: setting its count changes nothing torch sees."""

    def omp_set_num_threads(self, count: Any) -> None:
        pass


def test_a_runtime_that_does_not_take_the_count_falls_back_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    monkeypatch.setattr(cpu_threads, "openmp_runtime", _IgnoringRuntime)
    assert _on_new_thread(lambda: cpu_threads.claim_for_this_thread(3)) == 3
    assert _on_new_thread(torch.get_num_threads) == 3
    assert "could not set the engine thread's own OpenMP threads" in caplog.text


def test_zero_means_torchs_default():
    assert _on_new_thread(lambda: cpu_threads.claim_for_this_thread(0)) == cpu_threads.default_threads()
