"""Per-worker request statistics, the inputs of every balancing policy.

In-flight is counted live from this process's own calls (begin/end), so
least-connections sees real connections rather than a number nobody updates.
Latency statistics take only successful calls: a fast ERR_OVERLOADED must not
make a saturated worker look quick.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class WorkerStats:
    requests: int = 0  # calls started
    successes: int = 0  # answered with a result
    failures: int = 0  # worker-side failures (closed, timeout, overloaded, refused)
    rejected: int = 0  # answered with a caller error (bad request, unknown model): not the worker's fault
    in_flight: int = 0
    total_latency_ms: float = 0.0
    ewma_ms: float | None = None
    last_request: float | None = None  # wall clock (unix s), for people
    last_error: str | None = None
    sampled_at: float | None = None  # clock time of the latest latency sample

    @property
    def avg_ms(self) -> float | None:
        return self.total_latency_ms / self.successes if self.successes else None

    @property
    def success_rate(self) -> float:
        """Laplace-smoothed so one early failure does not zero a new worker's weight."""
        done = self.successes + self.failures
        return (self.successes + 1) / (done + 2)

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "successes": self.successes,
            "failures": self.failures,
            "rejected": self.rejected,
            "in_flight": self.in_flight,
            "avg_latency_ms": None if self.avg_ms is None else round(self.avg_ms, 3),
            "ewma_latency_ms": None if self.ewma_ms is None else round(self.ewma_ms, 3),
            "success_rate": round(self.success_rate, 4),
            "last_request": self.last_request,
            "last_error": self.last_error,
        }


class StatsBook:
    def __init__(
        self,
        alpha: float = 0.3,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"ewma alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.clock = clock
        self.wall = wall
        self._stats: dict[str, WorkerStats] = {}

    def get(self, public_key: str) -> WorkerStats:
        st = self._stats.get(public_key)
        if st is None:
            st = self._stats[public_key] = WorkerStats()
        return st

    def peek(self, public_key: str) -> WorkerStats | None:
        return self._stats.get(public_key)

    def begin(self, public_key: str) -> float:
        """A call starts; returns its start time for end()."""
        st = self.get(public_key)
        st.requests += 1
        st.in_flight += 1
        st.last_request = self.wall()
        return self.clock()

    def success(self, public_key: str, started: float) -> float:
        st = self.get(public_key)
        st.in_flight = max(0, st.in_flight - 1)
        ms = max(0.0, (self.clock() - started) * 1000.0)
        st.successes += 1
        st.total_latency_ms += ms
        st.ewma_ms = ms if st.ewma_ms is None else self.alpha * ms + (1.0 - self.alpha) * st.ewma_ms
        st.sampled_at = self.clock()
        return ms

    def failure(self, public_key: str, error: str) -> None:
        st = self.get(public_key)
        st.in_flight = max(0, st.in_flight - 1)
        st.failures += 1
        st.last_error = error

    def rejection(self, public_key: str, error: str) -> None:
        st = self.get(public_key)
        st.in_flight = max(0, st.in_flight - 1)
        st.rejected += 1
        st.last_error = error

    def abandon(self, public_key: str) -> None:
        """The caller cancelled: the call neither succeeded nor failed, but it is no longer in flight."""
        st = self.get(public_key)
        st.in_flight = max(0, st.in_flight - 1)

    def forget(self, public_key: str) -> None:
        self._stats.pop(public_key, None)

    def items(self) -> list[tuple[str, WorkerStats]]:
        return sorted(self._stats.items())
