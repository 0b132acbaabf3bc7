"""The gateway's gRPC front beside its HTTP JSON route, same process, same model, same run.

    python bench/gateway_grpc.py [--seconds 4] [--conns 1,64] [--traced]

Model: the 784-1024-1024-10 MLP of bench/gateway.py, served by a standalone gateway
(onnxruntime in-process, so the figure is the front's cost, not the swarm's). Load:
HTTP JSON `POST /v2/models/mlp/infer` on N keep-alive connections (bench/gateway.py's
client) vs gRPC `ModelInfer` with raw tensor contents (what tritonclient.grpc sends) as N
concurrent calls on one HTTP/2 channel. The baseline is the HTTP JSON route measured in
the same run. Target (issue 20): gRPC at 64 concurrent >= 1.5x HTTP JSON. The "grpc floor"
row is ServerLive on the same channel setup: the gateway CPU grpcio spends per call with no
work of ours, the least a ModelInfer can cost on top of what HTTP JSON also pays. With --traced, a
second gateway with OpenTelemetry tracing on (every request traced, spans to a file) is
measured the same way, and its req/s over the untraced one's is reported: what tracing
costs when it is on (off, it is one attribute check). Last line: JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gateway import (  # noqa: E402  (bench/gateway.py: one load client, one model builder)
    build_mlp,
    cpu_seconds,
    create_key,
    free_port,
    measure,
    start_proc,
    stop_proc,
    swarmd_env,
    wait_http,
)


async def grpc_load(port: int, x: np.ndarray, conns: int, seconds: float, key: str) -> dict[str, float]:
    import grpc

    from swarmd.gateway.proto import oip_pb2 as pb

    req = pb.ModelInferRequest(model_name="mlp", raw_input_contents=[x.tobytes()])
    req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    body = req.SerializeToString()
    lat: list[float] = []
    errors: list[str] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                              request_serializer=lambda b: b, response_deserializer=pb.ModelInferResponse.FromString)
        md = (("x-api-key", key),)
        start = time.perf_counter()
        warm = start + min(1.0, seconds / 4)
        stop = warm + seconds

        async def one() -> None:
            while True:
                t0 = time.perf_counter()
                if t0 >= stop:
                    return
                try:
                    resp = await call(body, metadata=md, timeout=30)
                    assert resp.raw_output_contents
                except grpc.aio.AioRpcError as e:
                    errors.append(e.code().name)
                    continue
                if t0 >= warm:
                    lat.append(time.perf_counter() - t0)

        await asyncio.gather(*(one() for _ in range(conns)))
    a = np.array(lat) if lat else np.array([0.0])
    return {"rps": round(len(lat) / seconds, 1), "p50_ms": round(float(np.percentile(a, 50)) * 1000, 3),
            "p99_ms": round(float(np.percentile(a, 99)) * 1000, 3), "errors": len(errors)}


async def grpc_floor_load(port: int, conns: int, seconds: float) -> int:
    """ServerLive (public, no work: no key check, no model) as fast as `conns` callers go on one
    channel, for `seconds` plus the same warm-up as grpc_load; returns the calls made."""
    import grpc

    done = 0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary("/inference.GRPCInferenceService/ServerLive",
                              request_serializer=lambda b: b, response_deserializer=lambda b: b)
        stop = time.perf_counter() + seconds + min(1.0, seconds / 4)

        async def one() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                await call(b"", timeout=30)
                done += 1

        await asyncio.gather(*(one() for _ in range(conns)))
    return done


def grpc_floor(port: int, conns: int, seconds: float, pid: int) -> dict[str, float]:
    """The gRPC transport's own cost: the gateway's CPU per ServerLive call (grpcio's per-call
    machinery, nothing of ours but a metrics count). ModelInfer cannot cost less than this plus
    what HTTP JSON also pays (key check, inference dispatch, onnxruntime)."""
    before = cpu_seconds(pid)
    calls = asyncio.run(grpc_floor_load(port, conns, seconds))
    return {"rps": round(calls / (seconds + min(1.0, seconds / 4)), 1),
            "server_cpu_us_per_req": round((cpu_seconds(pid) - before) / max(calls, 1) * 1e6, 1)}


def grpc_measure(port: int, x: np.ndarray, conns: int, seconds: float, key: str, pid: int) -> dict[str, float]:
    """grpc_load, with the gateway process's CPU time per request (as bench/gateway.py's measure):
    a figure the machine's load disturbs far less than req/s."""
    before = cpu_seconds(pid)
    r = asyncio.run(grpc_load(port, x, conns, seconds, key))
    total = r["rps"] * (seconds + min(1.0, seconds / 4)) + r["errors"]  # warm-up requests ran too
    r["server_cpu_us_per_req"] = round((cpu_seconds(pid) - before) / max(total, 1) * 1e6, 1)
    return r


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--conns", default="1,64")
    ap.add_argument("--traced", action="store_true", help="also measure a gateway with tracing on")
    args = ap.parse_args()
    conns = [int(c) for c in args.conns.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="swarmd-bench-grpc-"))
    results: dict[str, dict[str, dict[str, float]]] = {"http_json": {}, "grpc": {}, "grpc_floor": {}}
    if args.traced:
        results.update({"http_json_traced": {}, "grpc_traced": {}})
    proc = traced = None
    try:
        models = tmp / "models"
        (models / "mlp" / "1").mkdir(parents=True)
        build_mlp(models / "mlp" / "1" / "model.onnx")
        x = np.random.default_rng(1).random((1, 784)).astype(np.float32)
        body = json.dumps({"inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32",
                                       "data": x.reshape(-1).tolist()}]}).encode()
        data = tmp / "gw"
        key = create_key(data)
        http, grpc_port = free_port(), free_port()
        proc = start_proc([sys.executable, "-m", "swarmd", "--role", "gateway", "--http", f"127.0.0.1:{http}",
                           "--grpc", f"127.0.0.1:{grpc_port}", "--data-dir", str(data), "--log-level", "WARNING"],
                          swarmd_env(SWARMD_GATEWAY_LOCAL_MODELS_DIR=str(models),
                                     SWARMD_GATEWAY_ACCESS_LOG="false"), tmp / "gateway.log")
        wait_http(http, proc)
        if args.traced:
            t_data = tmp / "gw-traced"
            t_key = create_key(t_data)
            t_http, t_grpc = free_port(), free_port()
            traced = start_proc(
                [sys.executable, "-m", "swarmd", "--role", "gateway", "--http", f"127.0.0.1:{t_http}",
                 "--grpc", f"127.0.0.1:{t_grpc}", "--data-dir", str(t_data), "--log-level", "WARNING"],
                swarmd_env(SWARMD_GATEWAY_LOCAL_MODELS_DIR=str(models), SWARMD_GATEWAY_ACCESS_LOG="false",
                           SWARMD_TRACING_ENABLED="true", SWARMD_TRACING_EXPORTER="file",
                           SWARMD_TRACING_FILE=str(tmp / "spans.jsonl")), tmp / "gateway-traced.log")
            wait_http(t_http, traced)
        for c in conns:  # alternate the fronts per concurrency so all see the same load
            results["http_json"][str(c)] = measure(http, body, c, args.seconds, {"x-api-key": key}, proc.pid)
            results["grpc"][str(c)] = grpc_measure(grpc_port, x, c, args.seconds, key, proc.pid)
            results["grpc_floor"][str(c)] = grpc_floor(grpc_port, c, args.seconds, proc.pid)
            if args.traced:
                assert traced is not None
                results["http_json_traced"][str(c)] = measure(t_http, body, c, args.seconds,
                                                              {"x-api-key": t_key}, traced.pid)
                results["grpc_traced"][str(c)] = grpc_measure(t_grpc, x, c, args.seconds, t_key, traced.pid)
    finally:
        for p in (proc, traced):
            if p is not None:
                stop_proc(p)
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"{'front':<12}{'conns':>6}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'cpu us/req':>11}"
          f"{'vs HTTP':>9}{'cpu vs HTTP':>12}")
    ratios, cpu_ratios = {}, {}
    for c in map(str, conns):
        h, g = results["http_json"][c], results["grpc"][c]
        ratios[c] = round(g["rps"] / h["rps"], 2) if h["rps"] else None
        # requests per gateway CPU second, gRPC over HTTP JSON
        cpu_ratios[c] = round(h["server_cpu_us_per_req"] / g["server_cpu_us_per_req"], 2) \
            if g["server_cpu_us_per_req"] else None
        print(f"{'http json':<12}{c:>6}{h['rps']:>10,.0f}{h['p50_ms']:>9.2f}{h['p99_ms']:>9.2f}{h['errors']:>8}"
              f"{h['server_cpu_us_per_req']:>11,.0f}")
        print(f"{'grpc raw':<12}{c:>6}{g['rps']:>10,.0f}{g['p50_ms']:>9.2f}{g['p99_ms']:>9.2f}{g['errors']:>8}"
              f"{g['server_cpu_us_per_req']:>11,.0f}{ratios[c] or 0:>8.2f}x{cpu_ratios[c] or 0:>11.2f}x")
        f = results["grpc_floor"][c]
        print(f"{'grpc floor':<12}{c:>6}{f['rps']:>10,.0f}{'':>34}{f['server_cpu_us_per_req']:>11,.0f}"
              "   (ServerLive: grpcio's per-call cost alone)")
    print("target: gRPC at 64 concurrent >= 1.5x HTTP JSON")
    doc: dict[str, object] = {"bench": "grpc", "grpc": results["grpc"], "baseline": {"http_json": results["http_json"]},
                              "grpc_over_http_json": ratios, "grpc_over_http_json_per_cpu": cpu_ratios,
                              "grpc_floor_server_live": results["grpc_floor"]}
    if args.traced:
        traced_ratio = {}
        for front in ("http_json", "grpc"):
            for c in map(str, conns):
                on, off = results[f"{front}_traced"][c], results[front][c]
                traced_ratio[f"{front}/{c}"] = round(on["server_cpu_us_per_req"] / off["server_cpu_us_per_req"], 2) \
                    if off["server_cpu_us_per_req"] else None
                print(f"{front + ' traced':<18}{c:>6}{on['rps']:>10,.0f} req/s {on['server_cpu_us_per_req']:>8,.0f} cpu "
                      f"us/req: {traced_ratio[f'{front}/{c}'] or 0:.2f}x the untraced gateway's CPU per request")
        doc["traced"] = {"http_json": results["http_json_traced"], "grpc": results["grpc_traced"]}
        doc["traced_cpu_per_req_over_untraced"] = traced_ratio
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
