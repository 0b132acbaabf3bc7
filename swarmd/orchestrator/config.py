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
    eject_after: int = 3  # consecutive failures (calls or checks) that eject a worker
    health_interval: float = 2.0  # active check period per worker
    health_timeout: float = 1.0  # bound on one checkCapacity / ping
    max_attempts: int = 4  # workers tried for one request before giving up
    attempt_timeout: float = 10.0  # bound on one attempt; the request's own deadline bounds the whole
    request_timeout: float = 30.0  # whole-request bound when the caller gave none
    backoff_base: float = 0.005  # pause before retry n is min(base * 2**n, backoff_max)
    backoff_max: float = 0.1
    ban_base: float = 0.5  # a failing worker sits out base * 2**(strikes-1), capped at ban_max
    ban_max: float = 30.0
    ewma_alpha: float = 0.3  # weight of the newest latency sample
    connect_timeout: float = 2.0  # bound on dialling a worker
    max_workers: int = 10000  # registry cap: a hostile registerWorker flood cannot grow memory unbounded
