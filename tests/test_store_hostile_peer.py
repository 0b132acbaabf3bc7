"""A hostile replication peer (tests/hostile_store.py: swarmd's own StoreRole, its own key)
cannot delete, squat, forge the latest version or bloat a store's catalog."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import msgpack
from store_models import write_model
from store_nodes import start_store

from swarmd.node.identity import Identity
from swarmd.roles.store_replication import PAGE_ROWS
from tests.conftest import rpc_call
from tests.hostile_store import HostileStore


async def test_a_lying_peer_named_as_replica_cannot_delete_or_bloat(tmp_path: Path) -> None:
    """Even a peer the operator named (store.peers) gets no say by its clock or by rows nobody holds."""
    operator = Identity.generate()
    hostile = await start_store(tmp_path / "h", role_class=HostileStore)
    victim = await start_store(tmp_path / "v", peers=[hostile.addr], replication_factor=2)
    try:
        f = write_model(tmp_path / "m.onnx", seed=3)
        mine = await asyncio.to_thread(victim.role.core.put_file, f, "iris", "1", uploader=operator.public_hex)
        HostileStore.victim_rows = [mine]
        before = len(msgpack.packb(await victim.role.store_state(None, {})))
        for _ in range(3):
            await victim.role.replicate_once()
        assert HostileStore.calls[f"storeState:{victim.key}"] >= 3  # it was asked, and lied each time
        core = victim.role.core
        assert core.get("iris").version == "1" and core.holdings() == {mine.digest}  # nothing deleted
        assert [(m.name, m.version) for m in core.catalog.list(include_deleted=True)] == [("iris", "1")]
        after = len(msgpack.packb(await victim.role.store_state(None, {})))
        assert after == before  # no row of the hostile's was written
        assert len(victim.role._deleted_elsewhere) <= 3 * PAGE_ROWS  # remembered in memory only, bounded
    finally:
        HostileStore.victim_rows = []
        await victim.stop()
        await hostile.stop()


_rpc = rpc_call


async def _until(pred: Any, what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not await pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


async def test_an_unlisted_store_on_the_swarm_gets_no_say(tmp_path: Path, daemons: Any) -> None:
    """Daemons V and L list each other (and the operator) in [access]; H, a store with its own key
    announcing on the same swarm, squats iris:99 with a forged uploader, sends future-stamped
    tombstones and fills every answer: V and L never even ask it, and replicate with each other."""
    from swarmd.daemon import Node
    from swarmd.settings import NodeConfig, Settings
    from swarmd.store.config import StoreConfig
    from swarmd.store.transfer import push_file
    from tests.conftest import swarmd_env

    operator = Identity.generate()
    keys = {}
    for name in ("v", "l"):
        (tmp_path / name).mkdir(mode=0o700)
        keys[name] = Identity.load_or_create(tmp_path / name / "identity.key").public_hex
    common = {"SWARMD_STORE_REPLICATE_INTERVAL": "0.5", "SWARMD_STORE_REPLICATION_FACTOR": "2"}
    v = daemons("--role", "bootstrap,store", "--data-dir", str(tmp_path / "v"),
                env=swarmd_env(SWARMD_ACCESS_ALLOW=f"{operator.public_hex},{keys['l']}", **common))
    vr = await asyncio.to_thread(v.wait_event, "ready")
    boot = f"127.0.0.1:{vr['ports']['dht']}"
    lr = await asyncio.to_thread(
        daemons("--role", "store", "--data-dir", str(tmp_path / "l"), "--bootstrap", boot,
                env=swarmd_env(SWARMD_ACCESS_ALLOW=f"{operator.public_hex},{keys['v']}", **common)).wait_event,
        "ready")

    async def push(ready: dict[str, Any], seed: int, version: str) -> dict[str, Any]:
        from swarmd.rpc import connect

        peer = await connect(operator, "127.0.0.1", ready["ports"]["rpc"],
                             remote_public_key=bytes.fromhex(ready["public_key"]), timeout=30)
        try:
            return await push_file(peer, write_model(tmp_path / f"m{seed}.onnx", seed=seed), "iris", version)
        finally:
            await peer.close()

    one = await push(vr, 1, "1")

    async def l_has(digest: str) -> bool:
        return digest in (await _rpc(operator, lr, "storeState", {}))["have"]

    await _until(lambda: l_has(one["digest"]), "iris:1 replicated to the listed store L")

    settings = Settings(node=NodeConfig(data_dir=tmp_path / "h", roles=["store"], bootstrap=[boot]),
                        store=StoreConfig(replicate_interval=0.5))
    settings.trust.open = True  # the swarm is open (as the daemons' env asks): the lists decide
    hostile = Node(settings, role_classes={"store": HostileStore})
    ctx = await hostile.start()
    try:
        role = ctx.role("store")
        squat = write_model(tmp_path / "squat.onnx", seed=66)
        await asyncio.to_thread(role.core.put_file, squat, "iris", "99", uploader=operator.public_hex)
        role._wake.set()  # announce it now
        HostileStore.victim_rows = [role.core.catalog.row("iris", "99")]
        from swarmd.names import ModelMeta

        HostileStore.victim_rows.append(ModelMeta("iris", "1", one["digest"], one["size"], created=one["created"]))
        await asyncio.to_thread(v.wait_event, "replica_refused")  # V saw H on STORES, and left it out
        two = await push(vr, 2, "2")  # rounds go on around H: L still gets what V has
        await _until(lambda: l_has(two["digest"]), "iris:2 replicated to L")
        for ready in (vr, lr):
            assert HostileStore.calls[f"storeState:{ready['public_key']}"] == 0
            assert HostileStore.calls[f"listModels:{ready['public_key']}"] == 0
            latest = await _rpc(operator, ready, "getModel", {"name": "iris"})
            assert latest["version"] == "2" and latest["digest"] == two["digest"]
            state = await _rpc(operator, ready, "storeState", {})
            assert sorted((m["name"], m["version"], m["deleted"]) for m in state["models"]) == [
                ("iris", "1", None), ("iris", "2", None)]
            assert one["digest"] in state["have"] and len(msgpack.packb(state)) < 4096
    finally:
        HostileStore.victim_rows = []
        await hostile.stop()
