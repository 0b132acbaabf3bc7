"""`--role relay`: a blind relay for peers that cannot reach each other directly.

Glue only: the splice lives in swarmd/net/relayserver.py and its rules in
swarmd/net/relay.py. The role listens on its own TCP port, announces it on
the RELAYS topic (clients pick the relay with the lowest round trip, with no
configuration) and withdraws the announcement on stop.
"""

from __future__ import annotations

from typing import Any

from loguru import logger

from swarmd import topics
from swarmd.net.relay import RelayConfig
from swarmd.net.relayserver import RelayServer
from swarmd.roles.base import Role


class RelayRole(Role):
    name = "relay"

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.config: RelayConfig = getattr(ctx.settings, "relay", None) or RelayConfig()
        host = self.config.host or ctx.settings.node.host
        self.server = RelayServer(self.config, host)
        self.announced = False
        self.log = logger.bind(role="relay")

    async def start(self) -> None:
        port = await self.server.start()
        self.ctx.ports["relay"] = port
        if self.config.announce:
            self.announced = await self._announce(port)

    async def _announce(self, port: int) -> bool:
        swarm = self.ctx.swarm
        if swarm is None:
            self.log.bind(event="relay_not_announced", reason="no swarm on this node").info(
                "relay serving on port {} without announcing it (no swarm)", port
            )
            return False
        await swarm.join(topics.RELAYS, announce=True, lookup=False, payload={"relay_port": port})
        self.log.bind(event="relay_announced", port=port).info("relay announced on {}", topics.RELAYS)
        return True

    async def stop(self) -> None:
        if self.announced and self.ctx.swarm is not None:
            await self.ctx.swarm.leave(topics.RELAYS)
        await self.server.stop()

    def status(self) -> dict[str, Any]:
        return {"announced": self.announced, **self.server.stats()}

    def metrics(self) -> list[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.server.stats()
        return [CounterMetricFamily("swarmd_relay_bytes", "bytes spliced between peers", value=s["bytes"]),
                GaugeMetricFamily("swarmd_relay_circuits", "circuits open now", value=s["circuits"]),
                CounterMetricFamily("swarmd_relay_paired", "circuits paired since start", value=s["paired_total"])]


ROLE = RelayRole
