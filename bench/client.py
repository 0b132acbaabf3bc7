"""Client library overhead: swarmd_rpc.Client.infer beside a bare runInference call, same run.

    python bench/client.py [--n 400]

A hub (bootstrap + store + orchestrator) and one worker run as real daemons on
127.0.0.1, serving a 4-16-3 MLP (tiny, so the figures are the path, not the
compute). Sequential batch-1 requests, each way measured in this same run:
  direct     RpcPeer.call("runInference") on an open channel to the worker (the baseline)
  for_peer   Client.for_peer(worker).infer: the library's single-peer path
  swarm      Client(bootstrap).infer: the fleet router picks the worker from its DHT records and
             calls it (one hop; the gateway's path minus HTTP)
Prints a table, then one JSON line with the figures and the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from swarmlab import Lab  # noqa: E402

from bench.models import mlp_model  # noqa: E402
from swarmd_rpc import Client, connect, quiet_logs  # noqa: E402


async def timed(n: int, fn) -> list[float]:  # noqa: ANN001 - a coroutine function
    for _ in range(20):  # warm-up: connections, model load, caches
        await fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await fn()
        out.append((time.perf_counter() - t) * 1e6)
    return out


def row(name: str, us: list[float]) -> dict[str, float]:
    us = sorted(us)
    return {"p50_us": round(statistics.median(us), 1), "p99_us": round(us[int(len(us) * 0.99) - 1], 1),
            "req_s": round(len(us) / (sum(us) / 1e6), 1), "name": name}


async def measure(boot: str, n: int) -> dict[str, dict[str, float]]:
    x = {"input": np.random.default_rng(0).standard_normal((1, 4)).astype(np.float32)}
    async with Client(bootstrap=[boot]) as swarm:
        await swarm.infer("mlp", x, timeout=30)  # the worker fetches and loads the model
        res = await swarm.infer_detailed("mlp", x)
        rec = next(r for r in await swarm.lookup("swarmd/workers") if r.public_key.hex() == res.worker)
        host, port = rec.addresses[0]
        peer = await connect(host, port, rec.public_key)
        params = {"model": "mlp", "inputs": x}
        direct = await timed(n, lambda: peer.call("runInference", params, timeout=10))
        await peer.close()
        async with Client.for_peer(rec.public_key, host, port) as one:
            single = await timed(n, lambda: one.infer("mlp", x))
        routed = await timed(n, lambda: swarm.infer("mlp", x))
    return {"direct": row("direct", direct), "for_peer": row("for_peer", single), "swarm": row("swarm", routed)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=400)
    args = ap.parse_args()
    quiet_logs()
    with Lab() as lab:
        model = lab.dir / "mlp.onnx"
        model.write_bytes(mlp_model((4, 16, 3)))
        hub = lab.start("hub", "--role", "bootstrap,store,orchestrator")
        boot = f"127.0.0.1:{hub.ports['dht']}"
        lab.start("worker", "--role", "worker", "--bootstrap", boot)
        lab.cli("model", "push", str(model), "--name", "mlp", "--version", "1", "--data-dir", str(lab.dir / "hub"))
        figures = asyncio.run(measure(boot, args.n))
    base = figures["direct"]
    print(f"\n{'path':10} {'p50 µs':>9} {'p99 µs':>9} {'req/s':>9} {'p50 / direct':>13}")
    for f in figures.values():
        print(f"{f['name']:10} {f['p50_us']:9.1f} {f['p99_us']:9.1f} {f['req_s']:9.1f} "
              f"{f['p50_us'] / base['p50_us']:13.2f}")
    print(json.dumps({"bench": "client", "n": args.n, "figures": {k: v for k, v in figures.items() if k != "direct"},
                      "baseline": {"direct": base}}))


if __name__ == "__main__":
    main()
