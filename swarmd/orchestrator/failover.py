"""Failover timing: how long a failing worker sits out and how long to pause
between attempts. Which errors move a request to another peer is
`swarmd.errors.classify` (every layer asks it). Pure: callers do the waiting
and calling themselves.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Capped exponential pause before attempt `attempt` (1 = first retry), with full jitter
    when an rng is given so that many routers do not retry in lockstep."""
    if attempt <= 0 or base <= 0.0:
        return 0.0
    ceiling = min(cap, base * (2 ** (attempt - 1)))
    return ceiling if rng is None else ceiling * (0.5 + 0.5 * rng.random())


@dataclass
class Ban:
    strikes: int
    until: float


class BanList:
    """Short, growing time-outs for workers that just failed a call.

    A ban is failover's memory (do not go straight back to the worker that
    just dropped a request) while ejection is health's verdict; a ban lasts
    base * 2**(strikes-1) capped at `cap`, and one success clears it.
    """

    def __init__(
        self, base: float = 0.5, cap: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.base = base
        self.cap = cap
        self.clock = clock
        self._bans: dict[str, Ban] = {}

    def ban(self, public_key: str) -> float:
        """Ban (or ban again, longer); returns the ban's length in seconds."""
        prev = self._bans.get(public_key)
        strikes = 1 if prev is None else prev.strikes + 1
        length = backoff_delay(strikes, self.base, self.cap)
        self._bans[public_key] = Ban(strikes=strikes, until=self.clock() + length)
        return length

    def clear(self, public_key: str) -> None:
        self._bans.pop(public_key, None)

    def is_banned(self, public_key: str) -> bool:
        ban = self._bans.get(public_key)
        return ban is not None and ban.until > self.clock()

    def __bool__(self) -> bool:
        """Any ban on record (active or remembered): the hot path skips filtering when there is none."""
        return bool(self._bans)

    def remaining(self, public_key: str) -> float:
        ban = self._bans.get(public_key)
        return 0.0 if ban is None else max(0.0, ban.until - self.clock())

    def strikes(self, public_key: str) -> int:
        ban = self._bans.get(public_key)
        return 0 if ban is None else ban.strikes
