"""The gateway's gRPC front beside its HTTP JSON route, same process, same model, same run.

    python bench/gateway_grpc.py [--seconds 4] [--conns 1,64]

Model: the 784-1024-1024-10 MLP of bench/gateway.py, served by a standalone gateway
(onnxruntime in-process, so the figure is the front's cost, not the swarm's). Load:
HTTP JSON `POST /v2/models/mlp/infer` on N keep-alive connections (bench/gateway.py's
client) vs gRPC `ModelInfer` with raw tensor contents (what tritonclient.grpc sends) as N
concurrent calls on one HTTP/2 channel. The baseline is the HTTP JSON route measured in
the same run. Target (issue 20): gRPC at 64 concurrent >= 1.5x HTTP JSON. Last line: JSON.
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--conns", default="1,64")
    args = ap.parse_args()
    conns = [int(c) for c in args.conns.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="swarmd-bench-grpc-"))
    results: dict[str, dict[str, dict[str, float]]] = {"http_json": {}, "grpc": {}}
    proc = None
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
        for c in conns:  # alternate the two fronts per concurrency so both see the same load
            results["http_json"][str(c)] = measure(http, body, c, args.seconds, {"x-api-key": key}, None)
            results["grpc"][str(c)] = asyncio.run(grpc_load(grpc_port, x, c, args.seconds, key))
    finally:
        if proc is not None:
            stop_proc(proc)
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"{'front':<12}{'conns':>6}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'vs HTTP':>9}")
    ratios = {}
    for c in map(str, conns):
        h, g = results["http_json"][c], results["grpc"][c]
        ratios[c] = round(g["rps"] / h["rps"], 2) if h["rps"] else None
        print(f"{'http json':<12}{c:>6}{h['rps']:>10,.0f}{h['p50_ms']:>9.2f}{h['p99_ms']:>9.2f}{h['errors']:>8}")
        print(f"{'grpc raw':<12}{c:>6}{g['rps']:>10,.0f}{g['p50_ms']:>9.2f}{g['p99_ms']:>9.2f}{g['errors']:>8}"
              f"{ratios[c] or 0:>8.2f}x")
    print("target: gRPC at 64 concurrent >= 1.5x HTTP JSON")
    print(json.dumps({"bench": "grpc", "grpc": results["grpc"], "baseline": {"http_json": results["http_json"]},
                      "grpc_over_http_json": ratios}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
