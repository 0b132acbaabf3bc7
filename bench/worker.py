"""Worker benchmark: runInference on a 784-1024-1024-10 MLP beside direct InferenceSession.run.

Batch-1 requests with 1 and 64 in flight, dynamic batching off and on. The
baselines (direct session.run at batch 1 and batch 32, same session options)
are measured in the same run; the figures that matter are the overhead per
request and the fraction of the direct ceiling reached.

    python bench/worker.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from bench.models import mlp_model  # noqa: E402
from swarmd.worker.config import WorkerConfig  # noqa: E402
from swarmd.worker.engine import InferenceEngine  # noqa: E402

SIZES = (784, 1024, 1024, 10)


def direct(blob: bytes, batch: int, seconds: float, intra: int) -> float:
    """Inferences per second of a bare session.run loop."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, SIZES[0])).astype(np.float32)
    for _ in range(20):
        sess.run(None, {"input": x})
    n, t0 = 0, time.perf_counter()
    while (el := time.perf_counter() - t0) < seconds:
        for _ in range(20):
            sess.run(None, {"input": x})
        n += 20
    return n * batch / el


async def drive(call, in_flight: int, seconds: float) -> tuple[float, float]:
    """`in_flight` loops each awaiting call() back to back; returns (req/s, p50 ms)."""
    lat: list[float] = []
    stop = time.perf_counter() + seconds

    async def loop() -> None:
        while time.perf_counter() < stop:
            t = time.perf_counter()
            await call()
            lat.append(time.perf_counter() - t)

    for _ in range(20):
        await call()
    t0 = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(in_flight)))
    el = time.perf_counter() - t0
    return len(lat) / el, statistics.median(lat) * 1000


async def engine_case(blob: bytes, batching: bool, in_flight: int, seconds: float, cfg: dict) -> tuple[float, float, float]:
    engine = InferenceEngine(WorkerConfig(batching=batching, **cfg))
    await engine.load("mlp", "1", blob)
    engine.set_online()
    x = np.random.default_rng(1).standard_normal((1, SIZES[0])).astype(np.float32)

    async def call() -> None:
        await engine.infer("mlp", {"input": x})

    try:
        rate, p50 = await drive(call, in_flight, seconds)
        return rate, p50, engine.snapshot().mean_batch
    finally:
        await engine.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="shorter runs")
    ap.add_argument("--seconds", type=float, default=None)
    args = ap.parse_args()
    from loguru import logger

    logger.remove()  # the table and the JSON line are the output
    secs = args.seconds or (1.0 if args.quick else 3.0)
    blob = mlp_model(SIZES, seed=0)
    cfg = {"intra_op_threads": 1, "inter_op_threads": 1, "max_concurrent_inferences": 2, "max_batch_size": 32,
           "max_queue": 1024}
    base = {
        "direct_b1_1thread": direct(blob, 1, secs, 1),
        "direct_b1_2threads": direct(blob, 1, secs, 2),
        "direct_b32_1thread": direct(blob, 32, secs, 1),
    }
    ceiling = max(base["direct_b1_1thread"], base["direct_b1_2threads"])
    rows = []
    for batching in (False, True):
        for in_flight in (1, 64):
            rate, p50, mean_batch = asyncio.run(engine_case(blob, batching, in_flight, secs, cfg))
            rows.append({"path": "in-process", "batching": batching, "in_flight": in_flight, "req_s": round(rate),
                         "p50_ms": round(p50, 3), "mean_batch": round(mean_batch, 2),
                         "overhead_us": round(1e6 / rate - 1e6 / ceiling, 1) if in_flight == 1 else None,
                         "of_ceiling": round(rate / ceiling, 3)})
    print(f"{'baseline':<22}{'inf/s':>10}")
    for k, v in base.items():
        print(f"{k:<22}{v:>10.0f}")
    print()
    print(f"{'path':<12}{'batching':>9}{'in_flight':>10}{'req/s':>9}{'p50 ms':>9}{'batch':>7}{'ovh us':>8}{'of ceil':>9}")
    for r in rows:
        ovh = "" if r["overhead_us"] is None else f"{r['overhead_us']:.0f}"
        print(f"{r['path']:<12}{'on' if r['batching'] else 'off':>9}{r['in_flight']:>10}{r['req_s']:>9}"
              f"{r['p50_ms']:>9.3f}{r['mean_batch']:>7.2f}{ovh:>8}{r['of_ceiling']:>9.2f}")
    print(json.dumps({"bench": "worker", "config": cfg, "baseline": {k: round(v) for k, v in base.items()},
                      "ceiling_inf_s": round(ceiling), "results": rows}))


if __name__ == "__main__":
    main()
