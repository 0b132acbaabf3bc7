"""Worker benchmark: runInference on a 784-1024-1024-10 MLP beside direct InferenceSession.run.

Batch-1 requests with 1 and 64 in flight, dynamic batching off and on (and
on with inline runs for a lone request on an idle worker). The baselines
(direct session.run at batch 1 and 32 with the same session options, a bare
executor handoff, a bare RPC ping) are measured in the same run; the figures
that matter are the overhead per request and the fraction of the direct
ceiling reached.

    python bench/worker.py [--quick] [--seconds S]

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
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from bench.models import mlp_model  # noqa: E402
from swarmd.worker.config import WorkerConfig  # noqa: E402
from swarmd.worker.engine import InferenceEngine  # noqa: E402

SIZES = (784, 1024, 1024, 10)
CFG = {"intra_op_threads": 1, "inter_op_threads": 1, "max_concurrent_inferences": 2, "max_batch_size": 32,
       "max_queue": 1024}
MODES = {
    "off": {"batching": False},
    "on": {"batching": True},
    "on+inline": {"batching": True, "inline_run_us": 2000},
}


def _session(blob: bytes, intra: int):  # noqa: ANN202
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])


def direct(blob: bytes, batch: int, seconds: float, intra: int) -> tuple[float, float]:
    """(inferences per second, p50 ms per call) of a bare session.run loop."""
    sess = _session(blob, intra)
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


def hop(blob: bytes, seconds: float, intra: int) -> float:
    """Batch-1 session.run through run_in_executor, one at a time: the thread handoff alone."""
    sess = _session(blob, intra)
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


async def drive(call, in_flight: int, seconds: float) -> tuple[float, float]:  # noqa: ANN001
    """`in_flight` loops each awaiting call() back to back; returns (req/s, p50 ms)."""
    lat: list[float] = []
    for _ in range(20):
        await call()
    stop = time.perf_counter() + seconds

    async def loop() -> None:
        while time.perf_counter() < stop:
            t = time.perf_counter()
            await call()
            lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(in_flight)))
    return len(lat) / (time.perf_counter() - t0), statistics.median(lat) * 1000


async def engine_case(blob: bytes, mode: str, in_flight: int, seconds: float) -> tuple[float, float, float]:
    engine = InferenceEngine(WorkerConfig(**CFG, **MODES[mode]))
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


async def serve(model_path: str, mode: str) -> None:
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
        settings = Settings(worker=WorkerConfig(models=[f"mlp={model_path}"], **CFG, **MODES[mode]))
        ctx = NodeContext(identity=ident, settings=settings, data_dir=Path(data_dir), instance_id="bench",
                          roles=("worker",), tasks=Supervisor(), methods=methods)
        role = WorkerRole(ctx)
        await role.start()
        server = RpcServer(ident, methods)
        await server.start()
        print(server.port, ident.public_hex, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await role.stop()
        await server.stop()
        await ctx.tasks.close()


async def rpc_case(port: int, pubkey: bytes, in_flight: int, seconds: float, method: str = "runInference") -> tuple[float, float]:
    from swarmd.rpc import connect

    peer = await connect(None, "127.0.0.1", port, remote_public_key=pubkey)
    x = np.random.default_rng(1).standard_normal((1, SIZES[0])).astype(np.float32)
    params = {"model": "mlp", "inputs": {"input": x}} if method == "runInference" else None

    async def call() -> None:
        await peer.call(method, params, timeout=30)

    try:
        return await drive(call, in_flight, seconds)
    finally:
        await peer.close()


def rpc_cases(blob: bytes, secs: float) -> tuple[list[tuple[str, int, float, float]], float]:
    """Every mode x in-flight case over RPC, and the p50 ms of a bare RPC ping to the same child."""
    out = []
    ping_p50 = 0.0
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "mlp.onnx")
        with open(path, "wb") as f:
            f.write(blob)
        for mode in MODES:
            child = subprocess.Popen(
                [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py"), "--serve", path, "--mode", mode],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )
            try:
                port_s, key_hex = child.stdout.readline().split()
                port, key = int(port_s), bytes.fromhex(key_hex)
                if mode == "off":
                    _, ping_p50 = asyncio.run(rpc_case(port, key, 1, secs, "ping"))
                for in_flight in (1, 64):
                    rate, p50 = asyncio.run(rpc_case(port, key, in_flight, secs))
                    out.append((mode, in_flight, rate, p50))
            finally:
                child.stdin.close()
                try:
                    child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
    return out, ping_p50


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="shorter runs")
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--serve", metavar="MODEL_PATH", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="on", choices=list(MODES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    from loguru import logger

    logger.remove()  # the table and the JSON line are the output
    if args.serve:
        asyncio.run(serve(args.serve, args.mode))
        return
    secs = args.seconds or (1.0 if args.quick else 3.0)
    blob = mlp_model(SIZES, seed=0)
    (b1, b1_p50), (b1t2, _), (b32, _) = (direct(blob, 1, secs, 1), direct(blob, 1, secs, 2), direct(blob, 32, secs, 1))
    base: dict[str, float] = {
        "direct_b1_1thread": b1,
        "direct_b1_2threads": b1t2,
        "direct_b32_1thread": b32,
        "executor_hop_b1": hop(blob, secs, 1),
        "direct_b1_p50_ms": b1_p50,
    }
    ceiling = max(b1, b1t2)

    def row(path: str, mode: str, in_flight: int, rate: float, p50: float, mean_batch: float | None) -> dict:
        return {"path": path, "mode": mode, "in_flight": in_flight, "req_s": round(rate), "p50_ms": round(p50, 3),
                "mean_batch": None if mean_batch is None else round(mean_batch, 2),
                "overhead_us": round((p50 - b1_p50) * 1000, 1) if in_flight == 1 else None,
                "of_ceiling": round(rate / ceiling, 3)}

    rows = []
    for mode in MODES:
        for in_flight in (1, 64):
            rate, p50, mean_batch = asyncio.run(engine_case(blob, mode, in_flight, secs))
            rows.append(row("in-process", mode, in_flight, rate, p50, mean_batch))
    try:
        import swarmd.rpc.server  # noqa: F401

        cases, ping_p50 = rpc_cases(blob, secs)
        base["rpc_ping_p50_ms"] = ping_p50
        rows += [row("rpc", mode, n, rate, p50, None) for mode, n, rate, p50 in cases]
    except ImportError:
        pass
    print(f"{'baseline':<22}{'value':>10}")
    for k, v in base.items():
        print(f"{k:<22}{v:>10.3f}" if k.endswith("_ms") else f"{k:<22}{v:>10.0f}")
    print("ovh us = p50 at 1 in flight minus direct batch-1 p50; of ceil = req/s over the best direct batch-1 inf/s")
    print()
    print(f"{'path':<12}{'batching':>11}{'in_flight':>10}{'req/s':>9}{'p50 ms':>9}{'batch':>7}{'ovh us':>8}{'of ceil':>9}")
    for r in rows:
        ovh = "" if r["overhead_us"] is None else f"{r['overhead_us']:.0f}"
        mb = "" if r["mean_batch"] is None else f"{r['mean_batch']:.2f}"
        print(f"{r['path']:<12}{r['mode']:>11}{r['in_flight']:>10}{r['req_s']:>9}"
              f"{r['p50_ms']:>9.3f}{mb:>7}{ovh:>8}{r['of_ceiling']:>9.2f}")
    print(json.dumps({"bench": "worker", "config": CFG, "modes": MODES,
                      "baseline": {k: round(v, 3) if k.endswith("_ms") else round(v) for k, v in base.items()},
                      "ceiling_inf_s": round(ceiling), "results": rows}))


if __name__ == "__main__":
    main()
