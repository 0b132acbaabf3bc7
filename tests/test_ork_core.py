"""The ork without sockets: rack registry, persistence, leases, in-process fan-out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from examples.book_worker import Books
from swarmd.errors import ERR_BAD_REQUEST, ERR_CONFLICT, ERR_NOT_FOUND, ERR_UNAVAILABLE, SwarmdError
from swarmd.services.ork import Ork, OrkConfig
from swarmd.services.things import ThingsConfig
from tests.conftest import InProcessRacks

KEY_A = "aa" * 32
KEY_B = "bb" * 32
KEY_DOWN = "cc" * 32
CFG = ThingsConfig(snapshot_interval_s=0)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def test_register_list_forget_racks_persist(tmp_path: Path) -> None:
    local = InProcessRacks()
    async with Ork(tmp_path, local) as ork:
        rack = await ork.call("registerRack", {"id": "r1", "public_key": KEY_A, "addresses": ["127.0.0.1:7000"],
                                               "type": "book", "info": {"room": "east"}})
        assert rack["public_key"] == KEY_A and rack["info"] == {"room": "east"}
        hidden = await ork.call("listRacks", {})
        assert hidden == [{"id": "r1", "type": "book", "addresses": ["127.0.0.1:7000"], "info": {"room": "east"},
                           "source": "manual"}]
        shown = await ork.call("listRacks", {"keys": True})
        assert shown[0]["public_key"] == KEY_A
        with pytest.raises(SwarmdError) as ei:
            await ork.call("registerRack", {"id": "r2", "public_key": KEY_A})
        assert ei.value.code == ERR_CONFLICT  # one key, one rack
        await ork.call("registerRack", {"id": "r2", "public_key": KEY_B})
    async with Ork(tmp_path, local) as ork:  # replayed from SQLite
        assert [r["id"] for r in await ork.call("listRacks", {})] == ["r1", "r2"]
        out = await ork.call("forgetRacks", {"ids": ["r1"]})
        assert out["forgotten"] == ["r1"]
    async with Ork(tmp_path, local) as ork:
        assert [r["id"] for r in await ork.call("listRacks", {})] == ["r2"]


@pytest.mark.parametrize("params", [
    {"id": "r", "public_key": "zz"},
    {"id": "r", "public_key": KEY_A, "addresses": ["nohost"]},
    {"id": "r", "public_key": KEY_A, "addresses": ["h:70000"]},
    {"id": "bad id", "public_key": KEY_A},
    {"public_key": KEY_A},
    {"id": "r", "public_key": KEY_A, "info": "x"},
    {"id": "r", "public_key": KEY_A, "colour": 1},
])
async def test_register_rack_validation(tmp_path: Path, params: dict[str, Any]) -> None:
    async with Ork(tmp_path, InProcessRacks()) as ork:
        with pytest.raises(SwarmdError) as ei:
            await ork.call("registerRack", params)
        assert ei.value.code == ERR_BAD_REQUEST


async def test_discovered_racks_lease_and_shadowing(tmp_path: Path) -> None:
    clock = Clock()
    async with Ork(tmp_path, InProcessRacks(), OrkConfig(lease_s=60), clock=clock) as ork:
        assert ork.observe(KEY_A, ["127.0.0.1:7001"], {"id": "shelf-a", "type": "book"}) is not None
        assert ork.observe("nothex", [], {}) is None  # hostile announcements are ignored
        assert ork.observe(KEY_B, ["no port"], {}) is None
        assert ork.observe(KEY_B, [], [1, 2]) is not None  # odd payload: default id from the key
        racks = await ork.call("listRacks", {"source": "dht"})
        assert sorted(r["id"] for r in racks) == ["bbbbbbbbbbbbbbbb", "shelf-a"]
        clock.t += 50
        ork.observe(KEY_A, ["127.0.0.1:7001"], {"id": "shelf-a"})  # renews A only
        clock.t += 20
        assert [r["id"] for r in await ork.call("listRacks", {})] == ["shelf-a"]
        # a manual registration of the same key shadows the discovered rack
        await ork.call("registerRack", {"id": "manual-a", "public_key": KEY_A})
        assert [r["id"] for r in await ork.call("listRacks", {})] == ["manual-a"]
        clock.t += 1000
        assert [r["id"] for r in await ork.call("listRacks", {})] == ["manual-a"]  # manual racks never expire


async def test_fan_out_with_one_rack_down(tmp_path: Path) -> None:
    local = InProcessRacks()
    async with Books("books", tmp_path / "a", CFG) as a, Books("books", tmp_path / "b", CFG) as b, \
            Ork(tmp_path / "ork", local) as ork:
        local.add(KEY_A, a)
        local.add(KEY_B, b)
        for rid, key in (("ra", KEY_A), ("rb", KEY_B), ("rdown", KEY_DOWN)):
            await ork.call("registerRack", {"id": rid, "public_key": key})
        await a.call("registerThing", {"id": "dune", "info": {"title": "Dune"}})
        await b.call("registerThing", {"id": "emma", "info": {"title": "Emma"}})
        await b.call("registerThing", {"id": "beloved", "info": {"title": "Beloved"}})

        out = await ork.call("listThings", {"sort": {"info.title": 1}})
        by_rack = {r["rack"]: r for r in out["results"]}
        assert by_rack["ra"]["ok"] and by_rack["rb"]["ok"]
        assert by_rack["rdown"] == {"rack": "rdown", "ok": False, "error": by_rack["rdown"]["error"]}
        assert by_rack["rdown"]["error"]["code"] == ERR_UNAVAILABLE
        assert [(t["id"], t["rack"]) for t in out["things"]] == [("beloved", "rb"), ("dune", "ra"), ("emma", "rb")]

        # a write to one chosen rack
        out = await ork.call("registerThing", {"racks": ["ra"], "info": {"title": "Ulysses"}})
        assert [r["rack"] for r in out["results"]] == ["ra"] and out["results"][0]["ok"]
        assert len(a.things) == 2 and len(b.things) == 2
        # a rack's own error comes back as that rack's entry
        out = await ork.call("updateThing", {"racks": ["ra", "rb"], "id": "dune", "info": {"lost": True}})
        codes = {r["rack"]: r.get("error", {}).get("code") for r in out["results"]}
        assert codes == {"ra": None, "rb": ERR_NOT_FOUND}

        await a.collect_snaps()
        await b.collect_snaps()
        out = await ork.call("tailLog", {"limit": 2})
        assert len(out["entries"]) == 2 and {e["rack"] for e in out["entries"]} <= {"ra", "rb"}
        assert out["entries"][0]["ts"] >= out["entries"][1]["ts"]

        with pytest.raises(SwarmdError) as ei:
            await ork.call("listThings", {"racks": ["nope"]})
        assert ei.value.code == ERR_NOT_FOUND


async def test_book_snapshots(tmp_path: Path) -> None:
    async with Books("books", tmp_path, CFG) as books:
        await books.call("registerThing", {"id": "dune", "info": {"title": "Dune", "isbn": "9780441013593"}})
        await books.call("registerThing", {"id": "emma", "info": {"title": "Emma"}})
        await books.call("updateThing", {"id": "emma", "info": {"checked_out_by": "ana"}})
        entries = {e["id"]: e for e in await books.collect_snaps()}
        assert entries["dune"]["snap"]["is_available"] is True
        assert entries["dune"]["snap"]["is_checked_out"] is False
        assert entries["emma"]["snap"]["is_available"] is False
        assert entries["emma"]["snap"]["is_checked_out"] is True
        assert isinstance(entries["emma"]["snap"]["ts"], int)
        for bad, code in (({"info": {}}, ERR_BAD_REQUEST), ({"info": {"title": "X", "isbn": "12"}}, ERR_BAD_REQUEST),
                          ({"info": {"title": "Y", "isbn": "9780441013593"}}, ERR_CONFLICT)):
            with pytest.raises(SwarmdError) as ei:
                await books.call("registerThing", bad)
            assert ei.value.code == code
        v = await books.call("updateThing", {"id": "dune", "info": {"lost": True}})
        assert "lost" in v["tags"]


async def test_discovery_by_lookup_renews_and_expires(tmp_path: Path) -> None:
    from dataclasses import dataclass

    @dataclass
    class Rec:  # the shape of a DHT PeerRecord: key bytes, (host, port) pairs, payload
        public_key: bytes
        addresses: tuple[tuple[str, int], ...]
        payload: dict[str, Any]

    clock = Clock()
    announced = [Rec(bytes.fromhex(KEY_A), (("127.0.0.1", 7001),), {"id": "shelf-a", "type": "book"}),
                 Rec(bytes.fromhex(KEY_B), (("::1", 7002),), {"id": "shelf-b"}),
                 Rec(b"short", (), {})]

    async def lookup() -> list[Rec]:
        return list(announced)

    ork = Ork(tmp_path, InProcessRacks(), OrkConfig(lease_s=60, discover_interval_s=0), clock=clock, lookup=lookup)
    async with ork:
        assert await ork.discover_once() == 2
        racks = {r["id"]: r for r in await ork.call("listRacks", {"keys": True})}
        assert racks["shelf-a"]["addresses"] == ["127.0.0.1:7001"] and racks["shelf-b"]["addresses"] == ["[::1]:7002"]
        assert racks["shelf-a"]["public_key"] == KEY_A
        announced.pop(1)  # shelf-b stops announcing
        clock.t += 40
        await ork.discover_once()
        clock.t += 40
        await ork.discover_once()
        assert [r["id"] for r in await ork.call("listRacks", {})] == ["shelf-a"]
