"""The gateway's gRPC front in detail: engines, clients, the per-call floor, tracing, the swarm.

Issue 20's target figure (gRPC ModelInfer at 64 streams over the HTTP JSON route, beside
FastAPI) is bench/gateway.py's "gateway grpc" row; this script adds the rows that explain it.

    python bench/gateway_grpc.py [--seconds 3] [--conns 64] [--rounds 3] [--engines lean,grpcio] [--swarm]
                                 [--pairs] [--no-fastapi] [--traced] [--compare DIR]

Model: the 784-1024-1024-10 MLP of bench/gateway.py, served by standalone gateways
(onnxruntime in-process, so the figure is the front's cost, not the swarm's), one per gRPC
engine (gateway.grpc_engine: "lean", the HTTP/2 lane of gateway/grpc_lane.py, and
"grpcio"). Load, N concurrent calls each:
  http json   POST /v2/models/mlp/infer on N keep-alive connections from a client as lean as
              the gRPC one (bench/gateway.py's H1Load: asyncio protocol, one pre-built request)
              — the baseline of the target;
  fastapi     the same on FastAPI + onnxruntime under uvicorn (bench/gateway.py's baseline);
  grpc raw    ModelInfer with raw tensor contents (what tritonclient.grpc sends) as N
              concurrent streams on one HTTP/2 connection, from a client as lean as the HTTP
              one: raw asyncio, pre-encoded headers and a pre-serialized request
              (bench/gateway.py's H2Load);
  grpc/grpcio the same calls from grpcio's own asyncio channel (what tritonclient uses): its
              client costs more CPU per call than the server, so on this 2-core box it caps
              req/s for either engine — shown, not used for the target;
  grpc floor  ServerLive from the raw client: the engine's per-call cost with no work of ours.
Rounds interleave every row (same load for all); figures are medians over rounds, and the
target's ratio is also given as the median of per-round ratios (--pairs: only the target's
rows, so a pair runs seconds apart; use more, shorter rounds on a shared box). Per row:
req/s, p50/p99, the gateway's CPU per request (µs) and the load generator's. Target (issue
20): grpc raw (lean) at 64 concurrent >= 1.5x http json req/s. With --traced, a gateway with
OpenTelemetry tracing on is measured too (its CPU per request over the untraced one's).
Last line: JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gateway import (  # noqa: E402  (bench/gateway.py: one load client per protocol, one model builder)
    FASTAPI_APP,
    build_mlp,
    cpu_seconds,
    create_key,
    free_port,
    h2_load,
    load,
    provision_swarm,
    start_proc,
    stop_proc,
    swarmd_env,
    wait_http,
    wait_log,
)


async def h1_load(port: int, body: bytes, conns: int, seconds: float, key: str) -> dict[str, float]:
    """HTTP JSON infer on `conns` keep-alive connections (bench/gateway.py's client)."""
    return await load(port, body, conns, seconds, {"x-api-key": key})


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


def arun(coro_fn, *args):  # noqa: ANN001, ANN201
    return asyncio.run(coro_fn(*args))


def timed(pid: int, seconds: float, run, *args) -> dict[str, float]:  # noqa: ANN001
    """One load run (`run()` returns its figures): plus the gateway's and the load generator's
    CPU per request (µs), both counted over the warm-up too. CPU time is disturbed far less
    by the machine's load than req/s."""
    before, c0 = cpu_seconds(pid), time.process_time()
    r = run(*args)
    total = r["rps"] * (seconds + min(1.0, seconds / 4)) + r["errors"]  # warm-up requests ran too
    r["server_cpu_us_per_req"] = round((cpu_seconds(pid) - before) / max(total, 1) * 1e6, 1)
    r["client_cpu_us_per_req"] = round((time.process_time() - c0) / max(total, 1) * 1e6, 1)
    return r


def median_of(rounds: list[dict[str, float]]) -> dict[str, float]:
    keys = ("rps", "p50_ms", "p99_ms", "errors", "server_cpu_us_per_req", "client_cpu_us_per_req",
            "worker_cpu_us_per_req")
    out = {k: round(statistics.median(r[k] for r in rounds), 1 if k != "p50_ms" and k != "p99_ms" else 3)
           for k in keys if k in rounds[0]}
    out["rounds_rps"] = [r["rps"] for r in rounds]
    return out


def start_gateway(tmp: Path, name: str, models: Path, engine: str, traced: bool = False, root: Path = ROOT):
    """A standalone gateway run from the swarmd checkout `root` (--compare: another one)."""
    data = tmp / name
    key = create_key(data)
    http, grpc_port = free_port(), free_port()
    env = dict(SWARMD_GATEWAY_LOCAL_MODELS_DIR=str(models), SWARMD_GATEWAY_ACCESS_LOG="false",
               SWARMD_GATEWAY_GRPC_ENGINE=engine, PYTHONPATH=str(root))
    if traced:
        env.update(SWARMD_TRACING_ENABLED="true", SWARMD_TRACING_EXPORTER="file",
                   SWARMD_TRACING_FILE=str(tmp / f"{name}-spans.jsonl"))
    proc = start_proc([sys.executable, "-m", "swarmd", "--role", "gateway", "--http", f"127.0.0.1:{http}",
                       "--grpc", f"127.0.0.1:{grpc_port}", "--data-dir", str(data), "--log-level", "WARNING"],
                      swarmd_env(**env), tmp / f"{name}.log")
    wait_http(http, proc)
    return proc, http, grpc_port, key


def start_swarm(tmp: Path, models: Path, body: bytes, procs: list):
    """gateway -> worker, each its own process (+ store/bootstrap, orchestrator), as bench/gateway.py's
    "swarm" route, the gateway with its gRPC front on; the model pushed through the gateway.
    Returns (gateway process, worker process, http port, grpc port, key)."""
    base = tmp / "swarm"
    cmd = [sys.executable, "-m", "swarmd", "--log-format", "json", "--log-level", "INFO"]

    def start(name: str, *args: str):
        log = base / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        p = start_proc([*cmd, "--data-dir", str(base / name), *args], swarmd_env(), log)
        procs.append(p)
        return p, log

    http, grpc_port = free_port(), free_port()
    p, log = start("store", "--role", "bootstrap,store")
    dht = json.loads(wait_log(log, r'\{[^\n]*"event": "ready"[^\n]*\}', p).group(0))["ports"]["dht"]
    boot = ("--bootstrap", f"127.0.0.1:{dht}")
    orch = start("orchestrator", "--role", "orchestrator", *boot)
    worker = start("worker", "--role", "worker", *boot)
    gw = start("gateway", "--role", "gateway", "--http", f"127.0.0.1:{http}", "--grpc", f"127.0.0.1:{grpc_port}", *boot)
    for q, qlog in (orch, worker, gw):
        wait_log(qlog, r'"event": "ready"', q)
    admin = wait_log(gw[1], r"store it now\): (\S+)", gw[0]).group(1)

    key = provision_swarm(http, admin, models, body)
    return gw[0], worker[0], http, grpc_port, key


def base_row(name: str) -> str:
    """The HTTP JSON row a row's ratio is taken against: the same server's."""
    if name.startswith("swarm "):
        return "swarm http json"
    return "http json@before" if name.endswith("@before") else "http json"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--conns", default="64")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engines", default="lean,grpcio", help="gRPC engines to measure, each in a gateway of its own")
    ap.add_argument("--no-fastapi", action="store_true", help="leave the FastAPI baseline out")
    ap.add_argument("--traced", action="store_true", help="also measure a gateway (lean) with tracing on")
    ap.add_argument("--pairs", action="store_true",
                    help="only the target's rows (http json, grpc raw per engine, fastapi unless --no-fastapi, the swarm "
                         "pair): shorter rounds, so the two rows of a pair run closer together on a shared box")
    ap.add_argument("--swarm", action="store_true",
                    help="also gateway -> worker in two processes (+ store, orchestrator): the deployed data path")
    ap.add_argument("--compare", metavar="DIR", type=Path,
                    help="another swarmd checkout (e.g. main before a change): its standalone gateway runs the "
                         "http json and grpc raw lean rows too, as ROW@before, in the same interleaved rounds")
    args = ap.parse_args()
    conns = [int(c) for c in args.conns.split(",")]
    engines = args.engines.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="swarmd-bench-grpc-"))
    procs = []
    rows: dict[str, dict[str, list[dict[str, float]]]] = {}
    load_seen: list[str] = []
    try:
        models = tmp / "models"
        (models / "mlp" / "1").mkdir(parents=True)
        build_mlp(models / "mlp" / "1" / "model.onnx")
        x = np.random.default_rng(1).random((1, 784)).astype(np.float32)
        body = json.dumps({"inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32",
                                       "data": x.reshape(-1).tolist()}]}).encode()
        from swarmd.gateway.proto import oip_pb2 as pb

        req = pb.ModelInferRequest(model_name="mlp", raw_input_contents=[x.tobytes()])
        req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
        infer_msg = req.SerializeToString()
        infer_path = "/inference.GRPCInferenceService/ModelInfer"
        live_path = "/inference.GRPCInferenceService/ServerLive"
        gws = {e: start_gateway(tmp, f"gw-{e}", models, e) for e in engines}
        procs += [g[0] for g in gws.values()]
        if args.traced:
            gws["traced"] = start_gateway(tmp, "gw-traced", models, "lean", traced=True)
            procs.append(gws["traced"][0])
        if args.compare:
            gws["before"] = start_gateway(tmp, "gw-before", models, "lean", root=args.compare.resolve())
            procs.append(gws["before"][0])
        fastapi = None
        if not args.no_fastapi:
            app = tmp / "fastapi_app.py"
            app.write_text(FASTAPI_APP)
            fport = free_port()
            fastapi = start_proc([sys.executable, str(app), str(models / "mlp" / "1" / "model.onnx"), str(fport)],
                                 swarmd_env(), tmp / "fastapi.log")
            procs.append(fastapi)
            wait_http(fport, fastapi)
        swarm = start_swarm(tmp, models, body, procs) if args.swarm else None
        s = args.seconds
        first = gws[engines[0]]

        def add(name: str, c: int, r: dict[str, float]) -> None:
            rows.setdefault(name, {}).setdefault(str(c), []).append(r)

        for _ in range(args.rounds):  # every row once per round, so each sees the same machine
            load_seen.append(open("/proc/loadavg").read().split()[0])
            for c in conns:
                proc, http, _, key = first
                add("http json", c, timed(proc.pid, s, arun, h1_load, http, body, c, s, key))
                if fastapi is not None:
                    add("fastapi", c, timed(fastapi.pid, s, arun, load, fport, body, c, s, {}))
                for e in engines:
                    proc, _, gport, key = gws[e]
                    add(f"grpc raw {e}", c, timed(proc.pid, s, arun, h2_load, gport, infer_path, infer_msg, c, s, key))
                    if args.pairs:
                        continue
                    add(f"grpc/grpcio {e}", c, timed(proc.pid, s, arun, grpc_load, gport, x, c, s, key))
                    add(f"grpc floor {e}", c, timed(proc.pid, s, arun, h2_load, gport, live_path, b"", c, s, None))
                if args.compare:  # the same pair from the other checkout, seconds later
                    proc, http, gport, key = gws["before"]
                    add("http json@before", c, timed(proc.pid, s, arun, h1_load, http, body, c, s, key))
                    add("grpc raw lean@before", c,
                        timed(proc.pid, s, arun, h2_load, gport, infer_path, infer_msg, c, s, key))
                if swarm is not None:  # gw us/req: the gateway process; worker us/req apart
                    gp, wp, http, gport, key = swarm
                    for name, fn, fargs in (("swarm http json", h1_load, (http, body, c, s, key)),
                                            ("swarm grpc raw lean", h2_load, (gport, infer_path, infer_msg, c, s, key))):
                        w0 = cpu_seconds(wp.pid)
                        r = timed(gp.pid, s, arun, fn, *fargs)
                        total = r["rps"] * (s + min(1.0, s / 4)) + r["errors"]
                        r["worker_cpu_us_per_req"] = round((cpu_seconds(wp.pid) - w0) / max(total, 1) * 1e6, 1)
                        add(name, c, r)
                if args.traced:
                    proc, http, gport, key = gws["traced"]
                    add("http json traced", c, timed(proc.pid, s, arun, h1_load, http, body, c, s, key))
                    add("grpc raw traced", c, timed(proc.pid, s, arun, h2_load, gport, infer_path, infer_msg, c, s, key))
        load_seen.append(open("/proc/loadavg").read().split()[0])
    finally:
        for p in procs:
            stop_proc(p)
        shutil.rmtree(tmp, ignore_errors=True)

    med = {name: {c: median_of(rs) for c, rs in by_c.items()} for name, by_c in rows.items()}
    print(f"medians of {args.rounds} interleaved rounds of {args.seconds:g} s; load average (1 min) at each round: "
          f"{', '.join(load_seen)}")
    print(f"{'row':<20}{'conns':>6}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>7}{'gw us/req':>10}"
          f"{'client us/req':>14}{'vs HTTP':>9}")
    ratios: dict[str, dict[str, float | None]] = {}
    for c in map(str, conns):
        base = med["http json"][c]["rps"]
        for name, by_c in med.items():
            r = by_c[c]
            ratio = round(r["rps"] / base, 2) if base else None
            ratios.setdefault(name, {})[c] = ratio
            if name.startswith("swarm ") or name.endswith("@before"):  # against the HTTP JSON of the same server
                sb = med[base_row(name)][c]["rps"]
                ratio = round(r["rps"] / sb, 2) if sb else None
                ratios.setdefault(name, {})[c] = ratio
            worker = f"  worker {r['worker_cpu_us_per_req']:,.0f} us/req" if "worker_cpu_us_per_req" in r else ""
            print(f"{name:<20}{c:>6}{r['rps']:>9,.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['errors']:>7.0f}"
                  f"{r['server_cpu_us_per_req']:>10,.0f}{r['client_cpu_us_per_req']:>14,.0f}{ratio or 0:>8.2f}x{worker}")
    # the same ratios taken round by round (both rows of a round saw the same machine), then their median:
    # on a shared box the rounds' req/s move together, so this is steadier than the ratio of medians
    per_round: dict[str, dict[str, float]] = {}
    for name, by_c in rows.items():
        base_name = base_row(name)
        for c, rs in by_c.items():
            bs = rows[base_name][c]
            per_round.setdefault(name, {})[c] = round(statistics.median(
                r["rps"] / b["rps"] for r, b in zip(rs, bs, strict=True) if b["rps"]), 2)
            per_round.setdefault(name + " cpu", {})[c] = round(statistics.median(
                b["server_cpu_us_per_req"] / r["server_cpu_us_per_req"] for r, b in zip(rs, bs, strict=True)
                if r["server_cpu_us_per_req"]), 2)
    for c in map(str, conns):
        for name in ("grpc raw lean", "grpc raw lean@before", "swarm grpc raw lean"):
            if name in per_round:
                print(f"{name} over its HTTP JSON, median of per-round ratios at {c}: req/s "
                      f"{per_round[name][c]:.2f}x, requests per gateway CPU second {per_round[name + ' cpu'][c]:.2f}x")
    print("target: grpc raw lean at 64 concurrent >= 1.5x http json req/s (swarm rows: vs swarm http json)")
    lean = "grpc raw lean" if "grpc raw lean" in med else next(n for n in med if n.startswith("grpc raw"))
    doc: dict[str, object] = {
        "bench": "grpc", "rounds": args.rounds, "seconds": args.seconds, "loadavg": load_seen,
        "grpc": med[lean], "baseline": {"http_json": med["http json"], "fastapi_ort": med.get("fastapi")},
        "grpc_over_http_json": ratios[lean], "rows": med, "ratios_over_http_json": ratios,
        "per_round_ratio_medians": per_round,
    }
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
