"""NAT detection: what kind of NAT (if any) sits between this node and the swarm.

A node asks several DHT nodes, over its own DHT UDP socket, for its reflexive
address (each DHT node answers STUN on its port, see swarmd/dht/stun.py) and
compares the answers:

- every answer equals a local address             -> "public" (no NAT)
- answers agree on one public ip:port             -> "cone" (endpoint-independent
  mapping: a peer can punch to the reported address)
- answers differ from server to server            -> "symmetric" (a new mapping per
  destination: punching works only against a cone-ish peer via peer-reflexive
  candidates; otherwise the relay)
- no answer at all                                -> "udp_blocked" (relay only)
- a single answer, or no server to ask            -> "unknown" (cannot compare)

With a single DHT node in reach (a one-bootstrap swarm), its second STUN port
(RFC 5780 OTHER-ADDRESS, see swarmd/dht/stun.py) is the second server: a
symmetric NAT gives the other port a new mapping too, a cone NAT the same one.

`classify()` is pure; `detect_nat()` only runs the probes through a STUN
function it is given (normally `DhtNode.stun`), so this module needs no socket
of its own and sits below the DHT layer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from swarmd.errors import ConfigError
from swarmd.node.deadline import within

PUBLIC = "public"
CONE = "cone"
SYMMETRIC = "symmetric"
UDP_BLOCKED = "udp_blocked"
UNKNOWN = "unknown"
NAT_TYPES = (PUBLIC, CONE, SYMMETRIC, UDP_BLOCKED, UNKNOWN)

Address = tuple[str, int]
StunFunction = Callable[[Address], Awaitable[Address | None]]
AlternateFunction = Callable[[Address], Address | None]  # a server's second STUN endpoint, learned by asking it


@dataclass
class NatConfig:
    """[nat]: NAT detection, signalling and traversal settings."""

    stun_servers: int = 4  # how many DHT nodes to ask for our reflexive address
    stun_timeout: float = 2.0  # per STUN request
    redetect_interval: float = 300.0  # mappings change (router reboots, new network)
    signal_peers: int = 2  # public peers a NATed node keeps a connection to (1..3)
    signal_rate: float = 2.0  # connection requests per second accepted per source
    signal_burst: int = 10  # and the burst allowed above that rate
    punch: bool = True  # try UDP hole punching (birthday punching against a symmetric NAT) before the relay
    punch_tcp: bool = True  # also race TCP simultaneous open (false: punched paths are UDP + UDX only)
    punch_timeout: float = 10.0  # bound on one punching attempt
    repunch_interval: float = 30.0  # a relayed connection retries punching this often
    relay_timeout: float = 15.0  # bound on pairing through a relay
    direct_timeout: float = 2.0  # bound on the direct TCP attempt when traversal can take over
    probe_max_bytes: int = 64 << 20  # largest nat.probe / nat.sink transfer (a path test, not a transport)
    sink: bool = True  # answer other nodes' `swarmd nat probe` streams (nat.sink); false: refuse them
    sink_rate: int = 1 << 20  # bytes per second per caller key nat.sink accepts, sustained (burst: probe_max_bytes)
    sink_concurrency: int = 2  # nat.sink streams accepted at once from all callers together
    portmap: bool = True  # ask the router to forward our ports (PCP, NAT-PMP, UPnP-IGD) when behind NAT
    portmap_lifetime: int = 3600  # s asked for a mapping; renewed at half of what the router grants
    portmap_gateway: str = ""  # the router to ask; "" = the default gateway
    assume: str = ""  # operator override of the detected type ("symmetric" forces the relay), "" = detect

    def validate(self) -> None:
        if self.assume and self.assume not in NAT_TYPES:
            raise ConfigError(f"nat.assume must be empty or one of {', '.join(NAT_TYPES)}, got {self.assume!r}")
        if not 1 <= self.signal_peers <= 3:
            raise ConfigError(f"nat.signal_peers must be 1, 2 or 3, got {self.signal_peers}")
        for name in ("stun_timeout", "redetect_interval", "signal_rate", "punch_timeout", "repunch_interval",
                     "relay_timeout", "direct_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"nat.{name} must be a positive number of seconds, got {getattr(self, name)}")
        if self.stun_servers < 1 or self.signal_burst < 1 or self.probe_max_bytes < 0:
            raise ConfigError("nat.stun_servers and nat.signal_burst must be >= 1, nat.probe_max_bytes >= 0")
        if not 60 <= self.portmap_lifetime <= 7 * 86400:
            raise ConfigError(f"nat.portmap_lifetime must be 60..604800 seconds, got {self.portmap_lifetime}")
        if self.sink_rate < 1 or self.sink_concurrency < 1:
            raise ConfigError("nat.sink_rate and nat.sink_concurrency must be >= 1")


@dataclass(frozen=True)
class Observation:
    server: Address
    mapped: Address | None  # None: the server did not answer in time
    rtt: float = 0.0


@dataclass
class NatReport:
    """What `swarmd status` shows under "nat"."""

    nat_type: str
    public_address: Address | None  # the one mapping, when it is consistent
    observations: list[Observation] = field(default_factory=list)
    detected_at: float = 0.0  # time.time()
    took: float = 0.0

    @property
    def reachable_by_punch(self) -> bool:
        return self.nat_type in (PUBLIC, CONE)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.nat_type,
            "public_address": f"{self.public_address[0]}:{self.public_address[1]}" if self.public_address else None,
            "answers": sum(1 for o in self.observations if o.mapped is not None),
            "asked": len(self.observations),
            "mappings": sorted({f"{o.mapped[0]}:{o.mapped[1]}" for o in self.observations if o.mapped}),
            "detected_at": round(self.detected_at, 3),
            "took_ms": round(self.took * 1000, 1),
        }


def classify(observations: Iterable[Observation], local: Iterable[Address]) -> NatReport:
    """Classify from STUN answers; `local` are our socket's own concrete addresses (ip, port),
    never a wildcard: a port-preserving NAT maps to the same port, only the IP tells them apart."""
    obs = list(observations)
    answered = [o for o in obs if o.mapped is not None]
    local_set = set(local)
    if not obs:
        return NatReport(UNKNOWN, None, obs)  # nobody to ask yet (the first node of a swarm)
    if not answered:
        return NatReport(UDP_BLOCKED, None, obs)
    mappings = {o.mapped for o in answered}
    if len(mappings) > 1:
        return NatReport(SYMMETRIC, None, obs)
    (mapped,) = mappings
    assert mapped is not None
    if mapped in local_set:
        return NatReport(PUBLIC, mapped, obs)
    if len({o.server for o in answered}) < 2:
        return NatReport(UNKNOWN, mapped, obs)
    return NatReport(CONE, mapped, obs)


async def detect_nat(
    stun: StunFunction,
    servers: Iterable[Address],
    local: Iterable[Address],
    *,
    config: NatConfig | None = None,
    alternate: AlternateFunction | None = None,
) -> NatReport:
    """Ask up to config.stun_servers distinct servers at once (each bounded) and classify.

    When fewer than two distinct servers answered, also ask the alternate STUN
    endpoints those that answered named (`alternate(server)`), so a single DHT
    node is enough to tell cone from symmetric."""
    cfg = config or NatConfig()
    chosen: list[Address] = []
    for s in servers:
        if s not in chosen:
            chosen.append(s)
        if len(chosen) >= cfg.stun_servers:
            break
    t0 = time.monotonic()

    async def one(server: Address) -> Observation:
        start = time.monotonic()
        try:
            mapped = await within(stun(server), cfg.stun_timeout)
        except (TimeoutError, OSError, ValueError):
            mapped = None
        return Observation(server, mapped, time.monotonic() - start)

    observations = list(await asyncio.gather(*(one(s) for s in chosen)))
    answered = {o.server for o in observations if o.mapped is not None}
    if alternate is not None and len(answered) < 2:
        extra = []
        for server in sorted(answered):
            alt = alternate(server)
            if alt is not None and alt not in answered and alt not in chosen and alt not in extra:
                extra.append(alt)
        observations += await asyncio.gather(*(one(s) for s in extra))
    report = classify(observations, local)
    report.detected_at = time.time()
    report.took = time.monotonic() - t0
    return report
