"""Workers as leases, indexed by model and by capability.

A lease is what the orchestrator believes about a worker: where it is, what it
serves and until when that belief holds. Nothing is permanent: a worker that
stops renewing (through registerWorker or its DHT record) simply ages out, so a
worker that vanishes without saying goodbye stops getting traffic on its own.
The registry is plain data plus a clock; it does no I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

Clock = Callable[[], float]

JOINING = "JOINING"
ONLINE = "ONLINE"
DRAINING = "DRAINING"
STATES = frozenset({JOINING, ONLINE, DRAINING})


@dataclass
class WorkerLease:
    public_key: str  # hex Ed25519 key: the worker's identity on the swarm
    models: frozenset[str]
    capabilities: frozenset[str]
    addresses: list[tuple[str, int]]
    weight: float
    state: str
    expires_at: float  # registry clock
    sources: set[str] = field(default_factory=set)  # "rpc", "dht": who renewed it
    load: dict[str, Any] = field(default_factory=dict)  # last load the worker reported
    registered_at: float = 0.0
    reported_busy: int = 0  # in_flight + queue from `load`, precomputed for the hot path
    ttl: float = 30.0  # the lease length last granted, reused when a passing health check renews it

    def __post_init__(self) -> None:
        self.set_load(self.load)

    def set_load(self, load: dict[str, Any]) -> None:
        self.load = load
        busy = load.get("in_flight", 0) + load.get("queue_depth", load.get("queue", 0)) if load else 0
        self.reported_busy = int(busy) if isinstance(busy, (int, float)) and 0 <= busy < 1e12 else 0

    def to_dict(self, now: float) -> dict[str, Any]:
        return {
            "public_key": self.public_key,
            "models": sorted(self.models),
            "capabilities": sorted(self.capabilities),
            "addresses": [list(a) for a in self.addresses],
            "weight": self.weight,
            "state": self.state,
            "expires_in": round(max(0.0, self.expires_at - now), 3),
            "sources": sorted(self.sources),
            "load": dict(self.load),
        }


class Registry:
    """The set of live leases plus two inverted indexes (model -> keys, capability -> keys)."""

    def __init__(self, ttl: float = 30.0, clock: Clock = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._leases: dict[str, WorkerLease] = {}
        self._by_model: dict[str, set[str]] = {}
        self._by_capability: dict[str, set[str]] = {}
        # routable() is on every request's path: cache its answer per (model, capability)
        # until the next write or the earliest expiry among the cached leases.
        self._version = 0
        self._cache: dict[tuple[str | None, str | None], tuple[int, float, list[WorkerLease]]] = {}

    # -- writes ---------------------------------------------------------------

    def upsert(
        self,
        public_key: str,
        *,
        models: Iterable[str],
        capabilities: Iterable[str] = (),
        addresses: Iterable[tuple[str, int]] = (),
        weight: float = 1.0,
        state: str = ONLINE,
        load: dict[str, Any] | None = None,
        source: str = "rpc",
        ttl: float | None = None,
    ) -> WorkerLease:
        """Create or renew a lease. Renewal replaces what the worker serves and pushes expiry out."""
        now = self.clock()
        ttl = self.ttl if ttl is None else ttl
        expires = now + ttl
        old = self._leases.get(public_key)
        lease = WorkerLease(
            public_key=public_key,
            models=frozenset(models),
            capabilities=frozenset(capabilities),
            addresses=[(str(h), int(p)) for h, p in addresses],
            weight=float(weight),
            state=state,
            expires_at=expires,
            sources={source},
            load=dict(load or {}),
            registered_at=now,
            ttl=ttl,
        )
        if old is not None:
            self._unindex(old)
            lease.registered_at = old.registered_at
            # Another source keeps its own renewal alive: keep the later expiry and both names.
            if old.expires_at > now:
                lease.sources |= old.sources
                lease.expires_at = max(expires, old.expires_at)
            if not lease.addresses:
                lease.addresses = old.addresses
            if load is None:
                lease.set_load(old.load)
        self._leases[public_key] = lease
        self._index(lease)
        self._version += 1
        return lease

    def remove(self, public_key: str) -> bool:
        lease = self._leases.pop(public_key, None)
        if lease is None:
            return False
        self._unindex(lease)
        self._version += 1
        return True

    def renew(self, public_key: str) -> bool:
        """Push an unexpired lease out by its own ttl: the worker just proved it is alive."""
        lease = self._leases.get(public_key)
        now = self.clock()
        if lease is None or lease.expires_at <= now:
            return False
        lease.expires_at = max(lease.expires_at, now + lease.ttl)
        return True

    def set_state(self, public_key: str, state: str, load: dict[str, Any] | None = None) -> None:
        """Record what a health check learned (the worker's own state and load) without renewing."""
        lease = self._leases.get(public_key)
        if lease is None:
            return
        if lease.state != state:
            lease.state = state
            self._version += 1
        if load is not None:
            lease.set_load(dict(load))

    def add_model(self, public_key: str, model: str) -> bool:
        """Note that a worker serves `model` (it just answered a request for it), until its
        next renewal says what it serves. Without this, requests for a model a worker loaded
        on demand keep taking the unknown-model path until the worker's record is looked up
        again (up to dht_refresh). True when the lease changed."""
        lease = self._leases.get(public_key)
        if lease is None or model in lease.models:
            return False
        lease.models = lease.models | {model}
        self._by_model.setdefault(model, set()).add(public_key)
        self._version += 1
        return True

    def expire(self) -> list[str]:
        """Drop leases whose time is up; returns their keys so health and stats can forget them."""
        now = self.clock()
        gone = [k for k, lease in self._leases.items() if lease.expires_at <= now]
        for k in gone:
            self.remove(k)
        return gone

    # -- reads ----------------------------------------------------------------

    def get(self, public_key: str) -> WorkerLease | None:
        lease = self._leases.get(public_key)
        if lease is None or lease.expires_at <= self.clock():
            return None
        return lease

    def matching(self, model: str | None = None, capability: str | None = None) -> list[WorkerLease]:
        """Unexpired leases serving `model` AND offering `capability` (either may be None), any state."""
        now = self.clock()
        keys: set[str] | None = None
        if model is not None:
            keys = set(self._by_model.get(model, ()))
        if capability is not None:
            cap_keys = self._by_capability.get(capability, set())
            keys = set(cap_keys) if keys is None else keys & cap_keys
        if keys is None:
            keys = set(self._leases)
        out = [self._leases[k] for k in keys if self._leases[k].expires_at > now]
        out.sort(key=lambda lease: lease.public_key)
        return out

    def routable(self, model: str | None = None, capability: str | None = None) -> list[WorkerLease]:
        """Matching leases in state ONLINE: JOINING and DRAINING workers get no traffic.

        The returned list is shared with the cache: callers must not modify it.
        """
        key = (model, capability)
        hit = self._cache.get(key)
        now = self.clock()
        if hit is not None and hit[0] == self._version and now < hit[1]:
            return hit[2]
        out = [lease for lease in self.matching(model, capability) if lease.state == ONLINE]
        earliest = min((lease.expires_at for lease in out), default=float("inf"))
        if len(self._cache) > 4096:  # bounded: one entry per (model, capability) actually asked for
            self._cache.clear()
        self._cache[key] = (self._version, earliest, out)
        return out

    def models(self) -> list[str]:
        return sorted(m for m, keys in self._by_model.items() if keys)

    def __len__(self) -> int:
        return len(self._leases)

    def __iter__(self) -> Iterator[WorkerLease]:
        return iter(list(self._leases.values()))

    def __contains__(self, public_key: object) -> bool:
        return public_key in self._leases

    # -- indexes --------------------------------------------------------------

    def _index(self, lease: WorkerLease) -> None:
        for m in lease.models:
            self._by_model.setdefault(m, set()).add(lease.public_key)
        for c in lease.capabilities:
            self._by_capability.setdefault(c, set()).add(lease.public_key)

    def _unindex(self, lease: WorkerLease) -> None:
        for index, names in ((self._by_model, lease.models), (self._by_capability, lease.capabilities)):
            for name in names:
                keys = index.get(name)
                if keys is not None:
                    keys.discard(lease.public_key)
                    if not keys:
                        del index[name]
