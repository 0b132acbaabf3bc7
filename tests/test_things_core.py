"""The thing template without a network: hooks, persistence, replay, queries, errors."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from swarmd.errors import (
    ERR_BAD_REQUEST,
    ERR_CONFLICT,
    ERR_INTERNAL,
    ERR_NOT_FOUND,
    ERR_TOO_LARGE,
    ERR_UNKNOWN_METHOD,
    SwarmdError,
)
from swarmd.services.things import Thing, ThingsConfig, ThingService, bad_request

CFG = ThingsConfig(snapshot_interval_s=0)


class Recording(ThingService):
    """Records every hook call, in order, so tests can check the documented order."""

    TYPE = "gadget"
    UNIQUE_KEYS = ("info.serial",)

    def __init__(self, *a: Any, refuse: str | None = None, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.calls: list[tuple[str, Any]] = []
        self.refuse = refuse

    def _note(self, name: str, *args: Any) -> None:
        self.calls.append((name, *args))
        if self.refuse == name:
            raise bad_request(f"{name} refused")

    def setup(self) -> None:
        self._note("setup")

    async def teardown(self) -> None:
        self._note("teardown")

    def make_thing_id(self, params: Any) -> str:
        self._note("make_thing_id")
        return super().make_thing_id(params)

    def thing_type(self, params: Any) -> str:
        self._note("thing_type")
        return super().thing_type(params)

    def thing_tags(self, thing: Thing) -> list[str]:
        self.calls.append(("thing_tags",))
        return [f"t-{thing.type}", "managed"]

    def validate_thing(self, thing: Thing, previous: Thing | None) -> None:
        self._note("validate_thing", previous.rev if previous else None)
        if "title" in thing.info and not isinstance(thing.info["title"], str):
            raise bad_request("info.title must be a string")

    async def setup_thing(self, thing: Thing) -> None:
        self._note("setup_thing", thing.id)

    def teardown_thing(self, thing: Thing) -> None:
        self._note("teardown_thing", thing.id)

    async def on_register(self, thing: Thing) -> None:
        self._note("on_register", thing.id)

    def on_update(self, thing: Thing, previous: Thing) -> None:
        self._note("on_update", thing.rev, previous.rev)

    def on_forget(self, thing: Thing) -> None:
        self._note("on_forget", thing.id)

    def on_list(self, views: list[dict[str, Any]], params: Any) -> list[dict[str, Any]]:
        self._note("on_list", len(views))
        return views

    def select_thing_info(self, thing: Thing) -> dict[str, Any]:
        return {k: v for k, v in thing.info.items() if not k.startswith("_")}

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


async def test_register_hook_order_and_view(tmp_path: Path) -> None:
    async with Recording("g", tmp_path, CFG) as svc:
        svc.calls.clear()
        view = await svc.call("registerThing", {"id": "g1", "tags": ["blue"], "info": {"title": "x", "_secret": 1},
                                                "opts": {"password": "p"}})
        assert svc.names() == ["make_thing_id", "thing_type", "thing_tags", "validate_thing", "setup_thing",
                               "on_register"]
        assert view["id"] == "g1" and view["type"] == "gadget" and view["rev"] == 1
        assert view["tags"] == ["blue", "t-gadget", "managed"]
        assert view["info"] == {"title": "x"}  # select_thing_info hid _secret
        assert "opts" not in view


async def test_update_forget_list_hook_order(tmp_path: Path) -> None:
    async with Recording("g", tmp_path, CFG) as svc:
        await svc.call("registerThing", {"id": "g1", "info": {"title": "a"}})
        svc.calls.clear()
        view = await svc.call("updateThing", {"id": "g1", "info": {"title": "b"}})
        assert view["rev"] == 2
        assert svc.calls == [("thing_tags",), ("thing_tags",), ("validate_thing", 1), ("on_update", 2, 1)]
        svc.calls.clear()
        await svc.call("listThings", {})
        assert svc.names() == ["on_list"]
        svc.calls.clear()
        out = await svc.call("forgetThings", {"ids": ["g1", "nope"]})
        assert out == {"forgotten": ["g1"], "missing": ["nope"]}
        assert svc.names() == ["on_forget", "teardown_thing"]


@pytest.mark.parametrize("hook", ["validate_thing", "setup_thing", "on_register"])
async def test_refusing_register_hook_leaves_nothing(tmp_path: Path, hook: str) -> None:
    async with Recording("g", tmp_path, CFG, refuse=hook) as svc:
        with pytest.raises(SwarmdError) as ei:
            await svc.call("registerThing", {"id": "g1"})
        assert ei.value.code == ERR_BAD_REQUEST
        assert svc.things == {}
        assert svc._store is not None and svc._store.count() == 0
        # setup ran before a refusing on_register: teardown undoes it (and only then)
        assert (("teardown_thing", "g1") in svc.calls) == (hook == "on_register")


async def test_refusing_update_and_forget_change_nothing(tmp_path: Path) -> None:
    async with Recording("g", tmp_path, CFG) as svc:
        await svc.call("registerThing", {"id": "g1", "info": {"title": "a"}})
        svc.refuse = "on_update"
        with pytest.raises(SwarmdError):
            await svc.call("updateThing", {"id": "g1", "info": {"title": "b"}})
        assert svc.things["g1"].info == {"title": "a"} and svc.things["g1"].rev == 1
        svc.refuse = "on_forget"
        with pytest.raises(SwarmdError):
            await svc.call("forgetThings", {"all": True})
        assert list(svc.things) == ["g1"]


async def test_replay_after_restart_real_sqlite(tmp_path: Path) -> None:
    async with Recording("g", tmp_path, CFG) as svc:
        for i in range(5):
            await svc.call("registerThing", {"id": f"g{i}", "info": {"n": i}, "opts": {"k": i}})
        await svc.call("updateThing", {"id": "g2", "info": {"n": 20}})
        await svc.call("forgetThings", {"ids": ["g4"]})
    db = tmp_path / "things" / "g" / "things.sqlite"
    assert db.exists()
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()

    svc2 = Recording("g", tmp_path, CFG)
    await svc2.start()
    try:
        assert sorted(svc2.things) == ["g0", "g1", "g2", "g3"]
        assert svc2.things["g2"].info == {"n": 20} and svc2.things["g2"].rev == 2
        assert svc2.things["g1"].opts == {"k": 1}
        assert [c for c in svc2.calls if c[0] == "setup_thing"] == [("setup_thing", f"g{i}") for i in range(4)]
        # in-memory entries with no stored row are dropped on replay
        svc2.things["ghost"] = Thing(id="ghost", type="gadget")
        svc2.things["g0"].last = {"online": True}
        await svc2.replay()
        assert "ghost" not in svc2.things
        assert ("teardown_thing", "ghost") in svc2.calls
        assert svc2.things["g0"].last == {"online": True}  # runtime state of known ids kept
    finally:
        await svc2.stop()


async def test_failed_setup_on_replay_keeps_thing_offline(tmp_path: Path) -> None:
    async with Recording("g", tmp_path, CFG) as svc:
        await svc.call("registerThing", {"id": "g1"})
    svc2 = Recording("g", tmp_path, CFG, refuse="setup_thing")
    async with svc2:
        assert svc2.things["g1"].last["online"] is False
        assert svc2.things["g1"].last["err"]["code"] == ERR_BAD_REQUEST


BAD_CALLS = [
    ("registerThing", "nope", ERR_BAD_REQUEST),
    ("registerThing", {"id": ""}, ERR_BAD_REQUEST),
    ("registerThing", {"id": "a b"}, ERR_BAD_REQUEST),
    ("registerThing", {"id": 5}, ERR_BAD_REQUEST),
    ("registerThing", {"tags": "x"}, ERR_BAD_REQUEST),
    ("registerThing", {"tags": ["has space"]}, ERR_BAD_REQUEST),
    ("registerThing", {"info": []}, ERR_BAD_REQUEST),
    ("registerThing", {"info": {"b": b"\x00"}}, ERR_BAD_REQUEST),
    ("registerThing", {"info": {"x": float("nan")}}, ERR_BAD_REQUEST),
    ("registerThing", {"info": {"title": 3}}, ERR_BAD_REQUEST),  # validate_thing
    ("registerThing", {"info": {"big": "x" * 70000}}, ERR_TOO_LARGE),
    ("registerThing", {"colour": "red"}, ERR_BAD_REQUEST),
    ("registerThing", {"id": "dup"}, ERR_CONFLICT),
    ("registerThing", {"info": {"serial": "S1"}}, ERR_CONFLICT),  # UNIQUE_KEYS
    ("updateThing", {"id": "missing"}, ERR_NOT_FOUND),
    ("updateThing", {}, ERR_BAD_REQUEST),
    ("updateThing", {"id": "dup", "rev": 7}, ERR_CONFLICT),
    ("updateThing", {"id": "dup", "rev": "1"}, ERR_BAD_REQUEST),
    ("forgetThings", {}, ERR_BAD_REQUEST),
    ("forgetThings", {"ids": ["a"], "all": True}, ERR_BAD_REQUEST),
    ("forgetThings", {"all": 1}, ERR_BAD_REQUEST),
    ("forgetThings", {"query": {"$where": "1"}}, ERR_BAD_REQUEST),
    ("listThings", {"limit": 5000}, ERR_BAD_REQUEST),
    ("listThings", {"limit": -1}, ERR_BAD_REQUEST),
    ("listThings", {"sort": {"id": 2}}, ERR_BAD_REQUEST),
    ("listThings", {"fields": {"id": 1, "info": 0}}, ERR_BAD_REQUEST),
    ("listThings", {"query": {"info.n": {"$gt": [1]}}}, ERR_BAD_REQUEST),
    ("listThings", {"query": {"info.n": {"$regex": "x"}}}, ERR_BAD_REQUEST),
    ("listThings", {"query": []}, ERR_BAD_REQUEST),
    ("tailLog", {"limit": "3"}, ERR_BAD_REQUEST),
    ("tailLog", {"ids": "x"}, ERR_BAD_REQUEST),
    ("nosuchMethod", {}, ERR_UNKNOWN_METHOD),
]


@pytest.mark.parametrize("method,params,code", BAD_CALLS)
async def test_validation_errors_have_stable_codes(tmp_path: Path, method: str, params: Any, code: str) -> None:
    async with Recording("g", tmp_path, CFG) as svc:
        await svc.call("registerThing", {"id": "dup", "info": {"serial": "S1"}})
        with pytest.raises(SwarmdError) as ei:
            await svc.call(method, params)
        assert ei.value.code == code, ei.value.message
        assert ei.value.message  # says what was wrong
        assert list(svc.things) == ["dup"] and svc.things["dup"].rev == 1


async def test_non_swarmd_hook_error_is_internal(tmp_path: Path) -> None:
    class Broken(ThingService):
        def on_register(self, thing: Thing) -> None:
            raise KeyError("oops")

    async with Broken("b", tmp_path, CFG) as svc:
        with pytest.raises(SwarmdError) as ei:
            await svc.call("registerThing", {})
        assert ei.value.code == ERR_INTERNAL
        assert svc.things == {}


async def test_update_merges_info_and_replaces_tags(tmp_path: Path) -> None:
    async with Recording("g", tmp_path, CFG) as svc:
        await svc.call("registerThing", {"id": "g1", "tags": ["a"], "info": {"x": 1, "y": 2}})
        v = await svc.call("updateThing", {"id": "g1", "rev": 1, "tags": ["b"], "info": {"y": None, "z": 3}})
        assert v["info"] == {"x": 1, "z": 3}
        assert v["tags"] == ["b", "t-gadget", "managed"]
        assert v["rev"] == 2


async def test_list_query_projection_sort_paging(tmp_path: Path) -> None:
    async with ThingService("s", tmp_path, CFG) as svc:
        shelves = [3, 1, 2, 1, None]
        for i, shelf in enumerate(shelves):
            info: dict[str, Any] = {"title": f"Book {i}", "n": i}
            if shelf is not None:
                info["shelf"] = shelf
            await svc.call("registerThing", {"id": f"b{i}", "tags": ["odd" if i % 2 else "even"], "info": info})

        async def ids(params: dict[str, Any]) -> list[str]:
            return [v["id"] for v in await svc.call("listThings", params)]

        assert await ids({"query": {"info.shelf": 1}}) == ["b1", "b3"]
        assert await ids({"query": {"info.n": {"$gte": 2, "$lt": 4}}}) == ["b2", "b3"]
        assert await ids({"query": {"tags": "odd"}}) == ["b1", "b3"]
        assert await ids({"query": {"info.shelf": {"$exists": False}}}) == ["b4"]
        assert await ids({"query": {"info.shelf": {"$in": [2, 3]}}}) == ["b0", "b2"]
        assert await ids({"query": {"$or": [{"info.n": 0}, {"info.title": {"$contains": "book 4"}}]}}) == ["b0", "b4"]
        assert await ids({"query": {"info.shelf": {"$ne": 1}}}) == ["b0", "b2", "b4"]
        assert await ids({"sort": {"info.shelf": 1, "info.n": -1}}) == ["b4", "b3", "b1", "b2", "b0"]
        assert await ids({"sort": {"info.n": -1}, "offset": 1, "limit": 2}) == ["b3", "b2"]
        assert await ids({"limit": 0}) == []
        out = await svc.call("listThings", {"query": {"id": "b2"}, "fields": {"info.title": 1}})
        assert out == [{"id": "b2", "info": {"title": "Book 2"}}]
        out = await svc.call("listThings", {"query": {"id": "b2"}, "fields": ["type"]})
        assert out == [{"id": "b2", "type": "thing"}]
        out = await svc.call("listThings", {"query": {"id": "b2"}, "fields": {"info": 0, "last": 0}})
        assert set(out[0]) == {"id", "type", "tags", "rev", "created", "updated"}


async def test_forget_by_query_and_all(tmp_path: Path) -> None:
    async with ThingService("s", tmp_path, CFG) as svc:
        for i in range(4):
            await svc.call("registerThing", {"id": f"t{i}", "info": {"n": i}})
        out = await svc.call("forgetThings", {"query": {"info.n": {"$lt": 2}}})
        assert sorted(out["forgotten"]) == ["t0", "t1"]
        out = await svc.call("forgetThings", {"all": True})
        assert sorted(out["forgotten"]) == ["t2", "t3"]
    async with ThingService("s", tmp_path, CFG) as svc:
        assert svc.things == {}


async def test_generated_ids_are_unique(tmp_path: Path) -> None:
    async with ThingService("s", tmp_path, CFG) as svc:
        a = await svc.call("registerThing", {})
        b = await svc.call("registerThing", {})
        assert a["id"] != b["id"]


async def test_max_things_bounds_the_registry(tmp_path: Path) -> None:
    async with ThingService("s", tmp_path, ThingsConfig(snapshot_interval_s=0, max_things=2)) as svc:
        await svc.call("registerThing", {})
        await svc.call("registerThing", {})
        with pytest.raises(SwarmdError) as ei:
            await svc.call("registerThing", {})
        assert ei.value.code == ERR_TOO_LARGE and len(svc.things) == 2


def test_things_and_ork_config_sections_are_layered_and_checked() -> None:
    from swarmd.errors import ConfigError
    from swarmd.node.config import load_settings
    from swarmd.settings import Settings

    s = load_settings(Settings, environ={"SWARMD_THINGS_SNAPSHOT_INTERVAL_S": "2.5", "SWARMD_ORK_LEASE_S": "9"})
    assert s.things.snapshot_interval_s == 2.5 and s.ork.lease_s == 9.0
    for env in ({"SWARMD_THINGS_SNAPSHOT_TIMEOUT_S": "0"}, {"SWARMD_THINGS_LIST_DEFAULT_LIMIT": "5000"},
                {"SWARMD_ORK_FANOUT_CONCURRENCY": "0"}):
        with pytest.raises(ConfigError) as ei:
            load_settings(Settings, environ=env)
        assert ("things." in ei.value.message) or ("ork." in ei.value.message)


async def test_start_and_stop_hook_order(tmp_path: Path) -> None:
    async with Recording("g", tmp_path, CFG) as svc:
        await svc.call("registerThing", {"id": "g1"})
        await svc.call("registerThing", {"id": "g2"})
    svc2 = Recording("g", tmp_path, CFG)
    await svc2.start()
    assert svc2.calls == [("setup",), ("setup_thing", "g1"), ("setup_thing", "g2")]
    svc2.calls.clear()
    await svc2.stop()
    await svc2.stop()  # idempotent: nothing is torn down twice
    assert svc2.calls == [("teardown_thing", "g1"), ("teardown_thing", "g2"), ("teardown",)]


async def test_refusing_setup_fails_the_start(tmp_path: Path) -> None:
    svc = Recording("g", tmp_path, CFG, refuse="setup")
    with pytest.raises(SwarmdError) as ei:
        await svc.start()
    assert ei.value.code == ERR_BAD_REQUEST
    assert svc._store is None


async def test_persist_false_keeps_nothing_on_disk(tmp_path: Path) -> None:
    async with ThingService("leases", tmp_path, CFG, persist=False) as svc:
        await svc.call("registerThing", {"id": "w1", "info": {"models": ["mlp"]}})
        assert [v["id"] for v in await svc.call("listThings", {"query": {"info.models": "mlp"}})] == ["w1"]
    assert not (tmp_path / "things" / "leases" / "things.sqlite").exists()
    async with ThingService("leases", tmp_path, CFG, persist=False) as svc:
        assert svc.things == {}
