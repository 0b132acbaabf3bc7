"""The decision core: registry + health + stats + bans + policy, no I/O.

Everything the orchestrator decides goes through here — which worker gets a
request, what a failure means for that worker, when it comes back — so tests
drive it with a hand-turned clock and a seed. The async Router and the role
only call these methods around real calls.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from swarmd.errors import ERR_NOT_FOUND, ERR_OVERLOADED, ERR_UNAVAILABLE, SwarmdError
from swarmd.orchestrator.config import OrchestratorConfig
from swarmd.orchestrator.discovery import WorkerAd
from swarmd.orchestrator.failover import BanList, backoff_delay
from swarmd.orchestrator.health import HealthTracker
from swarmd.orchestrator.policies import Candidate, Policy, make_policy
from swarmd.orchestrator.registry import DRAINING, JOINING, ONLINE, STATES, Registry, WorkerLease
from swarmd.orchestrator.stats import StatsBook


class _Views(Sequence[Candidate]):
    """Candidates built on first access: power-of-two-choices looks at two workers, not all of them."""

    __slots__ = ("_leases", "_make", "_built")

    def __init__(self, leases: list[WorkerLease], make: Callable[[WorkerLease], Candidate]) -> None:
        self._leases = leases
        self._make = make
        self._built: dict[int, Candidate] = {}

    def __len__(self) -> int:
        return len(self._leases)

    def __getitem__(self, i: int) -> Candidate:  # type: ignore[override]
        c = self._built.get(i)
        if c is None:
            c = self._built[i] = self._make(self._leases[i])
        return c

    def keys(self) -> list[str]:
        """The candidates' keys without building their views (round-robin needs nothing else)."""
        return [lease.public_key for lease in self._leases]


class Balancer:
    def __init__(
        self,
        config: OrchestratorConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        policy: Policy | None = None,
    ) -> None:
        self.config = config or OrchestratorConfig()
        cfg = self.config
        self.clock = clock
        self.wall = wall
        self.registry = Registry(cfg.lease_ttl, clock)
        self.health = HealthTracker(cfg.eject_after)
        self.stats = StatsBook(cfg.ewma_alpha, clock, wall)
        self.bans = BanList(cfg.ban_base, cfg.ban_max, clock)
        self.policy = policy or make_policy(cfg.policy, cfg.seed)
        self.rng = random.Random(cfg.seed)
        self.decisions = 0
        self.retries = 0
        self.ejections = 0
        self.readmissions = 0
        # Workers known dead from outside our own calls (key -> why): an orchestrator published
        # them as ejected, or their record stopped being refreshed. Kept by the Fleet from what
        # its lookups see; like a ban, a suspect is tried only when nobody else is left (others'
        # word and clocks may be wrong; a worker we cannot reach costs no attempt anyway).
        self.suspects: dict[str, str] = {}

    # -- choosing -------------------------------------------------------------

    def candidates(
        self, model: str | None, capability: str | None = None, exclude: Collection[str] = ()
    ) -> list[WorkerLease]:
        """Routable workers for a request, best tier first.

        ONLINE and not ejected is a hard rule. Workers this request already
        tried, banned workers and suspects (known dead to others) are avoided
        while any other remains; when none does they are used rather than
        failing, so the last candidate always gets its chance.
        """
        routable = self.registry.routable(model, capability)
        ejected = self.health.ejected
        if ejected:
            routable = [lease for lease in routable if lease.public_key not in ejected]
        fresh = routable
        if exclude:
            fresh = [lease for lease in routable if lease.public_key not in exclude] or routable
        bans, suspects = self.bans, self.suspects
        if not bans and not suspects:
            return fresh
        trusted = [
            lease
            for lease in fresh
            if lease.public_key not in suspects and not (bans and bans.is_banned(lease.public_key))
        ]
        return trusted or fresh

    def choose(
        self, model: str | None, capability: str | None = None, exclude: Collection[str] = ()
    ) -> WorkerLease:
        """One worker for a request, or SwarmdError saying precisely why there is none."""
        leases = self.candidates(model, capability, exclude)
        if not leases:
            raise self.unavailable(model, capability)
        self.decisions += 1
        if len(leases) == 1:
            return leases[0]
        return leases[self.policy.choose_index(_Views(leases, self.candidate))]

    def candidate(self, lease: WorkerLease) -> Candidate:
        """The policy's view of a worker: our live counts, or the worker's own report if busier.

        Our in-flight count is exact for our own calls; the worker's reported load
        (checkCapacity, DHT payload) also covers other routers' calls but lags.
        Taking the larger keeps several orchestrators and gateways from piling
        onto a worker that only looks idle to each of them.
        """
        st = self.stats.peek(lease.public_key)
        if st is None:
            return Candidate(lease.public_key, lease.weight, lease.reported_busy)
        busy = st.in_flight if st.in_flight >= lease.reported_busy else lease.reported_busy
        ewma = st.ewma_ms
        if (
            ewma is not None
            and st.sampled_at is not None
            and self.clock() - st.sampled_at > self.config.ewma_ttl
        ):
            ewma = None  # stale: priced as a new worker so it gets sampled again
        return Candidate(lease.public_key, lease.weight, busy, ewma, st.success_rate)

    def unavailable(self, model: str | None, capability: str | None) -> SwarmdError:
        what = (
            " and ".join(
                part
                for part in (
                    f"model {model!r}" if model is not None else "",
                    f"capability {capability!r}" if capability is not None else "",
                )
                if part
            )
            or "any request"
        )
        known = self.registry.matching(model, capability)
        if not known:
            return SwarmdError(
                ERR_NOT_FOUND,
                f"no registered worker serves {what}",
                {"model": model, "capability": capability, "workers": 0},
            )
        counts = {JOINING: 0, DRAINING: 0, "ejected": 0}
        for lease in known:
            if lease.state != ONLINE:
                counts[lease.state] = counts.get(lease.state, 0) + 1
            elif self.health.is_ejected(lease.public_key):
                counts["ejected"] += 1
        detail = ", ".join(f"{n} {k.lower()}" for k, n in counts.items() if n)
        return SwarmdError(
            ERR_UNAVAILABLE,
            f"{len(known)} worker(s) serve {what} but none can take traffic now ({detail})",
            {"model": model, "capability": capability, "workers": len(known)},
        )

    def backoff(self, attempt: int) -> float:
        return backoff_delay(attempt, self.config.backoff_base, self.config.backoff_max, self.rng)

    # -- outcomes of real calls -----------------------------------------------

    def begin(self, public_key: str) -> float:
        return self.stats.begin(public_key)

    def succeeded(self, public_key: str, started: float) -> float:
        """The worker answered with a result: latency sample, failure streak and ban cleared."""
        ms = self.stats.success(public_key, started)
        self.health.call_succeeded(public_key)
        self.bans.clear(public_key)
        if self.suspects:
            self.suspects.pop(public_key, None)  # it answered us: alive, whatever others said
        return ms

    def rejected(self, public_key: str, code: str) -> None:
        """The worker answered with a caller error: it is alive, the request was wrong."""
        self.stats.rejection(public_key, code)
        self.health.call_succeeded(public_key)

    def failed(
        self, public_key: str, code: str, model: str | None, capability: str | None = None
    ) -> dict[str, Any]:
        """A worker-side failure: count it, maybe eject, ban unless it is the last candidate."""
        self.stats.failure(public_key, code)
        ejected = self.health.call_failed(public_key, code)
        if ejected:
            self.ejections += 1
        others = [
            lease
            for lease in self.candidates(model, capability, exclude=(public_key,))
            if lease.public_key != public_key and not self.bans.is_banned(lease.public_key)
        ]
        ban = self.bans.ban(public_key) if others else 0.0
        return {"ejected": ejected, "banned_for": ban}

    def abandoned(self, public_key: str) -> None:
        self.stats.abandon(public_key)

    def check_passed(self, public_key: str, info: dict[str, Any] | None = None) -> bool:
        """An active check answered. Renews the lease, updates the worker's own state and load;
        True when re-admitted.

        A worker that answers but reports it is not accepting (draining, loading)
        is not a health failure: its state keeps it out of routing instead.
        """
        if info:
            state = info.get("state")
            load = {k: info[k] for k in ("queue_depth", "in_flight", "max_concurrent") if k in info}
            if isinstance(state, str) and state in STATES:
                self.registry.set_state(public_key, state, load or None)
            elif info.get("accepting") is False:
                self.registry.set_state(public_key, DRAINING, load or None)
        self.registry.renew(public_key)  # a live worker keeps its lease without re-registering
        readmitted = self.health.check_passed(public_key)
        if readmitted:
            self.readmissions += 1
            self.bans.clear(public_key)
        return readmitted

    def check_failed(self, public_key: str, code: str) -> bool:
        ejected = self.health.check_failed(public_key, code)
        if ejected:
            self.ejections += 1
        return ejected

    # -- membership -----------------------------------------------------------

    def admit(self, ad: WorkerAd, *, source: str, ttl: float | None = None) -> WorkerLease:
        """Create or renew the lease a worker's ad describes, within the registry's size cap."""
        if ad.public_key not in self.registry and len(self.registry) >= self.config.max_workers:
            for k in self.expire():
                self.forget(k)
            if len(self.registry) >= self.config.max_workers:
                raise SwarmdError(
                    ERR_OVERLOADED, f"worker registry is full ({self.config.max_workers} leases); try later"
                )
        return self.registry.upsert(
            ad.public_key,
            models=ad.models,
            capabilities=ad.capabilities,
            addresses=ad.addresses,
            weight=ad.weight,
            state=ad.state,
            load=ad.load,
            source=source,
            ttl=ttl,
        )

    def forget(self, public_key: str) -> None:
        self.suspects.pop(public_key, None)
        self.health.forget(public_key)
        self.bans.clear(public_key)
        self.stats.forget(public_key)

    def unregister(self, public_key: str) -> bool:
        removed = self.registry.remove(public_key)
        self.forget(public_key)
        return removed

    def expire(self) -> list[str]:
        gone = self.registry.expire()
        for k in gone:
            self.forget(k)
        return gone

    # -- reporting ------------------------------------------------------------

    def worker_view(self, lease: WorkerLease) -> dict[str, Any]:
        now = self.clock()
        st = self.stats.peek(lease.public_key)
        return {
            **lease.to_dict(now),
            "health": self.health.record(lease.public_key).to_dict(),
            "banned_for": round(self.bans.remaining(lease.public_key), 3),
            "suspect": self.suspects.get(lease.public_key),
            "stats": (st.to_dict() if st is not None else None),
        }

    def load_stats(self) -> dict[str, Any]:
        return {
            "policy": self.policy.name,
            "decisions": self.decisions,
            "retries": self.retries,
            "ejections": self.ejections,
            "readmissions": self.readmissions,
            "workers": {k: st.to_dict() for k, st in self.stats.items()},
        }
