"""Worker benchmark: runInference on a 784-1024-1024-10 MLP beside direct InferenceSession.run.

Batch-1 requests with 1 and 64 in flight, dynamic batching off and on. The
baselines (direct session.run at batch 1 and batch 32, same session options)
are measured in the same run; the figures that matter are the overhead per
request and the fraction of the direct ceiling reached.

    python bench/worker.py [--quick]

The RPC cases run the worker in a child process (`--serve`: a WorkerRole
behind an RpcServer on 127.0.0.1) and drive it from this one over one Noise
connection, so client and server do not share a GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from bench.models import mlp_model  # noqa: E402
from swarmd.worker.config import WorkerConfig  # noqa: E402
from swarmd.worker.engine import InferenceEngine  # noqa: E402

SIZES = (784, 1024, 1024, 10)


def direct(blob: bytes, batch: int, seconds: float, intra: int) -> tuple[float, float]:
    """(inferences per second, p50 ms per call) of a bare session.run loop."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, SIZES[0])).astype(np.float32)
    for _ in range(20):
        sess.run(None, {"input": x})
    lat: list[float] = []
    t0 = time.perf_counter()
    while (el := time.perf_counter() - t0) < seconds:
        t = time.perf_counter()
        sess.run(None, {"input": x})
        lat.append(time.perf_counter() - t)
    return len(lat) * batch / el, statistics.median(lat) * 1000


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


def hop(blob: bytes, seconds: float, intra: int) -> float:
    """Batch-1 session.run through run_in_executor, one at a time: the cost of the thread handoff alone."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, SIZES[0])).astype(np.float32)

    async def go() -> float:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1) as ex:
            n, t0 = 0, time.perf_counter()
            while (el := time.perf_counter() - t0) < seconds:
                await loop.run_in_executor(ex, sess.run, None, {"input": x})
                n += 1
        return n / el

    return asyncio.run(go())


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


async def serve(model_path: str, batching: bool, cfg: dict) -> None:
    """Child process: a worker role behind a real RpcServer; prints 'PORT PUBKEYHEX', serves until stdin closes."""
    from swarmd.node.identity import Identity
    from swarmd.node.supervisor import Supervisor
    from swarmd.roles.base import NodeContext
    from swarmd.roles.worker import WorkerRole
    from swarmd.rpc import Methods, RpcServer
    from swarmd.settings import Settings

    ident = Identity.generate()
    methods = Methods()
    with tempfile.TemporaryDirectory() as data_dir:
        ctx = NodeContext(identity=ident, settings=Settings(worker=WorkerConfig(models=[f"mlp={model_path}"],
                          batching=batching, **cfg)), data_dir=__import__("pathlib").Path(data_dir),
                          instance_id="bench", roles=("worker",), tasks=Supervisor(), methods=methods)
        role = WorkerRole(ctx)
        await role.start()
        server = RpcServer(ident, methods)
        await server.start()
        print(server.port, ident.public_hex, flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)
        await role.stop()
        await server.stop()
        await ctx.tasks.close()


async def rpc_case(port: int, pubkey: bytes, in_flight: int, seconds: float) -> tuple[float, float]:
    from swarmd.rpc import connect

    peer = await connect(None, "127.0.0.1", port, remote_public_key=pubkey)
    x = np.random.default_rng(1).standard_normal((1, SIZES[0])).astype(np.float32)

    async def call() -> None:
        await peer.call("runInference", {"model": "mlp", "inputs": {"input": x}}, timeout=30)

    try:
        return await drive(call, in_flight, seconds)
    finally:
        await peer.close()


def rpc_cases(blob: bytes, secs: float, cfg: dict) -> list[tuple[bool, int, float, float]]:
    out = []
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "mlp.onnx")
        with open(path, "wb") as f:
            f.write(blob)
        for batching in (False, True):
            child = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--serve", path, "--batching", str(int(batching))],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )
            try:
                port_s, key_hex = child.stdout.readline().split()
                for in_flight in (1, 64):
                    rate, p50 = asyncio.run(rpc_case(int(port_s), bytes.fromhex(key_hex), in_flight, secs))
                    out.append((batching, in_flight, rate, p50))
            finally:
                child.stdin.close()
                try:
                    child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
    return out


CFG = {"intra_op_threads": 1, "inter_op_threads": 1, "max_concurrent_inferences": 2, "max_batch_size": 32,
       "max_queue": 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="shorter runs")
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--serve", metavar="MODEL_PATH", help=argparse.SUPPRESS)
    ap.add_argument("--batching", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    from loguru import logger

    logger.remove()  # the table and the JSON line are the output
    if args.serve:
        asyncio.run(serve(args.serve, bool(args.batching), CFG))
        return
    secs = args.seconds or (1.0 if args.quick else 3.0)
    blob = mlp_model(SIZES, seed=0)
    cfg = CFG
    (b1, b1_p50), (b1t2, _), (b32, _) = (direct(blob, 1, secs, 1), direct(blob, 1, secs, 2), direct(blob, 32, secs, 1))
    base = {
        "direct_b1_1thread": b1,
        "direct_b1_2threads": b1t2,
        "direct_b32_1thread": b32,
        "executor_hop_b1": hop(blob, secs, 1),
    }
    ceiling = max(b1, b1t2)
    rows = []
    for batching in (False, True):
        for in_flight in (1, 64):
            rate, p50, mean_batch = asyncio.run(engine_case(blob, batching, in_flight, secs, cfg))
            rows.append({"path": "in-process", "batching": batching, "in_flight": in_flight, "req_s": round(rate),
                         "p50_ms": round(p50, 3), "mean_batch": round(mean_batch, 2),
                         "overhead_us": round((p50 - b1_p50) * 1000, 1) if in_flight == 1 else None,
                         "of_ceiling": round(rate / ceiling, 3)})
    try:
        import swarmd.rpc.server  # noqa: F401
        have_rpc = True
    except ImportError:
        have_rpc = False
    if have_rpc:
        for batching, in_flight, rate, p50 in rpc_cases(blob, secs, cfg):
            rows.append({"path": "rpc", "batching": batching, "in_flight": in_flight, "req_s": round(rate),
                         "p50_ms": round(p50, 3), "mean_batch": None,
                         "overhead_us": round((p50 - b1_p50) * 1000, 1) if in_flight == 1 else None,
                         "of_ceiling": round(rate / ceiling, 3)})
    print(f"{'baseline':<22}{'inf/s':>10}")
    for k, v in base.items():
        print(f"{k:<22}{v:>10.0f}")
    print(f"{'direct_b1 p50 ms':<22}{b1_p50:>10.3f}")
    print("ovh us = p50 latency at 1 in flight minus direct batch-1 p50; of ceil = req/s / best direct batch-1 inf/s")
    print()
    print(f"{'path':<12}{'batching':>9}{'in_flight':>10}{'req/s':>9}{'p50 ms':>9}{'batch':>7}{'ovh us':>8}{'of ceil':>9}")
    for r in rows:
        ovh = "" if r["overhead_us"] is None else f"{r['overhead_us']:.0f}"
        mb = "" if r["mean_batch"] is None else f"{r['mean_batch']:.2f}"
        print(f"{r['path']:<12}{'on' if r['batching'] else 'off':>9}{r['in_flight']:>10}{r['req_s']:>9}"
              f"{r['p50_ms']:>9.3f}{mb:>7}{ovh:>8}{r['of_ceiling']:>9.2f}")
    print(json.dumps({"bench": "worker", "config": cfg, "baseline": {**{k: round(v) for k, v in base.items()}, "direct_b1_p50_ms": round(b1_p50, 3)},
                      "ceiling_inf_s": round(ceiling), "results": rows}))


if __name__ == "__main__":
    main()
