"""Fresh swarmd_rpc clients across three SIGKILLed workers: the records the dead leave behind
on the DHT cost no failed call while one live worker remains (issue 17)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import onnxruntime as ort

from swarmd.topics import WORKERS
from swarmd_rpc import Client
from tests.conftest import run_cli
from tests.store_models import write_model
from tests.swarm_daemons import start_hub, start_worker


def test_fresh_clients_across_three_worker_kills_fail_no_call(daemons, tmp_path: Path) -> None:
    hub_dir = tmp_path / "hub"
    _, boot = start_hub(daemons, hub_dir, "bootstrap,store")
    workers, ready = zip(*(start_worker(daemons, tmp_path / f"w{i}", boot) for i in range(4)), strict=True)
    keys = [doc["public_key"] for doc in ready]
    model = write_model(tmp_path / "m.onnx", seed=11)
    r = run_cli("model", "push", str(model), "--name", "lin", "--version", "1", "--data-dir", str(hub_dir))
    assert r.returncode == 0, r.stderr
    x = np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)
    want = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    async def all_serving() -> None:
        """Every worker loads the model and announces it, so each kill leaves behind a record
        that says ONLINE and serving "lin": the first choice of a fresh client."""
        for doc in ready:
            async with Client.for_peer(doc["public_key"], "127.0.0.1", doc["ports"]["rpc"]) as one:
                await one.infer("lin", {"x": x}, timeout=60)
        async with Client(bootstrap=[boot]) as c:
            async with asyncio.timeout(60):
                while {r.public_key.hex() for r in await c.lookup(WORKERS)
                       if "lin" in r.payload.get("models", [])} != set(keys):
                    await asyncio.sleep(0.2)

    async def fresh_call(dead: set[str]) -> tuple[str, int]:
        """One inference by a brand-new client; (worker that answered, dead workers whose
        leftover record it held: candidates it had to avoid or survive dialling)."""
        async with Client(bootstrap=[boot]) as c:
            res = await c.infer_detailed("lin", {"x": x}, timeout=60)
            np.testing.assert_allclose(next(iter(res.outputs.values())), want, rtol=1e-5)
            assert c.fleet is not None
            return str(res.worker), sum(1 for k in dead if k in c.fleet.balancer.registry)

    asyncio.run(all_serving())
    dead: set[str] = set()
    failures: list[str] = []
    dead_held = 0
    for victim, key in zip(workers[:3], keys[:3], strict=True):
        victim.kill()  # SIGKILL: no withdrawal, its record stays on the DHT
        dead.add(key)
        for _ in range(3):
            try:
                worker, n = asyncio.run(fresh_call(dead))
            except Exception as e:  # noqa: BLE001 - every failed call is the finding
                failures.append(f"{type(e).__name__}: {e}")
                continue
            assert worker not in dead
            dead_held += n
    assert failures == []
    # the dead workers' leftover records were in play (else "no failure" would prove nothing)
    assert dead_held >= 1
