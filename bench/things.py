"""Thing service costs beside plain baselines measured in the same run.

- register: registerThing (validation, hooks, one SQLite WAL commit each)
  vs a bare `INSERT` of the same JSON row with its own commit;
- list: listThings with a query, sort and limit over N things vs a Python
  list comprehension + sort over the same dicts;
- snapshot round: collect_snaps over N things (semaphore, timeout, log write)
  vs awaiting the same coroutine N times in a plain loop.

    python bench/things.py
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loguru import logger  # noqa: E402

from swarmd.services.things import Thing, ThingsConfig, ThingService  # noqa: E402

N = 2000


class Bench(ThingService):
    TYPE = "bench"

    async def collect_thing_snap(self, thing: Thing) -> dict[str, Any]:
        return {"n": thing.info["n"], "ok": True}


async def main() -> dict[str, Any]:
    logger.remove()
    out: dict[str, Any] = {"n": N}
    with tempfile.TemporaryDirectory() as d:
        svc = Bench("bench", Path(d), ThingsConfig(snapshot_interval_s=0, list_max_limit=N))
        await svc.start()
        t0 = time.perf_counter()
        for i in range(N):
            await svc.call("registerThing", {"id": f"t{i}", "info": {"n": i, "shelf": i % 7, "title": f"Book {i}"}})
        out["register_per_s"] = N / (time.perf_counter() - t0)

        db = sqlite3.connect(Path(d) / "baseline.sqlite", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("CREATE TABLE t (id TEXT PRIMARY KEY, body TEXT)")
        t0 = time.perf_counter()
        for i in range(N):
            body = json.dumps({"tags": [], "info": {"n": i, "shelf": i % 7, "title": f"Book {i}"}, "opts": {}})
            db.execute("INSERT INTO t VALUES (?, ?)", (f"t{i}", body))
        out["baseline_insert_per_s"] = N / (time.perf_counter() - t0)
        db.close()

        query = {"query": {"info.shelf": 3, "info.n": {"$gte": 100}}, "sort": {"info.n": -1}, "limit": 50}
        reps = 50
        t0 = time.perf_counter()
        for _ in range(reps):
            await svc.call("listThings", query)
        out["list_ms"] = (time.perf_counter() - t0) / reps * 1000
        docs = [svc.view(t) for t in svc.things.values()]
        t0 = time.perf_counter()
        for _ in range(reps):
            sel = [x for x in docs if x["info"]["shelf"] == 3 and x["info"]["n"] >= 100]
            sel.sort(key=lambda x: x["info"]["n"], reverse=True)
            sel = sel[:50]
        out["baseline_list_ms"] = (time.perf_counter() - t0) / reps * 1000

        t0 = time.perf_counter()
        await svc.collect_snaps()
        out["snap_round_ms"] = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        for t in list(svc.things.values()):
            await svc.collect_thing_snap(t)
        out["baseline_snap_loop_ms"] = (time.perf_counter() - t0) * 1000
        await svc.stop()
    return out


if __name__ == "__main__":
    r = asyncio.run(main())
    rows = [
        ("registerThing /s", r["register_per_s"], "bare INSERT+commit /s", r["baseline_insert_per_s"]),
        (f"listThings ms ({N} things)", r["list_ms"], "list comprehension ms", r["baseline_list_ms"]),
        (f"snapshot round ms ({N})", r["snap_round_ms"], "plain await loop ms", r["baseline_snap_loop_ms"]),
    ]
    print(f"{'figure':32} {'value':>10}   {'baseline':28} {'value':>10}")
    for name, v, bname, bv in rows:
        print(f"{name:32} {v:10.1f}   {bname:28} {bv:10.1f}")
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}))
