"""Bounded, rate-limited bookkeeping for hostile input: one log line per
kind of rejection per interval (never a traceback per packet), and a token
bucket per source address whose table cannot grow without bound."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

from loguru import logger


class RateLimitedLog:
    """Logs the first event of a kind, then at most one line per interval that
    says how many were suppressed. A flood of garbage costs one line a second."""

    def __init__(self, interval: float = 1.0, **bind: Any) -> None:
        self.interval = interval
        self._log = logger.bind(**bind)
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self.counts: dict[str, int] = {}

    def warn(self, kind: str, message: str, **fields: Any) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        suppressed = self._suppressed.pop(kind, 0)
        self._last[kind] = now
        self._log.bind(kind=kind, suppressed=suppressed, **fields).warning(message)


class SourceLimiter:
    """Token bucket per source address, LRU-bounded to max_sources entries."""

    def __init__(self, rate: float, burst: float, max_sources: int) -> None:
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self._buckets: OrderedDict[Any, list[float]] = OrderedDict()

    def allow(self, source: Any, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        b = self._buckets.get(source)
        if b is None:
            if len(self._buckets) >= self.max_sources:
                self._buckets.popitem(last=False)
            b = self._buckets[source] = [self.burst, now]
        else:
            self._buckets.move_to_end(source)
            b[0] = min(self.burst, b[0] + (now - b[1]) * self.rate)
            b[1] = now
        if b[0] < 1.0:
            return False
        b[0] -= 1.0
        return True

    def __len__(self) -> int:
        return len(self._buckets)
