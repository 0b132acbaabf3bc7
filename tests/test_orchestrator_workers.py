"""The whole path with real processes: `swarmd --role worker` (onnxruntime) and `swarmd --role
orchestrator` found through a `swarmd --role bootstrap` DHT; a client drives load through the
orchestrator, a worker is SIGKILLed mid-load, its lease runs out, it comes back and is re-admitted.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from conftest import Daemon, swarmd_env

from bench.models import mlp_model
from swarmd.rpc import RpcPeer, connect

T = 30.0


def drain(d: Daemon) -> None:
    """Keep reading a daemon's log after it is ready so a full pipe never blocks it."""
    assert d.proc.stdout is not None
    out = d.proc.stdout

    def run() -> None:
        for _ in iter(out.readline, ""):
            pass

    threading.Thread(target=run, daemon=True).start()


class Swarm:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.model = tmp / "mlp.onnx"
        self.model.write_bytes(mlp_model((4, 16, 3), seed=1))
        self.daemons: list[Daemon] = []
        self.boot = ""

    def start(self, role: str, name: str, **env: str) -> tuple[Daemon, dict[str, Any]]:
        args = ["--role", role, "--data-dir", str(self.tmp / name), "--host", "127.0.0.1"]
        if self.boot:
            args += ["--bootstrap", self.boot]
        d = Daemon(*args, env=swarmd_env(**env))
        self.daemons.append(d)
        ready = d.wait_event("ready")
        drain(d)
        return d, ready

    def worker(self, name: str) -> tuple[Daemon, dict[str, Any]]:
        return self.start(
            "worker", name, SWARMD_WORKER_MODELS=f"mlp={self.model}", SWARMD_WORKER_ANNOUNCE_INTERVAL="0.5"
        )

    def close(self) -> None:
        for d in self.daemons:
            d.kill()


@pytest.fixture
def swarm(tmp_path: Path) -> Any:
    s = Swarm(tmp_path)
    yield s
    s.close()


async def eventually(cond: Any, timeout: float = 60.0) -> None:
    async with asyncio.timeout(timeout):
        while not await cond():
            await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_real_workers_killed_and_restarted_under_load(swarm: Swarm) -> None:
    _, boot = swarm.start("bootstrap", "boot")
    swarm.boot = f"127.0.0.1:{boot['ports']['dht']}"
    workers = [swarm.worker(f"w{i}") for i in range(3)]
    _, orch_ready = swarm.start(
        "orchestrator",
        "orch",
        SWARMD_ORCHESTRATOR_DHT_REFRESH="0.3",
        SWARMD_ORCHESTRATOR_DHT_LEASE_TTL="2",
        SWARMD_ORCHESTRATOR_HEALTH_INTERVAL="0.3",
        SWARMD_ORCHESTRATOR_EJECT_AFTER="2",
        SWARMD_ORCHESTRATOR_POLICY="round_robin",  # the victim surely has calls in flight when it dies
    )
    orch: RpcPeer = await connect(
        None,
        "127.0.0.1",
        orch_ready["ports"]["rpc"],
        remote_public_key=bytes.fromhex(orch_ready["public_key"]),
    )
    session = ort.InferenceSession(str(swarm.model), providers=["CPUExecutionProvider"])
    keys = [r["public_key"] for _, r in workers]

    async def status() -> dict[str, Any]:
        return await orch.call("getServiceStatus", {}, timeout=T)

    async def routable_workers() -> set[str]:
        s = await status()
        return {w["public_key"] for w in s["workers"] if w["state"] == "ONLINE" and w["health"]["healthy"]}

    async def infer(i: int) -> str:
        x = np.full((1, 4), i / 100.0, dtype=np.float32)
        out = await orch.call("routeInferenceRequest", {"model": "mlp", "inputs": {"input": x}}, timeout=T)
        np.testing.assert_allclose(out["outputs"]["output"], session.run(None, {"input": x})[0], rtol=1e-5)
        return out["worker"]

    try:

        async def all_three() -> bool:
            return await routable_workers() == set(keys)

        await eventually(all_three)

        # Steady load, 8 in flight; SIGKILL one worker a third of the way in. Nothing may be lost.
        total, lanes = 300, 8
        answered: list[str] = []
        victim, _ = workers[0]
        todo = iter(range(total))

        async def lane() -> None:
            for i in todo:
                answered.append(await infer(i))
                if len(answered) == total // 3:
                    victim.kill()

        await asyncio.gather(*(lane() for _ in range(lanes)))
        assert len(answered) == total
        assert victim.proc.returncode is not None
        stats = await orch.call("getLoadBalancingStats", {}, timeout=T)
        assert stats["workers"][keys[0]]["failures"] >= 1  # the kill did hit routed calls

        # It vanished without withdrawing its DHT record: ejected, then its lease runs out.
        async def forgotten() -> bool:
            return keys[0] not in {w["public_key"] for w in (await status())["workers"]}

        await eventually(forgotten)

        # It comes back (same data dir, same key) and announces again: re-admitted, gets traffic.
        workers[0] = swarm.worker("w0")
        assert workers[0][1]["public_key"] == keys[0]
        await eventually(all_three)
        seen: set[str] = set()

        async def served_by_it() -> bool:
            for i in range(6):
                seen.add(await infer(i))
            return keys[0] in seen

        await eventually(served_by_it)
    finally:
        await orch.close()
