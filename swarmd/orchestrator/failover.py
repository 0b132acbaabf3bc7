"""Failover decisions: which errors move a request to another peer, how long a
failing worker sits out, and how long to pause between attempts.

The one definition of "retryable" in swarmd: the router, the gateway, the
swarm's topic requests and the client library all ask classify() (or
retryable()). Pure: callers do the waiting and calling themselves.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from swarmd.errors import (
    ERR_CLOSED,
    ERR_HANDSHAKE,
    ERR_NOT_FOUND,
    ERR_NOT_READY,
    ERR_OVERLOADED,
    ERR_TIMEOUT,
    ERR_UNAVAILABLE,
    SwarmdError,
)

# Peer-side failures: the request itself was fine, another peer can serve it. Refused and
# closed connections, a handshake the peer never finished (it died or restarted under us),
# timeouts, a full queue.
RETRYABLE_CODES = frozenset({ERR_CLOSED, ERR_HANDSHAKE, ERR_TIMEOUT, ERR_OVERLOADED, ERR_UNAVAILABLE})
# Answers that are about this peer, not the request, yet no sign of ill health: it does not
# have that model (or version) after all, or it is loading / draining since we chose it.
ELSEWHERE_CODES = frozenset({ERR_NOT_FOUND, ERR_NOT_READY})


class Unreached(SwarmdError):
    """The call never reached the peer: no connection could be made (refused, no route,
    handshake cut, dial timeout). Retryable like any peer failure, and cheap: a router does
    not count it against its attempts, so stale records of dead peers cannot use them up."""


class Verdict(Enum):
    RETRY = "retry"  # the worker failed; count it against the worker and try another
    ELSEWHERE = "elsewhere"  # the worker is fine but cannot serve this; try another, blame nobody
    FINAL = "final"  # the worker answered with a caller error; hand it back as is


def classify(exc: BaseException) -> tuple[Verdict, str]:
    """(verdict, error code) for an exception raised by a call to a worker."""
    if isinstance(exc, Unreached):
        return Verdict.RETRY, exc.code
    if isinstance(exc, SwarmdError):
        if exc.code in RETRYABLE_CODES:
            return Verdict.RETRY, exc.code
        return (Verdict.ELSEWHERE if exc.code in ELSEWHERE_CODES else Verdict.FINAL), exc.code
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return Verdict.RETRY, ERR_TIMEOUT
    if isinstance(exc, (ConnectionError, OSError, EOFError)):  # refused, reset, unreachable
        return Verdict.RETRY, ERR_CLOSED
    return Verdict.FINAL, type(exc).__name__


def retryable(exc: BaseException) -> bool:
    """Whether another peer may succeed where this one failed (RETRY or ELSEWHERE)."""
    return classify(exc)[0] is not Verdict.FINAL


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
        length = min(self.cap, self.base * (2 ** (strikes - 1)))
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

    def forget(self, public_key: str) -> None:
        self._bans.pop(public_key, None)
