"""--role bootstrap: a DHT-only node. Every node already runs the DHT; this
role only insists on server mode (it exists to be reached) and reports the
DHT's state. The first node of a private swarm is one started with no
--bootstrap."""

from __future__ import annotations

from typing import Any

from swarmd.roles.base import Role


class BootstrapRole(Role):
    name = "bootstrap"

    async def start(self) -> None:
        dht = self.ctx.dht
        if dht is not None and dht.config.mode == "auto" and dht.mode == "client":
            # an operator who asks for a bootstrap node means it to be reachable
            dht.protocol.client_mode = False

    def status(self) -> dict[str, Any]:
        dht = self.ctx.dht
        if dht is None:
            return {}
        return {
            "dht_port": dht.address[1],
            "mode": dht.mode,
            "contacts": len(dht.contacts()),
            "records": len(dht.protocol.records),
        }


ROLE = BootstrapRole
