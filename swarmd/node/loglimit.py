"""Rate-limited log lines for events a hostile peer can trigger at will.

Garbage, failed handshakes, floods and protocol violations each produce one
log line, but at most one per kind per period: a flood costs counters, not
disk. The next line that gets through says how many were suppressed. One
limiter per process for the connection and RPC layers (`hostile`), one per
DHT socket (a line a second per kind, and `counts` for its tests and stats).
"""

from __future__ import annotations

import time
from typing import Any

from loguru import logger


class LogLimiter:
    """At most one line per key per period; `counts` says how many events each key had."""

    def __init__(self, period: float = 10.0, max_keys: int = 1000, **bind: Any) -> None:
        self.period = period
        self.max_keys = max_keys
        self._log = logger.bind(**bind) if bind else logger
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self.counts: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """None when the line must be dropped, else how many were dropped before it."""
        now = time.monotonic()
        if len(self.counts) >= self.max_keys and key not in self.counts:
            self._last.clear()
            self._suppressed.clear()
            self.counts.clear()
        self.counts[key] = self.counts.get(key, 0) + 1
        if now - self._last.get(key, -1e18) < self.period:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._suppressed.pop(key, 0)

    def log(self, key: str, level: str, message: str, **fields: Any) -> None:
        dropped = self.allow(key)
        if dropped is None:
            return
        if dropped:
            fields["suppressed"] = dropped
        self._log.bind(**fields).log(level, message)

    def warn(self, key: str, message: str, **fields: Any) -> None:
        self.log(key, "WARNING", message, kind=key, **fields)


hostile = LogLimiter()
