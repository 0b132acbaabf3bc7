"""Stores that find each other on the swarm (real DHT, real Noise/TCP): announce, replicate, survive a loss."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from store_models import write_model
from store_nodes import Node, start_swarm_store

from swarmd.rpc import connect
from swarmd.store.transfer import push_file
from swarmd.topics import STORES, blob_topic, model_topic
from tests.dht_testnet import DhtTestnet

T = 30.0
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def net() -> AsyncIterator[DhtTestnet]:
    n = await DhtTestnet.create(5)
    yield n
    await n.close()


async def rounds_until(pred: Any, nodes: list[Node], what: str) -> None:
    for _ in range(60):
        for n in nodes:
            await n.role.wait_round()
        if await pred():
            return
    raise AssertionError(f"not reached after 60 replication rounds: {what}")


async def keys_on(node: Node, topic: str) -> set[str]:
    return {r.public_key.hex() for r in await node.swarm.lookup_all(topic)}


async def every_store_listed(nodes: list[Node]) -> None:
    """Replication rounds until every store finds every other on STORES."""
    everyone = {n.key for n in nodes}

    async def all_listed() -> bool:
        return all([await keys_on(n, STORES) >= everyone for n in nodes])

    await rounds_until(all_listed, nodes, "every store on STORES")


async def test_stores_replicate_through_the_swarm(net: DhtTestnet, tmp_path: Path) -> None:
    nodes = [await start_swarm_store(net, tmp_path / f"s{i}", replicate_interval=3600.0) for i in range(3)]
    try:
        await every_store_listed(nodes)
        a = nodes[0]
        peer = await connect(None, "127.0.0.1", a.server.port, remote_public_key=a.ident.public_key, timeout=T)
        try:
            meta = await push_file(peer, write_model(tmp_path / "m.onnx", seed=41, pad_floats=10_000), "m", "1",
                                   timeout=T)
        finally:
            await peer.close()
        d = meta["digest"]

        def holders(ns: list[Node]) -> set[str]:
            return {n.key for n in ns if d in n.role.core.holdings()}

        async def two(ns: list[Node] = nodes) -> bool:
            return len(holders(ns)) == 2

        await rounds_until(two, nodes, "two copies")
        # holders announce the model and the blob, so workers can find a source
        async def announced() -> bool:
            return (await keys_on(a, model_topic("m")) >= holders(nodes)
                    and await keys_on(a, blob_topic(d)) >= holders(nodes))

        await rounds_until(announced, nodes, "model and blob topics announced by the holders")
        # a holder disappears; the survivors restore the factor
        victim = next(n for n in nodes if n.key in holders(nodes))
        await victim.stop()
        nodes.remove(victim)

        async def two_left() -> bool:
            return len(holders(nodes)) == 2

        await rounds_until(two_left, nodes, "two copies among the survivors")
    finally:
        for n in nodes:
            await n.stop()


async def cli(*argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "swarmd", "model", *argv, "--log-level", "ERROR",
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_cli_finds_stores_through_the_swarm(net: DhtTestnet, tmp_path: Path) -> None:
    nodes = [await start_swarm_store(net, tmp_path / f"s{i}", replicate_interval=3600.0) for i in range(2)]
    try:
        await every_store_listed(nodes)
        host, port = net.nodes[0].address
        boot = ("--bootstrap", f"{host}:{port}", "--data-dir", str(tmp_path / "cli"))
        f = write_model(tmp_path / "m.onnx", seed=42)
        rc, out, err = await cli("push", str(f), "--name", "m", "--json", *boot)
        assert rc == 0, err
        d = json.loads(out)["digest"]

        async def both() -> bool:
            return all(d in n.role.core.holdings() for n in nodes)

        await rounds_until(both, nodes, "both stores hold the model")
        dest = tmp_path / "pulled.onnx"
        rc, out, err = await cli("pull", "m:1", "-o", str(dest), *boot)
        assert rc == 0, err
        assert dest.read_bytes() == f.read_bytes()
        rc, out, err = await cli("rm", "m:1", *boot)
        assert rc == 0 and "deleted m:1 on 2 stores" in out, (out, err)
        assert all(n.role.core.list() == [] for n in nodes)
    finally:
        for n in nodes:
            await n.stop()
