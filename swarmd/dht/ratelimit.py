"""Rate-limited logging for hostile input: one log line per kind of rejection
per interval (never a traceback per packet). The token buckets per source
address are swarmd.node.ratelimit.RateLimiter."""

from __future__ import annotations

import time
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
