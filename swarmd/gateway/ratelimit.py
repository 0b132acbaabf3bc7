"""Per-key token buckets: a burst is allowed, the sustained rate is bounded.

Sans-IO: the caller passes the clock, so tests drive time exactly.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class TokenBucket:
    rate: float  # tokens per second
    burst: float  # capacity
    tokens: float = -1.0
    stamp: float = 0.0

    def take(self, now: float, cost: float = 1.0) -> float:
        """0.0 if the request may go now, else the seconds until it could."""
        if self.tokens < 0:
            self.tokens, self.stamp = self.burst, now
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.stamp = now
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate


class RateLimiter:
    """A bounded map of buckets (least recently used evicted), one per key or client address."""

    def __init__(self, rate: float, burst: float, max_buckets: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_buckets = max_buckets
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, who: str, now: float, rate: float | None = None, burst: float | None = None) -> float:
        bucket = self._buckets.get(who)
        rate = rate or self.rate
        burst = burst or self.burst
        if bucket is None:
            bucket = self._buckets[who] = TokenBucket(rate, burst)
            if len(self._buckets) > self.max_buckets:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(who)
            bucket.rate, bucket.burst = rate, burst
        return bucket.take(now)
