"""Racks register themselves on the RACKS topic of a real DHT and leave when they stop announcing."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from examples.book_worker import Books
from swarmd.node.identity import Identity
from swarmd.rpc import Methods, RpcServer
from swarmd.services.ork import Ork, OrkConfig, SwarmRackCaller, rack_payload
from swarmd.services.things import ThingsConfig
from swarmd.swarm import Swarm, SwarmConfig
from swarmd.topics import RACKS
from tests.dht_testnet import DhtTestnet

T = 20.0


def _cfg() -> SwarmConfig:
    return dataclasses.replace(SwarmConfig(), connect_timeout=5.0, lookup_timeout=5.0)


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def _node(net: DhtTestnet) -> tuple[Swarm, RpcServer]:
    ident = Identity.generate()
    dht = await net.add(ident)
    server = RpcServer(ident, Methods(), "127.0.0.1", 0)
    await server.start()
    swarm = Swarm(ident, dht, server, _cfg())
    await swarm.start()
    return swarm, server


async def test_racks_join_through_the_dht_and_leave_on_lease_expiry(tmp_path: Path) -> None:
    import time

    net = await DhtTestnet.create(6)
    started: list[Any] = []
    try:
        racks = []
        for name in ("east", "west"):
            swarm, server = await _node(net)
            books = Books("books", tmp_path / name, ThingsConfig(snapshot_interval_s=0))
            await books.start()
            books.mount(server.methods)
            await swarm.join(RACKS, announce=True, lookup=False, payload=rack_payload(f"shelf-{name}", "book"))
            assert await swarm.flush(T)
            await books.call("registerThing", {"id": f"book-{name}", "info": {"title": name.title()}})
            racks.append((swarm, server, books))
            started.append((swarm, server, books))

        ork_swarm, ork_server = await _node(net)
        started.append((ork_swarm, ork_server, None))
        clock = Clock(time.time())

        async def lookup() -> Any:
            return await ork_swarm.lookup_all(RACKS, timeout=T)

        ork = Ork(tmp_path / "ork", SwarmRackCaller(ork_swarm), OrkConfig(lease_s=60, discover_interval_s=0),
                  clock=clock, lookup=lookup)
        async with ork:
            assert await ork.discover_once() == 2
            listed = await ork.call("listRacks", {"keys": True})
            assert sorted(r["id"] for r in listed) == ["shelf-east", "shelf-west"]
            assert all(r["source"] == "dht" and r["type"] == "book" for r in listed)
            assert {r["public_key"] for r in listed} == {s.public_key.hex() for s, _, _ in racks}

            out = await ork.call("listThings", {"sort": {"id": 1}})
            assert all(r["ok"] for r in out["results"]), out["results"]
            assert [(t["id"], t["rack"]) for t in out["things"]] == [("book-east", "shelf-east"),
                                                                    ("book-west", "shelf-west")]

            # west stops announcing (and its server goes away): its lease runs out
            west_swarm, west_server, west_books = racks[1]
            await west_swarm.leave(RACKS)
            clock.t += 61
            await ork.discover_once()
            assert [r["id"] for r in await ork.call("listRacks", {})] == ["shelf-east"]
            out = await ork.call("listThings", {})
            assert [r["rack"] for r in out["results"]] == ["shelf-east"]
    finally:
        for swarm, server, books in started:
            await swarm.stop()
            await server.stop()
            if books is not None:
                await books.stop()
        await net.close()
