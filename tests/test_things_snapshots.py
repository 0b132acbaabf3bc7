"""Snapshots: concurrency limit, timeouts record things offline, the log rotates and is pruned."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from swarmd.errors import ERR_INTERNAL, ERR_TIMEOUT
from swarmd.services.snaplog import SnapLog, SnapLogConfig
from swarmd.services.things import Thing, ThingsConfig, ThingService


class Devices(ThingService):
    """Each thing's info.mode says how its snapshot behaves."""

    TYPE = "device"

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.release = asyncio.Event()  # never set: "hang" things wait forever
        self.active = 0
        self.peak = 0
        self.collected = asyncio.Event()

    async def collect_thing_snap(self, thing: Thing) -> dict[str, Any] | None:
        mode = thing.info.get("mode", "ok")
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(0)  # let the other collections start, so the cap is exercised
            if mode == "hang":
                await self.release.wait()
            if mode == "boom":
                raise RuntimeError("device on fire")
            if mode == "bytes":
                return {"raw": b"\x00"}
            return {"temp": 20 + len(thing.id)}
        finally:
            self.active -= 1
            self.collected.set()


async def test_timeout_marks_offline_and_others_online(tmp_path: Path) -> None:
    cfg = ThingsConfig(snapshot_interval_s=0, snapshot_timeout_s=0.2, snapshot_concurrency=2)
    async with Devices("d", tmp_path, cfg) as svc:
        for i in range(6):
            await svc.call("registerThing", {"id": f"ok{i}"})
        await svc.call("registerThing", {"id": "stuck", "info": {"mode": "hang"}})
        await svc.call("registerThing", {"id": "fire", "info": {"mode": "boom"}})
        await svc.call("registerThing", {"id": "raw", "info": {"mode": "bytes"}})
        entries = await svc.collect_snaps()
        assert len(entries) == 9
        assert svc.peak <= 2  # the concurrency limit held
        by_id = {e["id"]: e for e in entries}
        assert by_id["stuck"]["online"] is False and by_id["stuck"]["err"]["code"] == ERR_TIMEOUT
        assert by_id["fire"]["online"] is False and by_id["fire"]["err"]["code"] == ERR_INTERNAL
        assert by_id["raw"]["online"] is False and by_id["raw"]["err"]["code"] == ERR_INTERNAL
        assert by_id["ok3"]["online"] is True and by_id["ok3"]["snap"] == {"temp": 23}
        offline = await svc.call("listThings", {"query": {"last.online": False}, "sort": {"id": 1}})
        assert [v["id"] for v in offline] == ["fire", "raw", "stuck"]
        assert svc.things["stuck"].last["err"]["code"] == ERR_TIMEOUT
        # the log has one line per thing, readable by tailLog
        tail = await svc.call("tailLog", {"id": "stuck"})
        assert len(tail) == 1 and tail[0]["online"] is False
        tail = await svc.call("tailLog", {"limit": 3})
        assert len(tail) == 3


async def test_snapshot_loop_runs_on_its_own_and_stops_cleanly(tmp_path: Path) -> None:
    cfg = ThingsConfig(snapshot_interval_s=0.01)
    svc = Devices("d", tmp_path, cfg)
    await svc.start()
    try:
        await svc.call("registerThing", {"id": "a"})
        for _ in range(3):  # several rounds happen without anyone calling collect_snaps
            svc.collected.clear()
            await asyncio.wait_for(svc.collected.wait(), timeout=30)
        tail = await svc.call("tailLog", {"id": "a"})
        assert len(tail) >= 2 and all(e["online"] for e in tail)
        assert tail[0]["ts"] >= tail[-1]["ts"]  # newest first
    finally:
        assert svc.tasks is not None
        (task,) = svc.tasks._tasks  # the loop runs in the service's own Supervisor scope
        await svc.stop()
    assert task.done() and len(svc.tasks) == 0


async def test_service_without_collect_has_no_loop(tmp_path: Path) -> None:
    async with ThingService("plain", tmp_path, ThingsConfig(snapshot_interval_s=0.01)) as svc:
        assert svc.tasks is None or len(svc.tasks) == 0


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_log_rotates_by_size_and_keeps_count(tmp_path: Path) -> None:
    clock = Clock(time.time())
    log = SnapLog(tmp_path, "snap", SnapLogConfig(max_bytes=1000, keep_files=3, max_age_s=1e9), clock=clock)
    for i in range(100):
        clock.t += 1
        log.append([{"ts": i, "id": "x", "pad": "y" * 50}])
    rotated = log.rotated()
    assert len(rotated) == 3  # older rotated files were deleted
    for p in [*rotated, log.live]:
        assert p.stat().st_size <= 1000
        for line in p.read_text().splitlines():
            json.loads(line)  # every line whole
    names = [p.name for p in rotated]
    assert names == sorted(names) and all(n.startswith("snap-") and n.endswith("Z.jsonl") for n in names)
    # tail reads newest first across files, and stops at the limit
    tail = log.tail(limit=30)
    assert [e["ts"] for e in tail] == list(range(99, 69, -1))
    assert [e["ts"] for e in log.tail(limit=2, offset=5)] == [94, 93]


def test_log_rotation_within_one_microsecond_never_collides(tmp_path: Path) -> None:
    clock = Clock(time.time())
    log = SnapLog(tmp_path, "snap", SnapLogConfig(max_bytes=300, keep_files=50), clock=clock)
    for i in range(40):  # the clock never moves
        log.append([{"ts": i, "pad": "z" * 100}])
    rotated = log.rotated()
    assert len(rotated) >= 10
    assert [e["ts"] for e in log.tail(limit=40)] == list(range(39, -1, -1))


def test_log_prunes_by_age(tmp_path: Path) -> None:
    clock = Clock(time.time())
    log = SnapLog(tmp_path, "snap", SnapLogConfig(max_bytes=300, keep_files=100, max_age_s=3600), clock=clock)
    for i in range(10):
        log.append([{"ts": i, "pad": "z" * 200}])
    old = log.rotated()
    assert old
    for p in old:
        os.utime(p, (clock.t - 7200, clock.t - 7200))
    clock.t += 10
    log.append([{"ts": 99, "pad": "z" * 200}])  # forces a rotation, which prunes
    remaining = log.rotated()
    assert remaining and not set(old) & set(remaining)


def test_log_skips_torn_line(tmp_path: Path) -> None:
    log = SnapLog(tmp_path, "snap", SnapLogConfig())
    log.append([{"ts": 1}, {"ts": 2}])
    with open(log.live, "ab") as f:
        f.write(b'{"ts": 3, "trunc')
    assert [e["ts"] for e in log.tail(limit=10)] == [2, 1]


async def test_tail_log_filters(tmp_path: Path) -> None:
    async with Devices("d", tmp_path, ThingsConfig(snapshot_interval_s=0)) as svc:
        await svc.call("registerThing", {"id": "a"})
        await svc.call("registerThing", {"id": "b"})
        first = await svc.collect_snaps()
        await svc.collect_snaps()
        assert len(await svc.call("tailLog", {})) == 4
        assert len(await svc.call("tailLog", {"ids": ["a"]})) == 2
        assert len(await svc.call("tailLog", {"type": "other"})) == 0
        ts = max(e["ts"] for e in first)
        assert all(e["ts"] <= ts for e in await svc.call("tailLog", {"end": ts}))
        assert await svc.call("tailLog", {"limit": 0}) == []


async def test_update_during_collection_keeps_the_snapshot(tmp_path: Path) -> None:
    class Slow(ThingService):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.entered = asyncio.Event()
            self.go = asyncio.Event()

        async def collect_thing_snap(self, thing: Thing) -> dict[str, Any]:
            self.entered.set()
            await self.go.wait()
            return {"v": thing.rev}

    async with Slow("s", tmp_path, ThingsConfig(snapshot_interval_s=0)) as svc:
        await svc.call("registerThing", {"id": "a"})
        round_ = asyncio.ensure_future(svc.collect_snaps())
        await asyncio.wait_for(svc.entered.wait(), timeout=30)
        await svc.call("updateThing", {"id": "a", "info": {"x": 1}})  # replaces the Thing object
        svc.go.set()
        await asyncio.wait_for(round_, timeout=30)
        assert svc.things["a"].last["snap"] == {"v": 1} and svc.things["a"].rev == 2
