"""`swarmd topic lookup/join` and `swarmd peers` as separate processes
against an in-process DHT testnet and swarm."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from swarmd.commands.peers import running_node_status
from swarmd.node.identity import Identity
from swarmd.rpc import Methods, RpcServer
from swarmd.swarm import Swarm, SwarmConfig
from tests.dht_testnet import DhtTestnet

ROOT = Path(__file__).resolve().parent.parent


async def _cli(*args: str, data_dir: Path) -> asyncio.subprocess.Process:
    env = dict(os.environ, PYTHONPATH=str(ROOT), SWARMD_LOG_LEVEL="WARNING")
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "swarmd", *args, "--data-dir", str(data_dir),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=str(ROOT),
    )  # fmt: skip


async def test_topic_lookup_and_join_find_an_in_process_swarm(tmp_path: Path) -> None:
    net = await DhtTestnet.create(5)
    ident = Identity.generate()
    dht = await net.add(ident)
    sw = Swarm(ident, dht, Methods(), SwarmConfig(relookup_interval=0.2))
    try:
        await sw.join("cli-demo", announce=True, lookup=True, payload={"role": "worker"})
        assert await sw.flush(10)
        boot = "{}:{}".format(*net.nodes[0].address)
        proc = await _cli("topic", "lookup", "cli-demo", "--json", "--bootstrap", boot, data_dir=tmp_path)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()[-2000:]
        found = json.loads(out)
        assert [(r["public_key"], r["payload"]) for r in found] == [(ident.public_hex, {"role": "worker"})]

        events = sw.connections()
        proc = await _cli("topic", "join", "cli-demo", "--json", "--bootstrap", boot, data_dir=tmp_path)
        try:
            # its own key and joined state first, before any peer connects
            joined = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
            assert joined["event"] == "joined" and joined["topic"] == "cli-demo"
            assert len(bytes.fromhex(joined["public_key"])) == 32 and joined["public_key"] != ident.public_hex
            ev = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
            assert ev["event"] == "open" and ev["public_key"] == ident.public_hex
            assert ev["topics"] == ["cli-demo"]  # the name joined, not its hash
            mine = await asyncio.wait_for(events.__anext__(), 30)
            assert mine.kind == "open" and mine.public_key.hex() == joined["public_key"]
            await sw.stop()
            ev = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
            assert ev["event"] == "close" and ev["topics"] == ["cli-demo"]
        finally:
            proc.send_signal(signal.SIGINT)
            await asyncio.wait_for(proc.wait(), 30)
        assert proc.returncode == 0
    finally:
        await sw.stop()
        await net.close()


async def test_peers_reads_a_running_nodes_status(tmp_path: Path) -> None:
    net = await DhtTestnet.create(3)
    ident = Identity.generate()
    dht = await net.add(ident)
    methods = Methods()
    server = RpcServer(ident, methods, "127.0.0.1", 0)
    await server.start()
    sw = Swarm(ident, dht, server, SwarmConfig())
    sw.register_methods()
    try:
        await sw.start()
        (tmp_path / "status.json").write_text(
            json.dumps({"public_key": ident.public_hex, "ports": {"rpc": server.port}})
        )
        st = await running_node_status(tmp_path)
        assert st["public_key"] == ident.public_hex
        assert len(st["dht"]["contacts"]) >= 3
        proc = await _cli("peers", data_dir=tmp_path)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()[-2000:]
        assert ident.public_hex in out.decode()
        proc = await _cli("peers", data_dir=tmp_path / "nowhere")
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 1 and b"ERR_NOT_FOUND" in err
    finally:
        await sw.stop()
        await server.stop()
        await net.close()
