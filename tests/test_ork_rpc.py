"""The ork over real RPC on loopback: racks are real RPC servers, one of them down."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from examples.book_worker import Books
from swarmd.errors import ERR_FORBIDDEN, ERR_HANDSHAKE, ERR_UNAVAILABLE, SwarmdError
from swarmd.node.identity import Identity
from swarmd.rpc import Firewall, Methods, RpcServer, connect
from swarmd.services.ork import Ork, RpcRackCaller
from swarmd.services.things import ThingsConfig
from swarmd_rpc.pool import Pool

T = 20.0


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RackNode:
    """A real rack: a Books service behind its own RPC server and identity."""

    def __init__(self, tmp: Path, name: str) -> None:
        self.identity = Identity.generate()
        self.books = Books("books", tmp / name, ThingsConfig(snapshot_interval_s=0))
        self.methods = Methods()
        self.server = RpcServer(self.identity, self.methods)

    async def start(self) -> RackNode:
        await self.books.start()
        self.books.mount(self.methods)
        await self.server.start()
        return self

    async def stop(self) -> None:
        await self.server.stop()
        await self.books.stop()

    def registration(self, rid: str) -> dict[str, Any]:
        return {"id": rid, "public_key": self.identity.public_key.hex(), "type": "book",
                "addresses": [f"127.0.0.1:{self.server.port}"]}


async def test_fan_out_over_rpc_with_one_rack_down(tmp_path: Path) -> None:
    a = await RackNode(tmp_path, "a").start()
    b = await RackNode(tmp_path, "b").start()
    ork_id, admin, viewer = Identity.generate(), Identity.generate(), Identity.generate()
    pool = Pool(ork_id)
    ork = Ork(tmp_path / "ork", RpcRackCaller(pool))
    await ork.start()
    ork_methods = Methods()
    ork.mount(ork_methods)
    ork_server = RpcServer(ork_id, ork_methods,
                           firewall=Firewall.from_keys(allow=[admin.public_key], allow_read_only=[viewer.public_key]))
    await ork_server.start()
    op = await connect(admin, "127.0.0.1", ork_server.port, remote_public_key=ork_id.public_key, timeout=T)
    vp = await connect(viewer, "127.0.0.1", ork_server.port, remote_public_key=ork_id.public_key, timeout=T)
    try:
        # racks registered by hand, as an operator would with `swarmd call ORK registerRack`
        await op.call("registerRack", a.registration("ra"), timeout=T)
        await op.call("registerRack", b.registration("rb"), timeout=T)
        down = {"id": "rdown", "public_key": Identity.generate().public_key.hex(),
                "addresses": [f"127.0.0.1:{closed_port()}"]}
        await op.call("registerRack", down, timeout=T)
        # a rack registered under the wrong key is refused by the handshake, not trusted
        imposter = dict(b.registration("rimp"), public_key=Identity.generate().public_key.hex())
        await op.call("registerRack", imposter, timeout=T)

        listed = await vp.call("listRacks", {}, timeout=T)
        assert [r["id"] for r in listed] == ["ra", "rb", "rdown", "rimp"]
        assert all("public_key" not in r for r in listed)
        assert all("public_key" in r for r in await vp.call("listRacks", {"keys": True}, timeout=T))

        out = await op.call("registerThing", {"racks": ["ra"], "id": "dune", "info": {"title": "Dune"}}, timeout=T)
        assert out["results"][0]["ok"] is True
        await op.call("registerThing", {"racks": ["rb"], "id": "emma", "info": {"title": "Emma"}}, timeout=T)

        out = await vp.call("listThings", {"sort": {"id": 1}}, timeout=T)
        by_rack = {r["rack"]: r for r in out["results"]}
        assert by_rack["ra"]["ok"] and by_rack["rb"]["ok"]
        assert by_rack["rdown"]["ok"] is False and by_rack["rdown"]["error"]["code"] == ERR_UNAVAILABLE
        assert by_rack["rimp"]["ok"] is False and by_rack["rimp"]["error"]["code"] == ERR_HANDSHAKE
        assert [(t["id"], t["rack"]) for t in out["things"]] == [("dune", "ra"), ("emma", "rb")]

        # a rack that goes down mid-life is reported, the others still answer
        await b.stop()
        out = await vp.call("listThings", {}, timeout=T)
        assert {r["rack"]: r["ok"] for r in out["results"]} == {"ra": True, "rb": False, "rdown": False,
                                                                  "rimp": False}
        await a.books.collect_snaps()
        out = await vp.call("tailLog", {"limit": 5}, timeout=T)
        assert [e["id"] for e in out["entries"]] == ["dune"] and out["entries"][0]["rack"] == "ra"

        # the ork's writes are refused to a read-only peer
        for method, params in (("registerRack", a.registration("rx")), ("forgetRacks", {"all": True}),
                               ("forgetThings", {"all": True})):
            with pytest.raises(SwarmdError) as ei:
                await vp.call(method, params, timeout=T)
            assert ei.value.code == ERR_FORBIDDEN
        assert list(a.books.things) == ["dune"]
    finally:
        await op.close()
        await vp.close()
        await ork_server.stop()
        await ork.stop()
        await pool.close()
        await a.stop()
        if b.books._store is not None:
            await b.stop()
