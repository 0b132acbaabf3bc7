"""The thing service over real RPC on loopback: Noise, msgpack, the firewall."""

from __future__ import annotations

from pathlib import Path

import pytest

from examples.book_worker import Books
from swarmd.errors import ERR_BAD_REQUEST, ERR_FORBIDDEN, ERR_NOT_FOUND, SwarmdError
from swarmd.node.identity import Identity
from swarmd.rpc import Firewall, Methods, RpcServer, connect
from swarmd.services.things import THING_METHODS, ThingsConfig

T = 20.0  # generous: the machine is shared


async def test_read_only_peer_is_refused_writes(tmp_path: Path) -> None:
    server_id, full, ro, stranger = (Identity.generate() for _ in range(4))
    methods = Methods()
    books = Books("books", tmp_path, ThingsConfig(snapshot_interval_s=0))
    await books.start()
    assert sorted(books.mount(methods)) == sorted(THING_METHODS)
    server = RpcServer(server_id, methods,
                       firewall=Firewall.from_keys(allow=[full.public_key], allow_read_only=[ro.public_key]))
    await server.start()
    peers = []
    try:
        for who in (full, ro, stranger):
            peers.append(await connect(who, "127.0.0.1", server.port, remote_public_key=server_id.public_key,
                                       timeout=T))
        p_full, p_ro, p_stranger = peers
        made = await p_full.call("registerThing", {"id": "dune", "info": {"title": "Dune"}}, timeout=T)
        assert made["id"] == "dune" and made["type"] == "book"

        # reads work for the read-only peer
        listed = await p_ro.call("listThings", {"fields": {"info.title": 1}}, timeout=T)
        assert listed == [{"id": "dune", "info": {"title": "Dune"}}]
        assert await p_ro.call("tailLog", {}, timeout=T) == []

        # every write is refused before it reaches the service
        for method, params in (("registerThing", {"info": {"title": "Emma"}}),
                               ("updateThing", {"id": "dune", "info": {"lost": True}}),
                               ("forgetThings", {"all": True})):
            with pytest.raises(SwarmdError) as ei:
                await p_ro.call(method, params, timeout=T)
            assert ei.value.code == ERR_FORBIDDEN, method
        with pytest.raises(SwarmdError) as ei:
            await p_stranger.call("listThings", {}, timeout=T)
        assert ei.value.code == ERR_FORBIDDEN
        assert list(books.things) == ["dune"] and books.things["dune"].rev == 1

        # service errors cross the wire with their codes
        with pytest.raises(SwarmdError) as ei:
            await p_full.call("updateThing", {"id": "nope"}, timeout=T)
        assert ei.value.code == ERR_NOT_FOUND
        with pytest.raises(SwarmdError) as ei:
            await p_full.call("registerThing", {"info": {"title": b"bytes"}}, timeout=T)
        assert ei.value.code == ERR_BAD_REQUEST
        with pytest.raises(SwarmdError) as ei:
            await p_full.call("listThings", "not an object", timeout=T)
        assert ei.value.code == ERR_BAD_REQUEST
        # and the server keeps serving
        assert len(await p_full.call("listThings", {}, timeout=T)) == 1
    finally:
        for p in peers:
            await p.close()
        await server.stop()
        await books.stop()
