"""Port mapping for one node behind NAT: map, announce, renew, remove on stop.

Once NAT detection says we are behind a NAT (not `public`), the traversal asks
the router (PCP, NAT-PMP, then UPnP-IGD: swarmd/net/portmap.py) to forward our
RPC TCP port and our DHT UDP port. When the TCP mapping is granted, the mapped
address goes first in every record we announce (Swarm.addresses) and our own
peer record says `"direct": true, "mapped": ["ip:port"]`, so peers dial it like
any public address; a dialler that reaches us on it labels the connection
`mapped` (Traversal.label_direct, counted in the path metrics). Mappings are
renewed at half their lifetime; a failed renewal withdraws the address and the
next round tries again. On stop each mapping is deleted (bounded). A router
that offers none of the three protocols costs one failed round per
`redetect_interval`, and nodes behind it behave as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

from swarmd.errors import SwarmdError
from swarmd.net.nat import PUBLIC, UDP_BLOCKED
from swarmd.net.portmap import Mapping, PortMapper
from swarmd.swarm.paths import MAPPED

if TYPE_CHECKING:
    from swarmd.swarm.traversal import Traversal

MIN_RENEW = 30.0  # s: never renew more often than this, whatever lifetime the router grants
UNMAP_TIMEOUT = 2.0  # s for deleting all mappings on stop


class PortMapping:
    """Owned by the traversal (traversal.portmap); its loop runs in the traversal's tasks."""

    def __init__(self, traversal: Traversal) -> None:
        self.traversal = traversal
        self.swarm = traversal.swarm
        cfg = traversal.config
        self.mapper = PortMapper(gateway=cfg.portmap_gateway or None, lifetime=cfg.portmap_lifetime,
                                 timeout=cfg.stun_timeout)
        self.mappings: dict[str, Mapping] = {}  # "tcp" | "udp" -> mapping
        self.last_error = ""
        self.log = traversal.log

    def status(self) -> dict[str, Any]:
        return {
            "mappings": [m.to_dict() for m in self.mappings.values()],
            "method": self.mapper.preferred,
            "error": self.last_error or None,
        }

    def wanted(self) -> list[tuple[str, int]]:
        out = [("tcp", self.swarm.server.port)]
        dht_port = self.swarm.dht.address[1] if self.swarm.dht.address else 0
        if dht_port:
            out.append(("udp", dht_port))
        return out

    async def run(self) -> None:
        """Map when behind NAT, renew, retry after a failure; forever (cancelled on stop)."""
        t = self.traversal
        await t._detected.wait()
        while True:
            delay = t.config.redetect_interval
            if t.nat_type not in (PUBLIC, UDP_BLOCKED) or self.mappings:
                delay = await self._round()
            await asyncio.sleep(delay)

    async def _round(self) -> float:
        """Map what is missing, renew what is due; the seconds until the next round."""
        changed = False
        now = time.monotonic()
        next_in = self.traversal.config.redetect_interval
        for proto, port in self.wanted():
            m = self.mappings.get(proto)
            try:
                if m is None:
                    m = await self.mapper.map(proto, port)
                    changed = changed or proto == "tcp"
                    self.traversal.metrics.attempt(MAPPED, True)
                    self.log.bind(event="port_mapped", **m.to_dict()).info(
                        "router forwards {} {} to us ({})", proto, f"{m.external[0]}:{m.external[1]}", m.method)
                elif m.lifetime and now - m.granted_at >= max(MIN_RENEW, m.lifetime / 2):
                    renewed = await self.mapper.renew(m)
                    changed = changed or (proto == "tcp" and renewed.external != m.external)
                    m = renewed
                self.mappings[proto] = m
                self.last_error = ""
            except SwarmdError as e:
                self.last_error = e.message
                if m is not None:
                    self.mappings.pop(proto, None)
                    changed = changed or proto == "tcp"
                    self.log.bind(event="port_mapping_lost", protocol=proto, reason=e.message).warning(
                        "the router no longer forwards our {} port", proto)
                else:
                    self.traversal.metrics.attempt(MAPPED, False)
                    self.log.bind(event="port_mapping_failed", protocol=proto, reason=e.message).info(
                        "no port mapping for {}", proto)
                    break  # the router offers none: do not ask again for the other protocol this round
            if m is not None and m.lifetime:
                next_in = min(next_in, max(MIN_RENEW, m.granted_at + m.lifetime / 2 - time.monotonic()))
        if changed:
            await self._publish()
        return next_in

    def mapped_addresses(self) -> list[tuple[str, int]]:
        m = self.mappings.get("tcp")
        return [m.external] if m is not None else []

    async def _publish(self) -> None:
        """Our records now lead with (or no longer carry) the mapped address."""
        self.swarm.mapped_addresses = self.mapped_addresses()
        with contextlib.suppress(SwarmdError):
            await self.traversal._keep_signal_peers()
        await self.swarm.reannounce()
        self.log.bind(event="mapped_address_announced", addresses=[f"{h}:{p}" for h, p in self.swarm.mapped_addresses]).info(
            "records re-announced with our mapped address" if self.swarm.mapped_addresses else
            "records re-announced without a mapped address")

    async def stop(self) -> None:
        """Delete every mapping we hold (bounded: a silent router does not hold up the stop)."""
        held, self.mappings = list(self.mappings.values()), {}
        self.swarm.mapped_addresses = []
        for m in held:
            try:
                async with asyncio.timeout(UNMAP_TIMEOUT):
                    await self.mapper.unmap(m)
                self.log.bind(event="port_unmapped", **m.to_dict()).info("port mapping removed")
            except (SwarmdError, ValueError, OSError, TimeoutError) as e:
                self.log.bind(event="port_unmap_failed", protocol=m.protocol, reason=str(e)[:200]).info(
                    "could not remove a port mapping; it expires on its own")
