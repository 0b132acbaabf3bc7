"""The paths a connection can take, how they rank, and the counters of which ones were taken.

A connection's path is set by whoever built it (swarmd/swarm/traversal.py for
punched, mapped and relayed connections; a dialled or accepted TCP connection
is "direct"). The pool (Swarm._register) keeps the better-ranked of two
connections to one peer; PathMetrics counts what happened, for `nat.status`,
`swarmd status` and the metrics endpoint.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from swarmd.net.connection import SecureConnection
from swarmd.net.punch import PathInfo
from swarmd.rpc import RpcPeer

DIRECT, PUNCHED_TCP, PUNCHED_UDP, MAPPED, RELAYED = "direct", "punched-tcp", "punched-udp", "mapped", "relayed"
PATHS = (DIRECT, PUNCHED_TCP, PUNCHED_UDP, MAPPED, RELAYED)
# the registry keeps the higher (rpc/registry.py); a better path replaces a worse one (an upgrade)
PATH_RANK = {RELAYED: 0, PUNCHED_UDP: 1, DIRECT: 2, PUNCHED_TCP: 2, MAPPED: 2}


def path_of(peer: RpcPeer) -> str:
    """The path a pooled connection runs on ("direct" unless we built it)."""
    info = getattr(peer.conn, "path_info", None)
    return info.path if isinstance(info, PathInfo) and info.path else DIRECT


def from_outside(remote: Any, local: Any) -> bool:
    """Whether an accepted connection's peer address lies outside our own network (the /24
    of the address it reached us on, /64 for IPv6): what reached us through our router's
    port forward rather than from the LAN. False when either address is unknown."""
    try:
        here = ipaddress.ip_address(local[0])
        there = ipaddress.ip_address(remote[0])
    except (TypeError, ValueError, IndexError, KeyError):
        return False
    if there.is_loopback or here.version != there.version:
        return False
    return there not in ipaddress.ip_network(f"{here}/{24 if here.version == 4 else 64}", strict=False)


def path_rank(peer: RpcPeer) -> int:
    return int(getattr(peer.conn, "path_rank", None) or PATH_RANK.get(path_of(peer), 2))


@dataclass
class PathMetrics:
    """Counters of the paths connections take, in one place (nat.status, swarmd status,
    the metrics endpoint): opened by path, punch attempts, upgrades and their time,
    bytes received over relays, ports mapped on routers."""

    opened: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PATHS, 0))
    attempts: dict[str, dict[str, int]] = field(default_factory=dict)  # path -> {"ok": n, "failed": n}
    first_path: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PATHS, 0))  # what carried a dial's first call
    upgrades: int = 0
    upgrade_ms: deque[float] = field(default_factory=lambda: deque(maxlen=256))  # dial start -> better path
    relay_bytes_in: int = 0

    def attempt(self, path: str, ok: bool) -> None:
        a = self.attempts.setdefault(path, {"ok": 0, "failed": 0})
        a["ok" if ok else "failed"] += 1

    def to_dict(self) -> dict[str, Any]:
        ms = sorted(self.upgrade_ms)
        return {
            "opened": dict(self.opened),
            "first_path": dict(self.first_path),
            "attempts": {k: dict(v) for k, v in self.attempts.items()},
            "upgrades": self.upgrades,
            "upgrade_ms_p50": round(ms[len(ms) // 2], 1) if ms else None,
            "upgrade_ms_last": round(self.upgrade_ms[-1], 1) if ms else None,
            "relay_bytes_in": self.relay_bytes_in,
        }


class CountingConnection(SecureConnection):
    """A relayed connection: counts what arrives through the relay (PathMetrics.relay_bytes_in)."""

    metrics: PathMetrics | None = None

    def data_received(self, data: bytes) -> None:
        # every read path ends here: uvloop calls it directly, the standard loop through buffer_updated
        if self.metrics is not None:
            self.metrics.relay_bytes_in += len(data)
        super().data_received(data)
