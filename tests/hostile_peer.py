"""A hostile swarm member for tests, built only from swarmd's own classes.

It has its own key, its own DHT node and RPC server, announces whatever it
likes on any topic (with any payload: a weight of 1e6, a grant it was once
given and that expired, a grant it signed itself) and counts every call the
victims make to it. It forges no signature: every record it announces is
signed by its own key, as the DHT requires.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from swarmd.node.identity import Identity
from swarmd.node.trust import Grant, Trust
from swarmd.rpc import CallContext, Firewall, Methods, RpcPeer, RpcServer, connect
from swarmd.swarm import Swarm, SwarmConfig
from swarmd.swarm.stack import Stack, open_stack

T = 20.0


def swarm_cfg() -> SwarmConfig:
    return SwarmConfig(relookup_interval=0.3, reconnect_initial=0.05, connect_timeout=3.0, lookup_timeout=3.0)


class HostilePeer:
    """Announces on topics and answers every method a worker or store serves, counting the calls."""

    METHODS = ("runInference", "checkCapacity", "getModel", "storeState", "listModels", "getHealth")

    def __init__(self, identity: Identity | None = None, grants: list[Grant] | None = None) -> None:
        self.identity = identity or Identity.generate()
        self.grants = grants or []
        self.calls: Counter[str] = Counter()
        self.methods = Methods()
        for name in self.METHODS:
            self.methods.register(name, self._answer(name))
        # it presents whatever grants it has (none, expired, self-signed) in records and hellos
        self.trust = Trust(open=True, own_key=self.identity.public_key, own_grants=self.grants)
        self.server = RpcServer(self.identity, self.methods, firewall=Firewall(open=True, trust=self.trust))
        self.swarm: Swarm | None = None
        self.stack: Stack | None = None

    def _answer(self, name: str) -> Any:
        async def handler(ctx: CallContext, params: Any) -> Any:
            self.calls[name] += 1
            if name == "checkCapacity":
                return {
                    "state": "ONLINE",
                    "queue_depth": 0,
                    "in_flight": 0,
                    "max_concurrent": 10**6,
                    "accepting": True,
                }
            if name == "getModel":
                return {"name": "m", "version": "9", "digest": "ab" * 32, "size": 1, "format": "onnx"}
            return {"outputs": {}, "hostile": True}

        return handler

    @property
    def public_key(self) -> bytes:
        return self.identity.public_key

    async def start(self, net: Any) -> HostilePeer:
        await self.server.start()
        self.stack = await open_stack(self.identity, net.config(), server=self.server, swarm_config=swarm_cfg(),
                                      trust=self.trust)
        self.swarm = self.stack.swarm
        return self

    async def announce(self, topic: str, payload: dict[str, Any]) -> None:
        assert self.swarm is not None
        await self.swarm.join(topic, announce=True, lookup=False, payload=payload)
        assert await self.swarm.flush(T)

    async def dial(self, host: str, port: int, remote: bytes) -> RpcPeer:
        """A direct RPC connection that presents this peer's grants in its hello."""
        return await connect(
            self.identity,
            host,
            port,
            remote_public_key=remote,
            firewall=Firewall(open=True, trust=self.trust),
        )

    async def stop(self) -> None:
        if self.stack is not None:
            await self.stack.stop()  # swarm and DHT node; the server is ours
        await self.server.stop()
