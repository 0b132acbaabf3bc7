"""Orchestrators fed by the DHT: workers announce on WORKERS, orchestrators announce on ORCHESTRATORS.

Real DHT nodes, real swarms, real Noise/TCP RPC on loopback; no registerWorker anywhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from orchestrator_peers import Orchestrator, PeerWorker, expected

from swarmd.node.identity import Identity
from swarmd.rpc import Methods
from swarmd.swarm import Swarm, SwarmConfig
from swarmd.topics import ORCHESTRATORS, WORKERS, worker_model_topic
from tests.dht_testnet import DhtTestnet

T = 20.0


def swarm_cfg() -> SwarmConfig:
    return SwarmConfig(relookup_interval=0.3, reconnect_initial=0.05, connect_timeout=3.0, lookup_timeout=3.0)


@pytest.fixture
async def net() -> AsyncIterator[DhtTestnet]:
    n = await DhtTestnet.create(6)
    yield n
    await n.close()


class SwarmWorker:
    """A worker peer that announces itself on the DHT the way the worker contract says."""

    def __init__(self, worker: PeerWorker, swarm: Swarm) -> None:
        self.worker = worker
        self.swarm = swarm

    @classmethod
    async def start(
        cls, net: DhtTestnet, models: tuple[str, ...] = ("mlp",), topic: str = WORKERS
    ) -> SwarmWorker:
        w = await PeerWorker(models).start()
        dht = await net.add(w.identity)
        sw = Swarm(w.identity, dht, w.server, swarm_cfg())
        await sw.start()
        self = cls(w, sw)
        await sw.join(topic, announce=True, lookup=False, payload=self.payload())
        assert await sw.flush(T)
        return self

    def payload(self) -> dict[str, Any]:
        return {
            "state": self.worker.state,
            "models": list(self.worker.models),
            "load": {"queue": 0, "in_flight": self.worker.in_flight, "ewma_ms": 0.1, "rps": 0},
        }

    async def stop(self) -> None:
        await self.swarm.stop()  # withdraws the WORKERS record
        self.worker._never.set()
        await self.worker.stop()


async def orchestrator(net: DhtTestnet, tmp: Path, **cfg: Any) -> Orchestrator:
    ident = Identity.generate()
    dht = await net.add(ident)
    sw = Swarm(ident, dht, Methods(), swarm_cfg())
    await sw.start()
    base = {
        "seed": 1,
        "dht_refresh": 0.1,
        # long enough that a live worker's lease outlives a few slow lookups on a loaded machine
        # (lookup_all returns partial results when it runs out of time), short enough to watch one run out
        "dht_lease_ttl": 3.0,
        "announce_interval": 0.2,  # the ORCHESTRATORS payload follows what it knows quickly (default 10 s)
        "health_interval": 0.1,
        "health_timeout": 2.0,
    }
    base.update(cfg)
    return await Orchestrator(tmp, swarm=sw, **base).start()


async def eventually(cond: Any, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not await cond():
            await asyncio.sleep(0.05)


async def stop_orch(o: Orchestrator) -> None:
    await o.stop()
    assert o.ctx.swarm is not None
    await o.ctx.swarm.stop()
    await o.ctx.swarm.server.stop()


async def test_two_orchestrators_route_to_workers_found_on_the_dht(net: DhtTestnet, tmp_path: Path) -> None:
    workers = [await SwarmWorker.start(net) for _ in range(2)]
    orchs = [await orchestrator(net, tmp_path / str(i)) for i in range(2)]
    try:
        keys = {w.worker.public_hex for w in workers}
        for o in orchs:

            async def sees_both(o: Orchestrator = o) -> bool:
                status = await o.call("getServiceStatus", {})
                return {w["public_key"] for w in status["workers"]} == keys

            await eventually(sees_both)
            answered = set()
            for i in range(8):
                x = np.full((1, 4), float(i), dtype=np.float32)
                out = await o.call("routeInferenceRequest", {"model": "mlp", "inputs": {"x": x}})
                np.testing.assert_allclose(out["outputs"]["y"], expected(x))
                answered.add(out["worker"])
            assert answered <= keys and answered
            status = await o.call("getServiceStatus", {})
            assert all(w["sources"] == ["dht"] for w in status["workers"])

        # Gateways find the orchestrators on their topic.
        client_id = Identity.generate()
        client = Swarm(client_id, await net.add(client_id), Methods(), swarm_cfg())
        await client.start()
        try:

            async def both_announced_with_their_workers() -> bool:
                found = {r.public_key: r.payload for r in await client.lookup_all(ORCHESTRATORS)}
                return all(found.get(o.identity.public_key, {}).get("workers") == 2 for o in orchs)

            await eventually(both_announced_with_their_workers)
        finally:
            await client.stop()
            await client.server.stop()

        # A worker leaves: its record is withdrawn, the leases run out, traffic stays on the other one.
        gone = workers.pop(0)
        await gone.stop()
        for o in orchs:

            async def forgot(o: Orchestrator = o) -> bool:
                status = await o.call("getServiceStatus", {})
                return gone.worker.public_hex not in {w["public_key"] for w in status["workers"]}

            await eventually(forgot)
            x = np.ones((1, 4), dtype=np.float32)
            out = await o.call("routeInferenceRequest", {"model": "mlp", "inputs": {"x": x}})
            assert out["worker"] == workers[0].worker.public_hex
    finally:
        for o in orchs:
            await stop_orch(o)
        for w in workers:
            await w.stop()


async def test_a_worker_announcing_draining_gets_no_traffic(net: DhtTestnet, tmp_path: Path) -> None:
    workers = [await SwarmWorker.start(net) for _ in range(2)]
    o = await orchestrator(net, tmp_path, health_interval=3600.0)
    try:

        async def routable(n: int) -> bool:
            return (await o.call("getServiceStatus", {}))["counts"]["routable"] == n

        await eventually(lambda: routable(2))
        draining = workers[0]
        draining.worker.state = "DRAINING"
        await draining.swarm.update(WORKERS, draining.payload())
        await eventually(lambda: routable(1))
        x = np.ones((1, 4), dtype=np.float32)
        for _ in range(6):
            out = await o.call("routeInferenceRequest", {"model": "mlp", "inputs": {"x": x}})
            assert out["worker"] == workers[1].worker.public_hex
    finally:
        await stop_orch(o)
        for w in workers:
            await w.stop()


async def test_a_model_announced_only_on_its_own_topic_is_found_on_first_request(
    net: DhtTestnet, tmp_path: Path
) -> None:
    o = await orchestrator(net, tmp_path, dht_refresh=3600.0, dht_lease_ttl=3600.0)
    w = await SwarmWorker.start(net, models=("cnn",), topic=worker_model_topic("cnn"))
    try:
        assert (await o.call("getServiceStatus", {}))["counts"]["total"] == 0
        x = np.ones((2, 4), dtype=np.float32)
        out = await o.call("routeInferenceRequest", {"model": "cnn", "inputs": {"x": x}})
        assert out["worker"] == w.worker.public_hex
        np.testing.assert_allclose(out["outputs"]["y"], expected(x))
        found = await o.call("findAvailableWorker", {"model": "cnn"})
        assert found["public_key"] == w.worker.public_hex
    finally:
        await stop_orch(o)
        await w.stop()


async def test_a_worker_in_the_same_node_is_called_without_a_socket(net: DhtTestnet, tmp_path: Path) -> None:
    o = await orchestrator(net, tmp_path, health_interval=3600.0)
    try:
        swarm = o.ctx.swarm
        assert swarm is not None
        local = (
            PeerWorker()
        )  # its handlers served by the orchestrator's own node, as a co-located worker role
        swarm.methods.register("runInference", local.run_inference)
        swarm.methods.register("checkCapacity", local.check_capacity)
        await swarm.join(WORKERS, announce=True, lookup=False, payload=SwarmWorker(local, swarm).payload())

        async def registered() -> bool:
            return (await o.call("getServiceStatus", {}))["counts"]["routable"] == 1

        await eventually(registered)
        x = np.ones((1, 4), dtype=np.float32)
        out = await o.call("routeInferenceRequest", {"model": "mlp", "inputs": {"x": x}})
        assert out["worker"] == o.identity.public_hex and local.served == 1
        # no connection to ourselves was dialled: our own key gave the swarm's in-process peer
        assert list(o.role.connections._peers.values()) == [swarm.local_peer()]
        np.testing.assert_allclose(out["outputs"]["y"], expected(x))
        assert (await o.call("healthCheck", {"refresh": True}))["workers"][o.identity.public_hex]["healthy"]
    finally:
        await stop_orch(o)
