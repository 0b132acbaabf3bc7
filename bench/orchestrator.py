"""Per-request routing overhead: calling a worker directly vs. through the orchestrator's choice.

Four ways to get one inference answered, all in the same run against the same
`swarmd --role worker` daemons serving a 4-16-3 MLP in onnxruntime (tiny, so the
figures are routing, not compute):

  direct        client -> worker runInference (the baseline)
  embedded      client-side Fleet/Router (the decision core in-process) -> worker
  lookup+call   findAvailableWorker on the orchestrator, then client -> worker (two round trips)
  via-orch      routeInferenceRequest: client -> orchestrator -> worker (one extra hop)

Each runs sequentially (latency) and with 32 calls in flight (throughput), the\npaths interleaved in rounds so a busy shared machine skews them alike.
Workers and the orchestrator are real daemons in their own processes, so no two
hops share an event loop.
Prints a table, then one JSON line with every figure and the direct baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.models import mlp_model  # noqa: E402
from swarmd.errors import SwarmdError  # noqa: E402
from swarmd.node.identity import Identity  # noqa: E402
from swarmd.orchestrator.config import OrchestratorConfig  # noqa: E402
from swarmd.orchestrator.discovery import WorkerAd  # noqa: E402
from swarmd.orchestrator.fleet import Fleet  # noqa: E402
from swarmd.rpc import connect  # noqa: E402

N_WORKERS = 2
SEQ_CALLS = 2000
PAR_CALLS = 6000
ROUNDS = 5
IN_FLIGHT = 32
T = 30.0


# -- the processes the benchmark talks to: real daemons ------------------------------


def _drain(stream: Any) -> None:
    """Keep reading a daemon's log so a full pipe never blocks it."""
    for _ in stream:
        pass


def spawn(role: str, data_dir: Path, **env: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """`swarmd --role ROLE` as a child; returns it and its "ready" log line."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "swarmd",
            "--role",
            role,
            "--data-dir",
            str(data_dir),
            "--log-format",
            "json",
            "--log-level",
            "INFO",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=str(ROOT),
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("SWARMD_")},
            "PYTHONPATH": str(ROOT),
            "SWARMD_TRUST_OPEN": "true",  # a benchmark lab: every key admitted
            **env,
        },
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if doc.get("event") == "ready":
            threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
            return proc, doc
    raise SystemExit(f"swarmd --role {role} exited ({proc.wait()}) before it was ready")


# -- measuring ------------------------------------------------------------------

FLEET_SIZES = (2, 10, 100)


def decision_cost(balancer: Any, n: int) -> float:
    """µs per request of the decision core alone: choose, begin, success."""
    t0 = time.perf_counter()
    for _ in range(n):
        lease = balancer.choose("mlp")
        balancer.succeeded(lease.public_key, balancer.begin(lease.public_key))
    return (time.perf_counter() - t0) / n * 1e6


def policy_costs() -> dict[str, dict[str, float]]:
    from swarmd.orchestrator.balancer import Balancer
    from swarmd.orchestrator.policies import POLICIES

    out: dict[str, dict[str, float]] = {}
    for name in POLICIES:
        out[name] = {}
        for size in FLEET_SIZES:
            b = Balancer(OrchestratorConfig(policy=name, seed=1))  # type: ignore[arg-type]
            for i in range(size):
                b.admit(WorkerAd(f"{i:064x}", ["mlp"], addresses=[("127.0.0.1", 1)]), source="rpc", ttl=3600)
            out[name][str(size)] = round(decision_cost(b, 20_000), 2)
    return out


async def measure(paths: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Interleave the paths in short blocks so drift on a shared machine hits them all alike."""
    x = np.ones((1, 4), dtype=np.float32)  # [batch, 4] for the 4-16-3 MLP
    for call in paths.values():
        for _ in range(100):  # warm up connections and caches
            await call(x)
    lat: dict[str, list[float]] = {name: [] for name in paths}
    busy: dict[str, float] = dict.fromkeys(paths, 0.0)
    for _ in range(ROUNDS):
        for name, call in paths.items():
            for _ in range(SEQ_CALLS // ROUNDS):
                t0 = time.perf_counter()
                await call(x)
                lat[name].append((time.perf_counter() - t0) * 1e6)
        for name, call in paths.items():
            remaining = PAR_CALLS // ROUNDS

            async def lane(call: Any = call) -> None:
                nonlocal remaining
                while remaining > 0:
                    remaining -= 1
                    await call(x)

            t0 = time.perf_counter()
            await asyncio.gather(*(lane() for _ in range(IN_FLIGHT)))
            busy[name] += time.perf_counter() - t0
    out = {}
    for name, samples in lat.items():
        samples.sort()
        out[name] = {
            "p50_us": round(statistics.median(samples), 1),
            "p99_us": round(samples[int(len(samples) * 0.99) - 1], 1),
            "mean_us": round(statistics.fmean(samples), 1),
            "rps_32": round((PAR_CALLS // ROUNDS) * ROUNDS / busy[name], 0),
        }
    return out


async def main() -> None:
    from loguru import logger

    logger.remove()
    procs = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-orch-"))
    try:
        model = tmp / "mlp.onnx"
        model.write_bytes(mlp_model((4, 16, 3), seed=1))
        workers = []
        for i in range(N_WORKERS):
            p, ready = spawn("worker", tmp / f"w{i}", SWARMD_WORKER_MODELS=f"mlp={model}")
            procs.append(p)
            workers.append({"public_key": ready["public_key"], "port": ready["ports"]["rpc"], "dir": tmp / f"w{i}"})
        p, ready = spawn("orchestrator", tmp / "orch")
        procs.append(p)
        orch_info = {"public_key": ready["public_key"], "port": ready["ports"]["rpc"]}
        me = Identity.generate()
        orch = await connect(
            me, "127.0.0.1", orch_info["port"], remote_public_key=bytes.fromhex(orch_info["public_key"])
        )
        for w in workers:
            # registerWorker acts only on the caller's own key (issue 14): each worker registers itself,
            # over a connection made with its own identity, read from its data dir as the daemon does
            own = Identity.load(w["dir"] / "identity.key")
            as_worker = await connect(
                own, "127.0.0.1", orch_info["port"], remote_public_key=bytes.fromhex(orch_info["public_key"])
            )
            await as_worker.call(
                "registerWorker",
                {
                    "public_key": w["public_key"],
                    "models": ["mlp"],
                    "host": "127.0.0.1",
                    "port": w["port"],
                    "ttl": 3600,
                },
                timeout=T,
            )
            await as_worker.close()
        peers = {
            w["public_key"]: await connect(
                me, "127.0.0.1", w["port"], remote_public_key=bytes.fromhex(w["public_key"])
            )
            for w in workers
        }
        keys = list(peers)
        turn = 0

        def params(x: np.ndarray) -> dict[str, Any]:
            return {"model": "mlp", "inputs": {"input": x}}

        async def direct(x: np.ndarray) -> Any:  # round-robin by hand: no decision logic at all
            nonlocal turn
            turn += 1
            return await peers[keys[turn % len(keys)]].call("runInference", params(x), timeout=T)

        fleet = Fleet(OrchestratorConfig(seed=1), me, health_checks=False)  # what a gateway would embed
        for w in workers:
            ad = WorkerAd(w["public_key"], ["mlp"], addresses=[("127.0.0.1", w["port"])])
            fleet.balancer.admit(ad, source="rpc", ttl=3600)

        async def embedded(x: np.ndarray) -> Any:
            result, _ = await fleet.route("runInference", params(x), model="mlp", budget=T)
            return result

        async def lookup_call(x: np.ndarray) -> Any:
            found = await orch.call("findAvailableWorker", {"model": "mlp"}, timeout=T)
            return await peers[found["public_key"]].call("runInference", params(x), timeout=T)

        async def via_orch(x: np.ndarray) -> Any:
            return await orch.call("routeInferenceRequest", params(x), timeout=T)

        decision_us = decision_cost(fleet.balancer, 100_000)
        per_policy = policy_costs()

        try:
            results = await measure(
                {"direct": direct, "embedded": embedded, "lookup+call": lookup_call, "via-orch": via_orch}
            )
        except SwarmdError as e:
            raise SystemExit(f"a path failed: {e}") from None
        base = results["direct"]
        print(
            f"orchestrator routing overhead: {N_WORKERS} `swarmd --role worker` daemons (4-16-3 MLP, onnxruntime),"
        )
        print("one `swarmd --role orchestrator` daemon, policy p2c, loopback TCP+Noise")
        print(f"decision core alone (choose + begin + success): {decision_us:.2f} us/request")
        print("decision cost by policy and fleet size (us/request):")
        print(f"{'policy':<19}" + "".join(f"{n:>9} w" for n in FLEET_SIZES))
        for name, costs in per_policy.items():
            print(f"{name:<19}" + "".join(f"{costs[str(n)]:>11.2f}" for n in FLEET_SIZES))
        print(f"{'path':<13}{'p50 us':>10}{'p99 us':>10}{'+p50 us':>10}{'req/s@32':>11}{'vs direct':>11}")
        for name, r in results.items():
            print(
                f"{name:<13}{r['p50_us']:>10.1f}{r['p99_us']:>10.1f}{r['p50_us'] - base['p50_us']:>10.1f}"
                f"{r['rps_32']:>11.0f}{r['rps_32'] / base['rps_32']:>10.2f}x"
            )
        default = min(("embedded", "via-orch", "lookup+call"), key=lambda k: results[k]["p50_us"])
        print(f"fastest routed path: {default}")
        for p in peers.values():
            await p.close()
        await orch.close()
        await fleet.stop()
        print(
            json.dumps(
                {
                    "bench": "orchestrator",
                    "decision_us": round(decision_us, 3),
                    "decision_us_by_policy": per_policy,
                    "paths": results,
                    "overhead_p50_us": {
                        k: round(v["p50_us"] - base["p50_us"], 1) for k, v in results.items()
                    },
                    "fastest_routed_path": default,
                    "baseline": {"direct": base},
                }
            )
        )
    finally:
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    asyncio.run(main())
