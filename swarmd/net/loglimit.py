"""Rate-limited log lines for events a hostile peer can trigger at will.

Garbage, failed handshakes and protocol violations each produce one log line,
but at most one per kind per period: a flood costs counters, not disk. The
next line that gets through says how many were suppressed.
"""

from __future__ import annotations

import time
from typing import Any

from loguru import logger


class LogLimiter:
    """At most one line per key per period."""

    def __init__(self, period: float = 10.0, max_keys: int = 1000) -> None:
        self.period = period
        self.max_keys = max_keys
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """None when the line must be dropped, else how many were dropped before it."""
        now = time.monotonic()
        if now - self._last.get(key, -1e18) < self.period:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        if len(self._last) >= self.max_keys:
            self._last.clear()
            self._suppressed.clear()
        self._last[key] = now
        return self._suppressed.pop(key, 0)

    def log(self, key: str, level: str, message: str, **fields: Any) -> None:
        dropped = self.allow(key)
        if dropped is None:
            return
        if dropped:
            fields["suppressed"] = dropped
        logger.bind(**fields).log(level, message)


hostile = LogLimiter()
