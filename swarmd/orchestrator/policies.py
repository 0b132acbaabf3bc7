"""Load-balancing policies: pure functions of the candidates' numbers and a seeded RNG.

Each policy gets the routable candidates (already filtered for state, health
and bans) as `Candidate` snapshots and returns one of them. No clocks, no I/O,
so a test can drive thousands of choices and look at the distribution.
"""

from __future__ import annotations

import bisect
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from swarmd.orchestrator.config import PolicyName


@dataclass(slots=True)
class Candidate:
    public_key: str
    weight: float = 1.0  # operator-given capacity share (registerWorker weight)
    in_flight: int = 0  # live, from this process's own calls
    ewma_ms: float | None = None  # None until the first successful call
    success_rate: float = 0.5


class Policy(ABC):
    name: ClassVar[str] = ""

    def __init__(self, seed: int | None = None) -> None:
        self.rng = random.Random(seed)

    def choose(self, candidates: Sequence[Candidate]) -> Candidate:
        """Pick one of a non-empty sequence."""
        return candidates[self.choose_index(candidates)]

    @abstractmethod
    def choose_index(self, candidates: Sequence[Candidate]) -> int:
        """The index of the pick; candidates may be built lazily on access, so touch only what you need."""

    @staticmethod
    def _require(candidates: Sequence[Candidate]) -> None:
        if not candidates:
            raise ValueError("a policy needs at least one candidate")


class RoundRobin(Policy):
    """Each worker in turn, in key order; keeps its place when workers come and go."""

    name = "round_robin"

    def __init__(self, seed: int | None = None) -> None:
        super().__init__(seed)
        self._last: str | None = None

    def choose_index(self, candidates: Sequence[Candidate]) -> int:
        self._require(candidates)
        keys_of = getattr(candidates, "keys", None)
        keys: list[str] = keys_of() if callable(keys_of) else [c.public_key for c in candidates]
        if any(keys[i] > keys[i + 1] for i in range(len(keys) - 1)):
            order = sorted(range(len(keys)), key=keys.__getitem__)
        else:
            order = list(range(len(keys)))  # the registry hands them over in key order already
        pick = order[0]
        if self._last is not None:
            at = bisect.bisect_right([keys[i] for i in order], self._last)
            pick = order[at] if at < len(order) else order[0]
        self._last = keys[pick]
        return pick


class LeastConnections(Policy):
    """Fewest calls in flight right now; ties broken at random so equals share the load."""

    name = "least_connections"

    def choose_index(self, candidates: Sequence[Candidate]) -> int:
        self._require(candidates)
        loads = [candidates[i].in_flight for i in range(len(candidates))]
        low = min(loads)
        return self.rng.choice([i for i, n in enumerate(loads) if n == low])


class Weighted(Policy):
    """Random in proportion to weight x success rate x relative speed.

    Speed is the fastest candidate's EWMA over this one's, so a worker twice as
    slow gets half the share; a worker with no latency sample yet counts as fast
    so that it gets the samples it needs.
    """

    name = "weighted"

    def choose_index(self, candidates: Sequence[Candidate]) -> int:
        self._require(candidates)
        shares = self.shares([candidates[i] for i in range(len(candidates))])
        total = sum(shares)
        if total <= 0.0:
            return self.rng.randrange(len(shares))
        x = self.rng.random() * total
        for i, share in enumerate(shares):
            x -= share
            if x < 0.0:
                return i
        return len(shares) - 1

    @staticmethod
    def shares(candidates: Sequence[Candidate]) -> list[float]:
        known = [c.ewma_ms for c in candidates if c.ewma_ms is not None and c.ewma_ms > 0.0]
        fastest = min(known) if known else None
        out = []
        for c in candidates:
            speed = 1.0
            if fastest is not None and c.ewma_ms is not None and c.ewma_ms > 0.0:
                speed = fastest / c.ewma_ms
            out.append(max(0.0, c.weight) * c.success_rate * speed)
        return out


class RandomChoice(Policy):
    name = "random"

    def choose_index(self, candidates: Sequence[Candidate]) -> int:
        self._require(candidates)
        return self.rng.randrange(len(candidates))


class PowerOfTwo(Policy):
    """Latency-aware power of two choices: sample two, keep the lower EWMA x (in-flight + 1).

    Two random samples avoid the herd that a global minimum causes when many
    routers (gateways, orchestrators) share stale numbers; the cost term steers
    away from slow and busy workers alike. A worker with no sample yet is
    priced at the latency of the worker it is compared with, so it is tried without being flooded.
    """

    name = "p2c"

    def choose_index(self, candidates: Sequence[Candidate]) -> int:
        self._require(candidates)
        n = len(candidates)
        if n == 1:
            return 0
        i = self.rng.randrange(n)
        j = self.rng.randrange(n - 1)
        if j >= i:
            j += 1
        a, b = candidates[i], candidates[j]
        # An unsampled worker is priced at the other's latency (or 1 ms when neither has one):
        # it gets tried, and its in-flight count still keeps it from being flooded.
        default = a.ewma_ms if a.ewma_ms is not None else (b.ewma_ms if b.ewma_ms is not None else 1.0)
        return i if self.cost(a, default) <= self.cost(b, default) else j

    @staticmethod
    def cost(c: Candidate, default_ms: float) -> float:
        ms = c.ewma_ms if c.ewma_ms is not None else default_ms
        return max(ms, 1e-3) * (c.in_flight + 1) / max(c.weight, 1e-6)


POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (RoundRobin, LeastConnections, Weighted, RandomChoice, PowerOfTwo)
}


def make_policy(name: PolicyName | str, seed: int | None = None) -> Policy:
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown balancing policy {name!r}; expected one of: {', '.join(sorted(POLICIES))}")
    return cls(seed)
