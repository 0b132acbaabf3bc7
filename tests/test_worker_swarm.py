"""The worker in a real swarm (DHT nodes + Noise RPC on loopback): announcements with state and load,
inference through swarm.request, withdrawal on stop."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import numpy as np
import pytest

from swarmd.node.identity import Identity
from swarmd.roles.worker import WorkerRole
from swarmd.rpc import Methods
from swarmd.settings import Settings
from swarmd.swarm import Swarm, SwarmConfig
from swarmd.swarm.stack import open_stack
from swarmd.topics import WORKERS, worker_model_topic
from swarmd.worker.config import WorkerConfig
from tests.conftest import node_context
from tests.dht_testnet import DhtTestnet
from tests.models import mlp_model

MLP = (16, 32, 4)


def swarm_cfg() -> SwarmConfig:
    return dataclasses.replace(
        SwarmConfig(), relookup_interval=0.3, reconnect_initial=0.05, connect_timeout=5.0, lookup_timeout=5.0
    )


class SwarmNode:
    """Identity + the stack the daemon builds before its roles (swarmd.swarm.stack.open_stack)."""

    def __init__(self, net: DhtTestnet, tmp_path, **worker: Any) -> None:
        self.net = net
        self.identity = Identity.generate()
        self.methods = Methods()
        self.ctx = node_context(tmp_path, "worker", settings=Settings(worker=WorkerConfig(**worker)),
                                identity=self.identity, methods=self.methods)

    async def start(self) -> SwarmNode:
        self.stack = await open_stack(self.identity, self.net.config(), methods=self.methods, swarm_config=swarm_cfg())
        self.server, self.swarm = self.stack.server, self.stack.swarm
        self.ctx.swarm = self.swarm
        self.ctx.rpc_server = self.server
        return self

    async def stop(self) -> None:
        await self.ctx.tasks.close()
        await self.stack.stop()


@pytest.fixture
async def net():  # noqa: ANN201
    n = await DhtTestnet.create(6)
    yield n
    await n.close()


async def wait_for_record(swarm: Swarm, topic: str, key: bytes, pred=lambda p: True):  # noqa: ANN001, ANN201
    for _ in range(200):
        recs = [r for r in await swarm.lookup_all(topic, timeout=5) if r.public_key == key]
        if recs and pred(recs[0].payload):
            return recs[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no matching record of {key.hex()[:8]} on {topic}")


async def test_announces_serves_and_withdraws(net, tmp_path):
    path = tmp_path / "mlp.onnx"
    path.write_bytes(mlp_model(MLP))
    node = await SwarmNode(net, tmp_path, models=[f"mlp={path}"], announce_interval=0.2).start()
    client = await SwarmNode(net, tmp_path / "c").start()
    role = WorkerRole(node.ctx)
    try:
        await role.start()
        key = node.identity.public_key
        rec = await wait_for_record(client.swarm, worker_model_topic("mlp"), key, lambda p: p["state"] == "ONLINE")
        assert rec.payload["models"] == ["mlp"]
        assert set(rec.payload["load"]) >= {"queue", "in_flight", "ewma_ms", "rps"}
        await wait_for_record(client.swarm, WORKERS, key)
        x = np.ones((1, MLP[0]), np.float32)
        out = await client.swarm.request(key, "runInference", {"model": "mlp", "inputs": {"input": x}}, timeout=30)
        assert out["outputs"]["output"].shape == (1, MLP[-1])
        # Live load is refreshed: the request shows up in the announced EWMA latency.
        await wait_for_record(client.swarm, WORKERS, key, lambda p: p["load"]["ewma_ms"] > 0)
        await role.unload_model(None, {"model": "mlp"})
        await wait_for_record(client.swarm, WORKERS, key, lambda p: p["models"] == [])
        for _ in range(200):  # the per-model topic is left once the model is gone
            if not [r for r in await client.swarm.lookup_all(worker_model_topic("mlp"), timeout=5) if r.public_key == key]:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("worker still announced on the model topic after unloading it")
    finally:
        await role.stop()
    for _ in range(200):
        if not [r for r in await client.swarm.lookup_all(WORKERS, timeout=5) if r.public_key == key]:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("worker record still on WORKERS after stop")
    await client.stop()
    await node.stop()
