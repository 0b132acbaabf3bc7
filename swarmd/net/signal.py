"""Signalling for NAT traversal (sans-IO): connection requests relayed by a public peer.

A node behind NAT keeps a connection to 1-3 public peers and lists them in its
records ("signal" in the payload). A caller that cannot reach it directly sends
a connection request to one of those peers, which forwards it over the
connection the target keeps. A request carries a UDP punch offer
(swarmd/net/udppunch.py: punch id, addresses, NAT type), a TCP punch offer (the caller's public TCP
address for a simultaneous open, swarmd/net/tcppunch.py) or a relay rendezvous
(relay address + token), and the answer comes back the same way.

Forwarding for strangers is an amplification vector, so the forwarder applies
`SignalLimiter`: a token bucket (swarmd.node.ratelimit) per source (the caller's public key) and one
for all sources together; over the limit the request is answered with
ERR_RATE_LIMITED and never forwarded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from swarmd.errors import ERR_RATE_LIMITED, SwarmdError, bad_request
from swarmd.net.nat import NAT_TYPES
from swarmd.net.udppunch import PunchOffer, parse_offer
from swarmd.node.address import parse_address
from swarmd.node.ratelimit import RateLimiter, TokenBucket

KIND_UDP = "udp"
KIND_RELAY = "relay"
KIND_TCP = "tcp"
MAX_SOURCES = 4096  # bound on the limiter's memory under a flood of fresh keys


@dataclass(frozen=True)
class SignalRequest:
    """A caller's connection request, as forwarded to the target."""

    source: bytes  # caller's Ed25519 public key (the forwarder fills it from the Noise session)
    target: bytes  # target's Ed25519 public key
    kind: str  # "udp", "tcp" or "relay"
    punch: PunchOffer | None = None  # UDP punch offer (kind "udp")
    relay: tuple[str, int] | None = None  # relay address (kind "relay")
    token: bytes = b""  # relay circuit token (kind "relay")
    addr: tuple[str, int] | None = None  # the caller's public TCP address (kind "tcp")
    nat: str = ""  # the caller's NAT type (kind "tcp": one symmetric side makes it a birthday punch); "" = unsaid

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source, "target": self.target, "kind": self.kind}
        if self.kind == KIND_UDP:
            assert self.punch is not None
            out["punch"] = self.punch.to_wire()
        elif self.kind == KIND_TCP:
            assert self.addr is not None
            out["addr"] = [self.addr[0], self.addr[1]]
            if self.nat:
                out["nat"] = self.nat
        else:
            assert self.relay is not None
            out["relay"] = [self.relay[0], self.relay[1]]
            out["token"] = self.token
        return out


def _key(obj: dict[str, Any], name: str) -> bytes:
    v = obj.get(name)
    if not isinstance(v, bytes) or len(v) != 32:
        raise bad_request(f"signal '{name}' must be a 32-byte public key")
    return v


def parse_request(obj: Any) -> SignalRequest:
    """Validate a request read from a peer; SwarmdError(ERR_BAD_REQUEST) says what is wrong."""
    if not isinstance(obj, dict):
        raise bad_request(f"signal request must be a map, got {type(obj).__name__}")
    source, target = _key(obj, "source"), _key(obj, "target")
    kind = obj.get("kind")
    if kind == KIND_UDP:
        return SignalRequest(source, target, kind, punch=parse_offer(obj.get("punch")))
    if kind == KIND_TCP:
        nat = obj.get("nat", "")
        if nat != "" and nat not in NAT_TYPES:
            raise bad_request(f"signal 'nat' must be one of {', '.join(NAT_TYPES)}, got {nat!r:.40}")
        return SignalRequest(source, target, kind, addr=parse_address(obj.get("addr"), "signal 'addr'"), nat=nat)
    if kind == KIND_RELAY:
        relay = parse_address(obj.get("relay"), "signal 'relay'")
        token = obj.get("token")
        if not isinstance(token, bytes) or len(token) != 32:
            raise bad_request("signal 'token' must be 32 bytes")
        return SignalRequest(source, target, kind, relay=relay, token=token)
    raise bad_request(f"signal 'kind' must be '{KIND_UDP}', '{KIND_TCP}' or '{KIND_RELAY}', got {kind!r:.40}")


@dataclass
class SignalLimiter:
    """Token buckets per source and overall; `now` comes from the caller (monotonic seconds)."""

    rate: float = 2.0  # requests per second per source
    burst: int = 10
    total_rate: float = 50.0  # all sources together
    total_burst: int = 100
    refused: int = 0

    def __post_init__(self) -> None:
        self._sources = RateLimiter(self.rate, self.burst, MAX_SOURCES)  # least recently used dropped
        self._total = TokenBucket(self.total_rate, self.total_burst)

    def allow(self, source: bytes, now: float) -> bool:
        b = self._sources.bucket(source)
        if b.take(now):
            self.refused += 1
            return False
        if self._total.take(now):
            b.tokens += 1.0  # not this source's fault: give its token back
            self.refused += 1
            return False
        return True

    def check(self, source: bytes, now: float) -> None:
        """Raise ERR_RATE_LIMITED when `source` is over its allowance."""
        if not self.allow(source, now):
            raise SwarmdError(
                ERR_RATE_LIMITED,
                f"too many connection requests: at most {self.rate:g}/s per source (burst {self.burst})",
                {"retry_after": round(1.0 / self.rate, 3) if self.rate > 0 else None},
            )
