"""Store benchmark: push and pull of a ~50 MB ONNX model over the TCP path, beside a file copy.

    python bench/store.py [--mib 50] [--rounds 3]

The store runs in its own process (a StoreRole on an RpcServer, as a remote
store would); the client here pushes with `swarmd.store.transfer.push_file`
(sha256 on the client, Noise + mux stream, sha256 + fsync + ONNX parse +
atomic rename on the store) and pulls with `pull_file` (verified while sent,
sha256 + fsync on the client). The baseline, measured in the same run, is a
plain copy of the same file to the same disk followed by fsync; a second
baseline is the bare stream of the same stack on the same connection (as many
bytes from memory to a handler that drops them, and back), which bounds what
push and pull can reach. Last line: one JSON object.
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
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build_model(path: Path, mib: int) -> int:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    n = mib * 2**20 // 4
    pad = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    w = np.ones((4, 2), np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("ReduceSum", ["pad"], ["s"], keepdims=0)],
        "bench",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, [])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(pad, "pad")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = model.SerializeToString()
    path.write_bytes(data)
    return len(data)


async def serve(data_dir: Path) -> None:
    """Child process: one store, prints its port and key, runs until stdin closes."""
    from loguru import logger

    logger.remove()
    from swarmd.node.identity import Identity
    from swarmd.node.supervisor import Supervisor
    from swarmd.roles.base import NodeContext
    from swarmd.roles.store import StoreRole
    from swarmd.rpc import Methods, RpcServer
    from swarmd.settings import Settings

    ident = Identity.generate()
    methods = Methods()
    ctx = NodeContext(identity=ident, settings=Settings(), data_dir=data_dir, instance_id="bench",
                      roles=("store",), tasks=Supervisor(), methods=methods)

    async def sink(ctx: object, params: object, stream: Any) -> int:
        """The raw stream, for the same-run reference: receive and drop."""
        n = 0
        recv = stream.recv
        while (buf := await recv()) is not None:
            n += len(buf)
        return n

    async def source(ctx: object, params: Any, stream: Any) -> int:
        """The raw stream the other way: send params['size'] bytes from memory."""
        size = int(params["size"])
        chunk = b"b" * (1 << 20)
        sent = 0
        await asyncio.sleep(0)  # into a task of its own, like the store's handlers
        while sent < size:
            buf = chunk[: min(len(chunk), size - sent)]
            await stream.send(buf)
            sent += len(buf)
        return sent

    async def cpu(ctx: object, params: object) -> float:
        """CPU seconds this process used so far (all threads): less noisy than wall time here."""
        return time.process_time()

    methods.register("benchCpu", cpu, op="r")
    methods.register_stream("benchSink", sink, op="w")
    methods.register_stream("benchSource", source, op="r")
    server = RpcServer(ident, methods)
    await server.start()
    role = StoreRole(ctx)
    await role.start()
    print(json.dumps({"port": server.port, "key": ident.public_hex}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    await server.stop()
    await role.stop()


def copy_baseline(src: Path, dst: Path) -> float:
    t0 = time.perf_counter()
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    dt = time.perf_counter() - t0
    dst.unlink()
    return dt


async def raw_up(peer: Any, size: int) -> float:
    """The same number of bytes over a bare stream (memory to a sink): what the transport allows."""
    chunk = b"b" * (1 << 20)
    t0 = time.perf_counter()
    s = await peer.open_stream("benchSink", {}, timeout=120)
    sent = 0
    while sent < size:
        buf = chunk[: min(len(chunk), size - sent)]
        await s.send(buf)
        sent += len(buf)
    await s.close()
    assert await s.result() == size
    return time.perf_counter() - t0


async def raw_down(peer: Any, size: int) -> float:
    t0 = time.perf_counter()
    s = await peer.open_stream("benchSource", {"size": size}, timeout=120)
    got = 0
    while (buf := await s.recv()) is not None:
        got += len(buf)
    assert await s.result() == size == got
    return time.perf_counter() - t0


async def client(args: argparse.Namespace) -> dict:
    from loguru import logger

    logger.remove()
    from swarmd.rpc import connect
    from swarmd.store.transfer import pull_file, push_file

    tmp = Path(tempfile.mkdtemp(prefix="swarmd-bench-store-"))
    try:
        model = tmp / "model.onnx"
        size = build_model(model, args.mib)
        mib = size / 2**20
        proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before anything is measured
            [sys.executable, __file__, "--serve", str(tmp / "store")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT,
        )
        try:
            assert proc.stdout is not None and proc.stdin is not None
            hello = json.loads(proc.stdout.readline())
            peer = await connect(None, "127.0.0.1", hello["port"], remote_public_key=bytes.fromhex(hello["key"]))
            copy_t: list[float] = []
            wall: dict[str, list[float]] = {k: [] for k in ("push", "pull", "up", "down")}
            cpu: dict[str, list[tuple[float, float]]] = {k: [] for k in wall}

            async def measure(what: str, coro: Any) -> Any:
                """Wall time, and CPU seconds of this process and of the store's (all threads)."""
                c0, s0 = time.process_time(), await peer.call("benchCpu", {}, timeout=60)
                t0 = time.perf_counter()
                out = await coro
                wall[what].append(time.perf_counter() - t0)
                c1, s1 = time.process_time(), await peer.call("benchCpu", {}, timeout=60)
                cpu[what].append((c1 - c0, s1 - s0))
                return out

            for i in range(args.rounds):
                copy_t.append(copy_baseline(model, tmp / "copy.onnx"))
                await measure("up", raw_up(peer, size))
                await measure("down", raw_down(peer, size))
                meta = await measure("push", push_file(peer, model, "bench", str(i + 1), timeout=120))
                out = tmp / "pulled.onnx"
                await measure("pull", pull_file(peer, meta["digest"], out, size=meta["size"], timeout=120))
                out.unlink()
                # delete so the next push sends every byte again (no dedupe of the blob)
                await peer.call("deleteModel", {"name": "bench", "version": str(i + 1)}, timeout=60)
            await peer.close()
        finally:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = statistics.median
    push_t, pull_t, up_t, down_t = wall["push"], wall["pull"], wall["up"], wall["down"]
    return {
        "model_mib": round(mib, 1),
        "rounds": args.rounds,
        "push_mib_s": round(mib / med(push_t), 1),
        "pull_mib_s": round(mib / med(pull_t), 1),
        "baseline_copy_fsync_mib_s": round(mib / med(copy_t), 1),
        "baseline_stream_up_mib_s": round(mib / med(up_t), 1),
        "baseline_stream_down_mib_s": round(mib / med(down_t), 1),
        "push_vs_copy": round(med(copy_t) / med(push_t), 3),
        "pull_vs_copy": round(med(copy_t) / med(pull_t), 3),
        "push_vs_stream": round(med(up_t) / med(push_t), 3),
        "pull_vs_stream": round(med(down_t) / med(pull_t), 3),
        # CPU ms per transfer (client, store): what a busy 2-core box really rations
        "cpu_ms": {k: [round(1e3 * med(c[0] for c in v)), round(1e3 * med(c[1] for c in v))] for k, v in cpu.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve is not None:
        asyncio.run(serve(args.serve))
        return
    r = asyncio.run(client(args))
    print(f"store transfer of a {r['model_mib']} MiB ONNX model, median of {r['rounds']} rounds")
    c = r["cpu_ms"]
    print(f"{'what':36} {'MiB/s':>8} {'x copy':>7} {'x stream':>9} {'cpu ms client/store':>20}")
    print(f"{'push (client -> store, TCP)':36} {r['push_mib_s']:8.1f} {r['push_vs_copy']:7.3f} "
          f"{r['push_vs_stream']:9.3f} {c['push'][0]:>11}/{c['push'][1]}")
    print(f"{'pull (store -> client, TCP)':36} {r['pull_mib_s']:8.1f} {r['pull_vs_copy']:7.3f} "
          f"{r['pull_vs_stream']:9.3f} {c['pull'][0]:>11}/{c['pull'][1]}")
    print(f"{'baseline: file copy + fsync':36} {r['baseline_copy_fsync_mib_s']:8.1f} {1.0:7.3f}")
    print(f"{'baseline: bare stream up (memory)':36} {r['baseline_stream_up_mib_s']:8.1f} {'':7} {'1.000':>9} "
          f"{c['up'][0]:>11}/{c['up'][1]}")
    print(f"{'baseline: bare stream down (memory)':36} {r['baseline_stream_down_mib_s']:8.1f} {'':7} {'1.000':>9} "
          f"{c['down'][0]:>11}/{c['down'][1]}")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
