"""An orchestrator's ejection is visible to `swarmd status` and `swarmd topic lookup`, and the
routers of fresh clients skip the ejected worker (issue 17): a worker killed with SIGKILL
whose record outlives it (here a 60 s live record) is ejected by the orchestrator's health
checks, the orchestrator publishes the verdict on its own record, and every Router that
looks the workers up (gateway, orchestrator, swarmd_rpc, CLI) tries that worker only when
nobody else is left."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from swarmd.orchestrator.discovery import ejection_verdicts
from swarmd.topics import ORCHESTRATORS
from swarmd_rpc import Client
from tests.conftest import rpc_call, swarmd_env
from tests.swarm_daemons import (
    lookup_json,
    poll_until,
    serve_mlp,
    start_hub,
    start_node,
    start_worker,
    status_json,
)

LIVENESS_S = 15.0  # the bound: records reflect liveness (ejections included) within 15 s


def _routable(ready: dict) -> int:
    return asyncio.run(rpc_call(None, ready, "getServiceStatus", {}))["counts"]["routable"]


def _published(boot: str) -> dict[str, list[str]]:
    async def go() -> dict[str, list[str]]:
        async with Client(bootstrap=[boot]) as c:
            return ejection_verdicts(await c.lookup(ORCHESTRATORS))
    return asyncio.run(go())


def test_ejection_is_shown_by_status_and_lookup_and_fresh_clients_skip_the_worker(tmp_path, daemons):
    hub_dir = tmp_path / "hub"
    _, boot = start_hub(daemons, hub_dir, "bootstrap,store")
    _, oready = start_node(daemons, "orchestrator", tmp_path / "o", boot)
    orch = oready["public_key"][:16]
    models = serve_mlp(tmp_path)
    env = swarmd_env(SWARMD_SWARM_LIVE_RECORD_TTL="60")  # the dead worker's record outlives it
    (victim, vready), (_, aready) = (start_worker(daemons, tmp_path / f"w{i}", boot, models=models, env=env)
                                     for i in range(2))
    dead, alive = vready["public_key"], aready["public_key"]
    poll_until(lambda: _routable(oready) == 2, "the orchestrator routes to both workers", 60)
    assert _published(boot).get(dead[:16]) is None

    victim.kill()  # SIGKILL: its record stays on the DHT, saying ONLINE
    killed = time.monotonic()
    poll_until(lambda: orch in _published(boot).get(dead[:16], []), "the orchestrator published the ejection",
               LIVENESS_S, since=killed)
    print(f"ejection published {time.monotonic() - killed:.1f}s after the kill")

    st = {w["public_key"]: w for w in status_json(hub_dir)["workers"]}
    assert st[dead]["ejected_by"] == [orch] and st[alive]["ejected_by"] == []
    found = {r["public_key"]: r for r in lookup_json(boot)}
    assert found[dead]["ejected_by"] == [orch] and found[alive]["ejected_by"] == []
    assert found[dead]["last_seen_s"] >= found[alive]["last_seen_s"]

    x = np.ones((2, 16), np.float32)

    async def fresh_call() -> None:
        async with Client(bootstrap=[boot]) as c:
            res = await c.infer_detailed("mlp", {"input": x}, timeout=60)
            b = c.fleet.balancer
            assert dead in b.registry  # its record was in play ...
            assert dead in b.suspects  # ... known dead ...
            assert b.stats.peek(dead) is None  # ... and never dialled
            assert res.worker == alive

    for _ in range(3):
        asyncio.run(fresh_call())
