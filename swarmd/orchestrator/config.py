"""[orchestrator]: how workers are leased, health-checked, chosen and retried."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PolicyName = Literal["p2c", "round_robin", "least_connections", "weighted", "random"]


@dataclass
class OrchestratorConfig:
    """Defaults suit a small swarm on one LAN; every figure is in seconds unless named otherwise."""

    policy: PolicyName = "p2c"  # latency-aware power of two choices by default
    seed: int | None = None  # seeds the policies' randomness (tests, reproducible benchmarks)
    lease_ttl: float = 30.0  # a registerWorker lease lives this long unless renewed
    dht_lease_ttl: float = 45.0  # a lease filled from a DHT record; renewed by every lookup that sees it
    dht_refresh: float = 5.0  # how often the WORKERS topic is looked up
    announce_interval: float = 10.0  # our ORCHESTRATORS payload is re-announced at most this often, on change
    # (a change of our ejection verdicts is published at once: gateways and clients avoid those workers)
    # A worker whose live DHT record was last signed longer ago than this missed two refreshes
    # (SwarmConfig.live_reannounce_interval + jitter): it is most likely dead, and is tried only
    # when no other worker is left, like a worker some orchestrator published as ejected.
    stale_after: float = 8.0
    eject_after: int = 3  # consecutive failures (calls or checks) that eject a worker
    health_interval: float = 2.0  # active check period per worker
    health_timeout: float = 1.0  # bound on one checkCapacity / ping
    max_attempts: int = 4  # workers tried for one request before giving up
    attempt_timeout: float = 10.0  # bound on one attempt; the request's own deadline bounds the whole
    request_timeout: float = 30.0  # whole-request bound when the caller gave none
    backoff_base: float = 0.005  # pause before retry n is min(base * 2**n, backoff_max)
    backoff_max: float = 0.1  # longest pause between retries, in seconds
    ban_base: float = 0.5  # a failing worker sits out base * 2**(strikes-1), capped at ban_max
    ban_max: float = 30.0  # longest time a failing worker sits out, in seconds
    ewma_alpha: float = 0.3  # weight of the newest latency sample
    # A latency sample older than this no longer counts: a worker that lost every p2c
    # comparison (and so got no calls to update its EWMA) is priced as new and tried again.
    ewma_ttl: float = 10.0
    connect_timeout: float = 2.0  # bound on dialling a worker
    # A model no worker has loaded goes to any ONLINE worker, which fetches it from a store
    # (workers load on demand); off: such a request fails with ERR_NOT_FOUND.
    route_unloaded: bool = True
    max_workers: int = 10000  # registry cap: a hostile registerWorker flood cannot grow memory unbounded

    def validate(self) -> None:
        """Refuse settings that would make routing silently misbehave, naming the key."""
        from swarmd.errors import ConfigError
        from swarmd.orchestrator.policies import POLICIES

        if self.policy not in POLICIES:
            raise ConfigError(
                f"orchestrator.policy must be one of {', '.join(sorted(POLICIES))}, got {self.policy!r}"
            )
        refuse_if = ConfigError.refuse_if
        refuse_if(self, "orchestrator", "eject_after max_attempts max_workers", lambda v: v < 1, "be at least 1")
        refuse_if(self, "orchestrator", "lease_ttl dht_lease_ttl dht_refresh announce_interval stale_after "
                  "health_interval health_timeout attempt_timeout request_timeout connect_timeout ewma_ttl",
                  lambda v: not v > 0, "be above 0 seconds")
        refuse_if(self, "orchestrator", "backoff_base backoff_max ban_base ban_max", lambda v: v < 0, "not be negative")
        refuse_if(self, "orchestrator", "ewma_alpha", lambda v: not 0 < v <= 1, "be in (0, 1]")
