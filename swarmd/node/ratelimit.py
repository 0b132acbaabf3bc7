"""The one token bucket: a burst is allowed, the sustained rate is bounded.

`TokenBucket` is one bucket; `RateLimiter` keeps one per key (API key, client
address, DHT source, peer key) in a map bounded by evicting the least recently
used. Sans-IO: the caller passes the clock, so tests drive time exactly. Used
by the DHT's per-source limits, the NAT signal limits, nat.sink's byte budget
per caller and the gateway's per-key rate limits.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass


@dataclass
class TokenBucket:
    rate: float  # tokens per second
    burst: float  # capacity
    tokens: float = -1.0  # below 0: not used yet, full at its first take
    stamp: float = 0.0

    def take(self, now: float, cost: float = 1.0) -> float:
        """0.0 if the request may go now (its tokens taken), else the seconds until it could."""
        if self.tokens < 0:
            self.tokens, self.stamp = self.burst, now
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.stamp = now
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate if self.rate > 0 else float("inf")


class RateLimiter:
    """A bounded map of buckets (least recently used evicted), one per key."""

    def __init__(self, rate: float, burst: float, max_buckets: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_buckets = max_buckets
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()

    def take(self, who: Hashable, now: float, rate: float | None = None, burst: float | None = None,
             cost: float = 1.0) -> float:
        """0.0 if `who` may go now (cost taken), else the seconds until it could; rate/burst override the defaults."""
        return self.bucket(who, rate, burst).take(now, cost)

    def bucket(self, who: Hashable, rate: float | None = None, burst: float | None = None) -> TokenBucket:
        """`who`'s bucket, made (full) on first use and marked most recently used."""
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
        return bucket

    def allow(self, who: Hashable, now: float | None = None) -> bool:
        """Whether `who` may go now (monotonic clock unless `now` is given)."""
        return self.take(who, time.monotonic() if now is None else now) == 0.0

    def __len__(self) -> int:
        return len(self._buckets)


__all__ = ["RateLimiter", "TokenBucket"]
