"""Every RPC method's op flag, on a node running every role, over real RPC.

The firewall refuses read-only peers ([access] allow_read_only) only the methods
registered with op "w", so a state-changing method registered "r" is a hole.
OPS below is the audit: each method a node can serve, with the op it must have
and why (read from its handler). A method that appears without an entry here
fails the test, so a new method gets reviewed before it ships.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from swarmd.daemon import Node
from swarmd.errors import ERR_FORBIDDEN, SwarmdError
from swarmd.node.identity import Identity
from swarmd.roles.base import ROLE_ORDER
from swarmd.rpc import connect
from swarmd.services.ork import Ork
from swarmd.services.things import ThingsConfig, ThingService
from swarmd.settings import Settings
from tests.conftest import InProcessRacks

W, R = "w", "r"
OPS: dict[str, str] = {
    # rpc / swarm / nat
    "ping": R, "echo": R, "swarm.status": R, "nat.status": R,
    "node.tasks": R,  # names of the node's background tasks (swarmd status); changes nothing
    "node.info": R,  # roles, version, uptime, NAT type: what swarm.status already tells any caller
    "nat.retire": R,  # the dialler retires its own connection to us after a path upgrade; touches no other peer
    "nat.signal": R,  # forwards a connection request; rate-limited per caller, stores nothing
    "nat.connect": R,  # answers a UDP punch offer to reach this node (what any caller needs)
    "nat.probe": W,  # makes this node dial out and stream: own key only, and "w"
    "nat.sink": R,  # counts bytes, keeps nothing; bounded per caller key (tests/test_nat_sink.py)
    # worker
    "runInference": R, "checkCapacity": R, "getAvailableModels": R, "getHealth": R,
    "getModelStatistics": R,  # counters of the loaded models; changes nothing
    "loadModel": W, "unloadModel": W,
    # orchestrator
    "registerWorker": W, "unregisterWorker": W,
    "findAvailableWorker": R, "routeInferenceRequest": R, "getServiceStatus": R,
    "getLoadBalancingStats": R, "healthCheck": R,
    # store
    "listModels": R, "getModel": R, "uploadStatus": R, "storeState": R, "downloadBlob": R,
    "deleteModel": W, "uploadModel": W,
    # a thing service mounted as "books." and an ork as "ork."
    "books.registerThing": W, "books.updateThing": W, "books.forgetThings": W,
    "books.listThings": R, "books.tailLog": R,
    "ork.registerRack": W, "ork.forgetRacks": W, "ork.listRacks": R,
    "ork.registerThing": W, "ork.updateThing": W, "ork.forgetThings": W,
    "ork.listThings": R, "ork.tailLog": R,
}


@pytest.fixture
async def full_node(tmp_path: Path) -> Any:
    writer, reader = Identity.generate(), Identity.generate()
    s = Settings()
    s.trust.open = True  # an open swarm, asked for (the [access] lists are what this test audits)
    s.node.roles = list(ROLE_ORDER)
    s.node.data_dir = tmp_path / "node"
    s.gateway.print_admin_key = False
    s.access.allow = [writer.public_hex]
    s.access.allow_read_only = [reader.public_hex]
    node = Node(s)
    ctx = await node.start()
    books = ThingService("books", ctx.data_dir, ThingsConfig(snapshot_interval_s=0))
    await books.start()
    ork = Ork(ctx.data_dir, InProcessRacks())
    await ork.start()
    mounted = books.mount(ctx.methods, "books.") + ork.mount(ctx.methods, "ork.")
    try:
        yield ctx, writer, reader
    finally:
        for name in mounted:
            ctx.methods.unregister(name)
        await ork.stop()
        await books.stop()
        await node.stop()


def _registered(ctx: Any) -> dict[str, tuple[str, bool]]:
    out = {}
    for name in ctx.methods.names():
        m = ctx.methods.get(name)
        out[name] = (m.op, m.stream)
    return out


async def _try(peer: Any, name: str, stream: bool) -> str:
    """Call with empty params; return "ok" or the error code."""
    try:
        if stream:
            st = await peer.open_stream(name, None, timeout=30)
            try:
                await st.close()
            except SwarmdError:
                pass
            await st.result()
        else:
            await peer.call(name, None, timeout=30)
    except SwarmdError as e:
        return e.code
    return "ok"


async def test_every_method_has_the_audited_op(full_node: Any) -> None:
    ctx, _writer, _reader = full_node
    got = _registered(ctx)
    unreviewed = sorted(set(got) - set(OPS))
    assert not unreviewed, f"methods without an audited op (add them to OPS after reading the handler): {unreviewed}"
    wrong = {n: (op, OPS[n]) for n, (op, _s) in got.items() if op != OPS[n]}
    assert not wrong, f"registered op differs from the audit (registered, audited): {wrong}"
    # every role really registered something: the walk covered them all
    for sample in ("runInference", "registerWorker", "listModels", "swarm.status", "nat.sink"):
        assert sample in got


async def test_read_only_peer_is_refused_every_write_and_served_reads(full_node: Any) -> None:
    ctx, writer, reader = full_node
    port, key = ctx.ports["rpc"], ctx.identity.public_key
    methods = _registered(ctx)
    ro = await connect(reader, "127.0.0.1", port, remote_public_key=key, timeout=30)
    stranger = await connect(Identity.generate(), "127.0.0.1", port, remote_public_key=key, timeout=30)
    rw = await connect(writer, "127.0.0.1", port, remote_public_key=key, timeout=30)
    try:
        for name, (op, stream) in sorted(methods.items()):
            code = await _try(ro, name, stream)
            if op == W:
                assert code == ERR_FORBIDDEN, f"read-only peer got {code} from write method {name}"
            else:
                assert code != ERR_FORBIDDEN, f"read-only peer refused read method {name}"
            assert await _try(stranger, name, stream) == ERR_FORBIDDEN, f"unlisted key reached {name}"
            if op == W and name not in ("nat.probe",):  # nat.probe is for the node's own key only
                assert await _try(rw, name, stream) != ERR_FORBIDDEN, f"writer refused {name}"
        assert await ro.call("ping", timeout=30) == "pong"
    finally:
        for p in (ro, stranger, rw):
            await p.close()
