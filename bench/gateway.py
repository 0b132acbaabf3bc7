"""Gateway throughput: POST /v2/models/mlp/infer with a 784-float JSON body.

Model: 784-1024-1024-10 MLP (onnx helper, seeded random weights). Load: lean asyncio
protocols on loopback at 1, 16 and 64 connections (H1Load: keep-alive HTTP/1.1, one
pre-built request; H2Load: concurrent gRPC streams on one HTTP/2 connection, pre-encoded).
Servers, each a subprocess measured in this same run:
  fastapi   single-process FastAPI + onnxruntime under uvicorn (the baseline)
  gateway   `swarmd --role gateway` serving the model in-process (HTTP cost + local ORT)
  gateway grpc  the same gateway process's gRPC ModelInfer (raw tensor contents, what
            tritonclient.grpc sends), N concurrent streams; issue 20's target is its req/s
            over the gateway row's at 64 (printed per round and as medians)
  swarm     `swarmd --role gateway` -> a separate worker process (+ orchestrator, store);
            swarm+threaded: the worker runs every request in a thread (no inline runs);
            swarm+inline: inline runs up to 5 ms; swarm+colocated: one process runs gateway
            and worker (the embedded default's data path), store/orchestrator apart
plus direct onnxruntime batch-1 calls (the ceiling). Last line: one JSON object.

Every server is started first and then measured in interleaved slices: each round
measures every server once at each connection count (`--seconds` each), the order
rotating between rounds, so a server and the FastAPI baseline it is compared with
run seconds apart and under the same load. A figure is the median over the rounds;
`ratio` is the median of the per-round ratios to FastAPI in the same round.

    python bench/gateway.py [--seconds 4] [--rounds 5] [--conns 1,16,64] [--routes ...]
                            [--standalone fastapi,gateway,grpc] [--compare DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from swarmd.gateway.h2frames import (  # noqa: E402  (the frame and header helpers the gRPC lane itself uses)
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
)
from swarmd.gateway.h2hpack import HpackDecoder, hpack_int, literal  # noqa: E402

FASTAPI_APP = textwrap.dedent('''
    import sys
    import numpy as np
    import onnxruntime as ort
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(sys.argv[1], sess_options=opts, providers=["CPUExecutionProvider"])
    app = FastAPI()

    @app.post("/v2/models/mlp/infer")
    async def infer(request: Request):
        body = await request.json()
        t = body["inputs"][0]
        x = np.asarray(t["data"], dtype=np.float32).reshape(t["shape"])
        (y,) = sess.run(None, {"x": x})
        return JSONResponse({"model_name": "mlp", "outputs": [
            {"name": "y", "datatype": "FP32", "shape": list(y.shape), "data": y.ravel().tolist()}]})

    if __name__ == "__main__":
        import uvicorn
        uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False)
''')


def build_mlp(path: Path, seed: int = 0) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    dims = [784, 1024, 1024, 10]
    inits, nodes, prev = [], [], "x"
    for i in range(3):
        w = (rng.standard_normal((dims[i], dims[i + 1])) / np.sqrt(dims[i])).astype(np.float32)
        b = np.zeros(dims[i + 1], dtype=np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        out = "y" if i == 2 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [out if i == 2 else f"g{i}"]))
        if i < 2:
            nodes.append(helper.make_node("Relu", [f"g{i}"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 784])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])], initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server on port {port} did not start within {timeout}s")


def direct_ort(model: Path, body: dict, n: int = 3000) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])
    x = np.asarray(body["inputs"][0]["data"], dtype=np.float32).reshape(1, 784)
    for _ in range(100):
        sess.run(None, {"x": x})
    t0 = time.perf_counter()
    for _ in range(n):
        sess.run(None, {"x": x})
    return n / (time.perf_counter() - t0)


FRAME = struct.Struct(">BHBBL")
INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"


class H1Load(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection sending `request` again as soon as each answer is in.
    The load generator of every HTTP row (an asyncio protocol, one pre-built request, no
    streams or wait_for per read: ~40 µs of client CPU per request, against ~90 for a streams
    client, which on this 2-core box took CPU from the servers it measured)."""

    def __init__(self, request: bytes, stop: float, warm: float, lat: list[float], errors: list[int],
                 done: asyncio.Future) -> None:
        self.request, self.stop, self.warm = request, stop, warm
        self.lat, self.errors, self.done = lat, errors, done
        self.buf = b""
        self.t0 = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.t0 = time.perf_counter()
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buf = self.buf + data if self.buf else data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            i = head.find(b"content-length:")
            j = head.find(b"\r\n", i) if i >= 0 else -1
            n = int(head[i + 15:j if j > 0 else None]) if i >= 0 else 0
            if len(self.buf) < end + 4 + n:
                return
            if head[9:12] != b"200" and not self.errors:
                print(f"first error: {head[9:12].decode()} {self.buf[end + 4:end + 4 + min(n, 300)]!r}", file=sys.stderr)
            self.buf = self.buf[end + 4 + n:]
            now = time.perf_counter()
            if head[9:12] != b"200":
                self.errors.append(int(head[9:12]))
            elif self.t0 >= self.warm:
                self.lat.append(now - self.t0)
            if now < self.stop:
                self.t0 = now
                self.transport.write(self.request)  # type: ignore[union-attr]
            else:
                self.transport.close()  # type: ignore[union-attr]
                return

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


def request_block(path: str, key: str | None) -> bytes:
    """A gRPC request's header block, encoded once: indexed :method POST (3) and :scheme http
    (6), literals without indexing for the rest."""
    block = b"\x83\x86" + b"\x04" + hpack_int(len(path), 7) + path.encode()
    block += b"\x01" + hpack_int(9, 7) + b"127.0.0.1" + b"\x0f\x10" + hpack_int(16, 7) + b"application/grpc"
    block += literal(b"te", b"trailers")
    if key:
        block += literal(b"x-api-key", key.encode())
    return block


class H2Load(asyncio.Protocol):
    """`conc` gRPC calls in flight on one HTTP/2 connection, each a new stream, until `stop`: the
    load generator of the gRPC rows, as lean as H1Load (raw asyncio, pre-encoded headers and a
    pre-serialized request: ~14 µs of client CPU per call; grpcio's own client, what
    tritonclient uses, costs ~160, more than the server, and would cap req/s on 2 cores)."""

    def __init__(self, block: bytes, message: bytes, conc: int, stop: float, warm: float,
                 lat: list[float], errors: list[int], done: asyncio.Future) -> None:
        self.block, self.conc, self.stop, self.warm = block, conc, stop, warm
        self.data = struct.pack(">BI", 0, len(message)) + message
        self.lat, self.errors, self.done = lat, errors, done
        self.started: dict[int, float] = {}
        self.next_id = 1
        self.buf = bytearray()
        self.unacked = 0
        self.decoder = HpackDecoder()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        out = [PREFACE, frame(SETTINGS, 0, 0, struct.pack(">HIHI", 2, 0, 4, 1 << 24)),
               frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", (1 << 30)))]
        out += [self._call() for _ in range(self.conc)]
        transport.write(b"".join(out))  # type: ignore[attr-defined]

    def _call(self) -> bytes:
        sid = self.next_id
        self.next_id += 2
        self.started[sid] = time.perf_counter()
        return frame(HEADERS, END_HEADERS, sid, self.block) + frame(DATA, END_STREAM, sid, self.data)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos, out = 0, []
        while len(buf) - pos >= 9:
            hi, lo, kind, flags, sid = FRAME.unpack_from(buf, pos)
            n = (hi << 16) | lo
            if len(buf) - pos - 9 < n:
                break
            payload = bytes(buf[pos + 9:pos + 9 + n])
            pos += 9 + n
            if kind == DATA:
                self.unacked += n
            elif kind == HEADERS and flags & END_STREAM:
                fields = dict(self.decoder.decode(payload))
                status = fields.get(b"grpc-status", b"?")
                if status != b"0" and not self.errors:
                    print(f"first error: grpc-status {status.decode()} {fields.get(b'grpc-message', b'')[:300]!r}",
                          file=sys.stderr)
                self._end(sid, None if status == b"0" else (int(status) if status.isdigit() else -1), out)
            elif kind == HEADERS:
                self.decoder.decode(payload)
            elif kind == RST_STREAM:
                self._end(sid, -2, out)
            elif kind == SETTINGS and not flags & 1:
                out.append(frame(SETTINGS, 1, 0))
            elif kind == PING and not flags & 1:
                out.append(frame(PING, 1, 0, payload))
            elif kind == GOAWAY:
                self.errors.append(-3)
                self.started.clear()
        del buf[:pos]
        if self.unacked > 1 << 20:
            out.append(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self.unacked)))
            self.unacked = 0
        if out:
            self.transport.write(b"".join(out))  # type: ignore[union-attr]
        if not self.started and not self.done.done():
            self.done.set_result(None)

    def _end(self, sid: int, error: int | None, out: list[bytes]) -> None:
        t0 = self.started.pop(sid, None)
        if t0 is None:
            return
        now = time.perf_counter()
        if error is not None:
            self.errors.append(error)
        elif t0 >= self.warm:
            self.lat.append(now - t0)
        if now < self.stop:
            out.append(self._call())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


def _figures(lat: list[float], errors: list[int], seconds: float) -> dict[str, Any]:
    a = np.array(lat) if lat else np.array([0.0])
    return {
        "rps": round(len(lat) / seconds, 1),
        "p50_ms": round(float(np.percentile(a, 50)) * 1000, 3),
        "p99_ms": round(float(np.percentile(a, 99)) * 1000, 3),
        "errors": len(errors),
        "error_statuses": sorted(set(errors)),  # HTTP statuses; gRPC rows: grpc-status, -2 RST_STREAM, -3 GOAWAY
    }


async def load(port: int, body: bytes, conns: int, seconds: float, headers: dict[str, str]) -> dict[str, Any]:
    """POST /v2/models/mlp/infer (JSON) on `conns` keep-alive connections, one request at a time on each."""
    loop = asyncio.get_running_loop()
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = (
        f"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"{extra}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    lat: list[float] = []
    errors: list[int] = []
    start = time.perf_counter()
    warm = start + min(1.0, seconds / 4)
    stop = warm + seconds
    dones = [loop.create_future() for _ in range(conns)]
    transports = []
    try:
        for d in dones:
            t, _ = await asyncio.wait_for(loop.create_connection(
                lambda d=d: H1Load(request, stop, warm, lat, errors, d), "127.0.0.1", port), 10)
            transports.append(t)
        await asyncio.wait_for(asyncio.gather(*dones), seconds + 30)
    finally:
        for t in transports:
            t.close()
    return _figures(lat, errors, seconds)


async def h2_load(port: int, path: str, message: bytes, conns: int, seconds: float, key: str | None) -> dict[str, Any]:
    """gRPC calls to `path` with one serialized request `message`: `conns` concurrent streams on one
    HTTP/2 connection (what tritonclient.grpc does with concurrent calls)."""
    loop = asyncio.get_running_loop()
    lat: list[float] = []
    errors: list[int] = []
    start = time.perf_counter()
    warm = start + min(1.0, seconds / 4)
    stop = warm + seconds
    done: asyncio.Future = loop.create_future()
    transport, _ = await asyncio.wait_for(loop.create_connection(
        lambda: H2Load(request_block(path, key), message, conns, stop, warm, lat, errors, done), "127.0.0.1", port), 10)
    try:
        await asyncio.wait_for(done, seconds + 30)
    finally:
        transport.close()
    return _figures(lat, errors, seconds)


def infer_message(body_doc: dict[str, Any]) -> bytes:
    """The gRPC ModelInferRequest of the JSON body's tensor, raw contents (what tritonclient.grpc sends)."""
    from swarmd.gateway.proto import oip_pb2 as pb

    t = body_doc["inputs"][0]
    x = np.asarray(t["data"], dtype=np.float32).reshape(t["shape"])
    req = pb.ModelInferRequest(model_name="mlp", raw_input_contents=[x.tobytes()])
    req.inputs.add(name=t["name"], datatype="FP32", shape=list(x.shape))
    return req.SerializeToString()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(port: int, body: bytes, conns: int, seconds: float, headers: dict[str, str],
            pid: int | None, grpc: bytes | None = None) -> dict[str, Any]:
    """One load run: HTTP JSON with `body`, or with `grpc` (a serialized ModelInferRequest) gRPC
    ModelInfer calls; with pid, also the server process's CPU time per request (its own cost)."""
    before = cpu_seconds(pid) if pid else 0.0
    if grpc is None:
        r = asyncio.run(load(port, body, conns, seconds, headers))
    else:
        r = asyncio.run(h2_load(port, INFER_PATH, grpc, conns, seconds, headers.get("x-api-key")))
    if pid:
        total = r["rps"] * (seconds + min(1.0, seconds / 4)) + r["errors"]  # warm-up requests ran too
        r["server_cpu_us_per_req"] = round((cpu_seconds(pid) - before) / max(total, 1) * 1e6, 1)
    return r


def start_proc(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(args, env=env, cwd=env.get("PYTHONPATH", str(ROOT)), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop_proc(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


DAEMON_ENV: dict[str, str] = {}  # --set


def swarmd_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWARMD_")}
    env["PYTHONPATH"] = str(ROOT)
    env["SWARMD_TRUST_OPEN"] = "true"  # a benchmark lab: every key admitted (docs/operations.md, trust model)
    env.update(DAEMON_ENV)
    env.update(extra)
    return env


def create_key(data_dir: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "swarmd", "keys", "--data-dir", str(data_dir), "create",
                          "--name", "bench", "--permissions", "infer", "--rate", "1000000", "--burst", "1000000"],
                         capture_output=True, text=True, env=swarmd_env(), cwd=str(ROOT), check=True)
    return out.stdout.split()[0]


def swarm_available() -> bool:
    mods = ("swarmd.roles.worker", "swarmd.roles.store", "swarmd.roles.orchestrator", "swarmd.swarm.part")
    return all(importlib.util.find_spec(m) is not None for m in mods)


def wait_log(log: Path, pattern: str, proc: subprocess.Popen, timeout: float = 60.0) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, log.read_text())
        if m:
            return m
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}); log:\n{log.read_text()[-2000:]}")
        time.sleep(0.1)
    raise RuntimeError(f"{pattern!r} not in {log} within {timeout}s")


class Server:
    """One server under load: where it listens, the key it wants, the process whose CPU is counted,
    the processes to profile around each slice, and every process to stop at the end."""

    def __init__(self, name: str, port: int, headers: dict[str, str], pid: int,
                 procs: list[subprocess.Popen], profiled: list[subprocess.Popen] | None = None,
                 grpc: bytes | None = None) -> None:
        self.name, self.port, self.headers, self.pid = name, port, headers, pid
        self.grpc = grpc  # a serialized ModelInferRequest: this row is gRPC ModelInfer calls on `port`
        self.procs = procs
        self.profiled = profiled or []
        self.worker_pid: int | None = None  # gateway -> worker in two processes: the worker's CPU is counted too


    def measure(self, body: bytes, conns: int, seconds: float) -> dict[str, float]:
        for q in self.profiled:  # CPU profile of the slices that load this server only
            q.send_signal(signal.SIGUSR1)
        try:
            before = cpu_seconds(self.worker_pid) if self.worker_pid else 0.0
            r = measure(self.port, body, conns, seconds, self.headers, self.pid, self.grpc)
            if self.worker_pid:
                total = r["rps"] * (seconds + min(1.0, seconds / 4)) + r["errors"]  # as measure() counts
                r["worker_cpu_us_per_req"] = round((cpu_seconds(self.worker_pid) - before) / max(total, 1) * 1e6, 1)
            return r
        finally:
            for q in self.profiled:
                q.send_signal(signal.SIGUSR2)

    def stop(self) -> None:
        if self.profiled:
            time.sleep(1.0)  # the last dump is written between two loop turns
        for p in reversed(self.procs):
            stop_proc(p)


def start_swarm(tmp: Path, models: Path, body: bytes, procs: list[subprocess.Popen], route: str,
                root: Path = ROOT, name: str | None = None) -> Server:
    """gateway -> worker, each role its own process: store (+DHT bootstrap), orchestrator, worker, gateway.

    route is "swarm", optionally "+inline": the worker then runs a lone request on its
    event loop (worker.inline_run_us), skipping its thread handoff; "+threaded", "+colocated",
    "+aiohttp" (gateway.fast_lane off), "+asyncio" (node.event_loop = asyncio).
    root: the swarmd checkout the daemons run from (--compare: another one, same run)."""
    server = name or route
    base = tmp / server
    _, *extras = route.split("+")
    env = swarmd_env(PYTHONPATH=str(root))
    if "inline" in extras:
        env["SWARMD_WORKER_INLINE_RUN_US"] = "5000"
    if "threaded" in extras:  # every run in an executor thread (worker.inline_run_us = 0, the old default)
        env["SWARMD_WORKER_INLINE_RUN_US"] = "0"
    if "aiohttp" in extras:  # every request through aiohttp: the lean lane off (gateway.fast_lane)
        env["SWARMD_GATEWAY_FAST_LANE"] = "false"
    if "asyncio" in extras:  # the standard event loop instead of uvloop (node.event_loop)
        env["SWARMD_EVENT_LOOP"] = "asyncio"
    role_env: dict[str, dict[str, str]] = {}
    for extra in extras:  # "+set:SWARMD_X=V": this route's daemons; "+gateway-set:..."/"+worker-set:...": one of them
        who, sep, kv = extra.partition("set:")
        if sep and who in ("", "gateway-", "worker-"):
            k, _, v = kv.partition("=")
            if who:
                role_env.setdefault(who[:-1], {})[k] = v
            else:
                env[k] = v
    colocated = "colocated" in extras  # gateway and worker in one process: no RPC hop on the data path
    gw_roles = "gateway,worker" if colocated else "gateway"
    cmd = [sys.executable, "-m", "swarmd", "--log-format", "json", "--log-level", "INFO"]
    local: list[subprocess.Popen] = []

    prof = os.environ.get("BENCH_GATEWAY_PROFILE")  # a path: run gateway and worker under cProfile, dump there

    def start(name: str, *args: str) -> tuple[subprocess.Popen, Path]:
        log = base / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        argv = cmd
        if prof and name in ("gateway", "worker"):
            # CPU-time profile (not wall time: on a shared box wall time is mostly waiting for a core)
            # profiled only while the load runs: SIGUSR1 starts it, SIGUSR2 stops it and dumps the stats
            runner = ("import cProfile, signal, sys, time; from swarmd.cli import main; "
                      "p = cProfile.Profile(time.process_time); "
                      "signal.signal(signal.SIGUSR1, lambda *a: p.enable()); "
                      "signal.signal(signal.SIGUSR2, lambda *a: (p.disable(), p.dump_stats(sys.argv[1]))); "
                      "sys.exit(main(sys.argv[2:]))")
            argv = [sys.executable, "-c", runner, f"{prof}.{server}.{name}", *cmd[3:]]
        p = start_proc([*argv, "--data-dir", str(base / name), *args], {**env, **role_env.get(name, {})}, log)
        procs.append(p)
        local.append(p)
        return p, log

    try:
        port = free_port()  # before the other daemons bind their ephemeral ports
        p, log = start("store", "--role", "bootstrap,store")
        dht = json.loads(wait_log(log, r'\{[^\n]*"event": "ready"[^\n]*\}', p).group(0))["ports"]["dht"]
        boot = ("--bootstrap", f"127.0.0.1:{dht}")
        waits = [start("orchestrator", "--role", "orchestrator", *boot)]
        if not colocated:
            waits.append(start("worker", "--role", "worker", *boot))
        worker = waits[-1][0] if not colocated else None
        gp, glog = start("gateway", "--role", gw_roles, "--http", f"127.0.0.1:{port}", *boot)
        for p, log in [*waits, (gp, glog)]:
            wait_log(log, r'"event": "ready"', p)
        admin = wait_log(glog, r"store it now\): (\S+)", gp).group(1)
        key = provision_swarm(port, admin, models, body)
        profiled = [q for q in local if prof and q.args[0] == sys.executable and q.args[1] == "-c"]
        out = Server(server, port, {"x-api-key": key}, gp.pid, list(local), profiled)
        out.worker_pid = worker.pid if worker is not None else None
        return out
    except BaseException:
        for p in reversed(local):
            stop_proc(p)
        raise


def start_standalone(tmp: Path, models: Path, procs: list[subprocess.Popen], root: Path, suffix: str,
                     grpc: bytes | None) -> list[Server]:
    """A standalone gateway (onnxruntime in its process) run from the checkout `root`: the row
    "gateway" (HTTP JSON) and, given the serialized ModelInferRequest `grpc`, the row
    "gateway grpc" (gRPC ModelInfer on the same process), each named with `suffix`. The
    access log is off (gateway.access_log), for both rows: the rows measure serving, and
    the `main` the run compares with may not log gRPC calls."""
    data = tmp / f"gw{suffix}"
    key = create_key(data)
    port, gport = free_port(), free_port()
    args = [sys.executable, "-m", "swarmd", "--role", "gateway", "--http", f"127.0.0.1:{port}",
            "--data-dir", str(data), "--log-level", "WARNING"]
    if grpc is not None:
        args += ["--grpc", f"127.0.0.1:{gport}"]
    p = start_proc(args, swarmd_env(SWARMD_GATEWAY_LOCAL_MODELS_DIR=str(models), SWARMD_GATEWAY_ACCESS_LOG="false",
                                    PYTHONPATH=str(root)), tmp / f"gateway{suffix}.log")
    procs.append(p)
    wait_http(port, p)
    out = [Server(f"gateway{suffix}", port, {"x-api-key": key}, p.pid, [p])]
    if grpc is not None:
        wait_http(gport, p)
        out.append(Server(f"gateway grpc{suffix}", gport, {"x-api-key": key}, p.pid, [], grpc=grpc))
    return out


def provision_swarm(port: int, admin: str, models: Path, body: bytes) -> str:
    """Through a fresh swarm's gateway: create the bench's infer key (no rate limit to speak of), push
    the MLP as mlp:1 and retry one inference with that key until the swarm serves it. Returns the key."""
    import urllib.error
    import urllib.request

    def post(path: str, data: bytes, ctype: str, key: str = admin) -> tuple[int, bytes]:
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                     headers={"x-api-key": key, "Content-Type": ctype})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    status, out = post("/api/v1/keys", json.dumps({"name": "bench", "permissions": ["infer"],
                                                   "rate_limit_rps": 1e6, "rate_limit_burst": 1e6}).encode(),
                       "application/json")
    if status != 201:
        raise RuntimeError(f"creating the bench key failed: {status} {out[:200]!r}")
    key = json.loads(out)["key"]
    model = (models / "mlp" / "1" / "model.onnx").read_bytes()
    deadline = time.monotonic() + 60
    while post("/api/v1/models?name=mlp&version=1", model, "application/octet-stream")[0] != 201:
        if time.monotonic() > deadline:
            raise RuntimeError("upload through the gateway never succeeded")
        time.sleep(0.5)
    while post("/v2/models/mlp/infer", body, "application/json", key)[0] != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("inference through the swarm never succeeded")
        time.sleep(0.5)
    return key


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=4.0, help="seconds of load per server, connection count and round")
    ap.add_argument("--rounds", type=int, default=5,
                    help="interleaved rounds: each measures every server at every connection count once")
    ap.add_argument("--conns", default="1,16,64")
    ap.add_argument("--routes", default="swarm,swarm+threaded,swarm+colocated",
                    help="swarm layouts to measure (+inline: worker.inline_run_us = 5000 instead of "
                         "the default 2000; +threaded: = 0, every run in a thread; "
                         "+colocated: gateway and worker share one process; +aiohttp: the gateway's lean "
                         "lane off; +asyncio: the standard loop instead of uvloop; +set:SWARMD_X=V: that "
                         "environment for this route's daemons (+gateway-set:, +worker-set: for one of them), "
                         "e.g. swarm,swarm+gateway-set:SWARMD_CONFIG=poll.toml)")
    ap.add_argument("--set", action="append", default=[], metavar="SWARMD_X=V",
                    help="environment for every swarmd process of the run (A/B a setting in one run)")
    ap.add_argument("--standalone", default="fastapi,gateway,grpc",
                    help="single-process servers to measure: fastapi (the baseline), gateway (local models, "
                         "HTTP JSON), grpc (the same gateway's gRPC ModelInfer, its row 'gateway grpc')")
    ap.add_argument("--compare", metavar="DIR", type=Path,
                    help="another swarmd checkout (e.g. main before a change): each route and the standalone "
                         "gateway also run from it, as ROW@before, in the same interleaved rounds")
    args = ap.parse_args()
    for kv in args.set:
        k, _, v = kv.partition("=")
        DAEMON_ENV[k] = v
    standalone = set(args.standalone.split(",")) if args.standalone else set()
    conns = [int(c) for c in args.conns.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    procs: list[subprocess.Popen] = []
    servers: list[Server] = []
    slices: dict[str, dict[str, list[dict[str, float]]]] = {}
    ratios: dict[str, dict[str, list[float]]] = {}
    loads: list[float] = []
    try:
        models = tmp / "models"
        (models / "mlp" / "1").mkdir(parents=True)
        model = models / "mlp" / "1" / "model.onnx"
        build_mlp(model)
        rng = np.random.default_rng(1)
        body_doc = {"inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32",
                                "data": rng.random(784).astype(np.float32).tolist()}]}
        body = json.dumps(body_doc).encode()
        grpc_msg = infer_message(body_doc)
        ceiling = direct_ort(model, body_doc)

        if "fastapi" in standalone:  # baseline: FastAPI + onnxruntime
            app = tmp / "fastapi_app.py"
            app.write_text(FASTAPI_APP)
            port = free_port()
            p = start_proc([sys.executable, str(app), str(model), str(port)], swarmd_env(), tmp / "fastapi.log")
            procs.append(p)
            wait_http(port, p)
            servers.append(Server("fastapi", port, {}, p.pid, [p]))

        if "gateway" in standalone:  # gateway, standalone (onnxruntime in the gateway process)
            for root, suffix in [(ROOT, "")] + ([(args.compare.resolve(), "@before")] if args.compare else []):
                servers += start_standalone(tmp, models, procs, root, suffix, grpc_msg if "grpc" in standalone else None)

        if swarm_available():
            for route in args.routes.split(",") if args.routes else []:
                for root, name in [(ROOT, route)] + ([(args.compare.resolve(), f"{route}@before")] if args.compare else []):
                    try:
                        servers.append(start_swarm(tmp, models, body, procs, route, root, name))
                    except RuntimeError as e:
                        print(f"swarm route {name}: not measured: {e}", file=sys.stderr)

        for s in servers:  # one short warm-up each: first requests load models, fill caches
            measure(s.port, body, 1, 0.5, s.headers, None, s.grpc)
        for r in range(args.rounds):
            loads.append(os.getloadavg()[0])
            for c in conns:
                order = servers[r % len(servers):] + servers[:r % len(servers)] if servers else []
                got = {s.name: s.measure(body, c, args.seconds) for s in order}
                for name, res in got.items():
                    slices.setdefault(name, {}).setdefault(str(c), []).append(res)
                    if "fastapi" in got and got["fastapi"]["rps"] > 0:
                        ratios.setdefault(name, {}).setdefault(str(c), []).append(res["rps"] / got["fastapi"]["rps"])
            print(f"round {r + 1}/{args.rounds} done, load average {loads[-1]:.2f}", file=sys.stderr)
        loads.append(os.getloadavg()[0])
    finally:
        for s in servers:
            s.stop()
        for p in procs:
            stop_proc(p)
        shutil.rmtree(tmp, ignore_errors=True)

    def med(xs: list[float]) -> float:
        return float(np.median(xs)) if xs else 0.0

    results: dict[str, dict[str, dict[str, Any]]] = {}
    for name, by_c in slices.items():
        results[name] = {}
        for c, runs in by_c.items():
            rs = ratios.get(name, {}).get(c, [])
            results[name][c] = {
                "rps": round(med([x["rps"] for x in runs]), 1),
                "p50_ms": round(med([x["p50_ms"] for x in runs]), 3),
                "p99_ms": round(med([x["p99_ms"] for x in runs]), 3),
                "server_cpu_us_per_req": round(med([x.get("server_cpu_us_per_req", 0.0) for x in runs]), 1),
                **({"worker_cpu_us_per_req": round(med([x["worker_cpu_us_per_req"] for x in runs]), 1)}
                   if "worker_cpu_us_per_req" in runs[0] else {}),
                "errors": sum(x["errors"] for x in runs),
                "error_statuses": sorted({e for x in runs for e in x["error_statuses"]}),
                "ratio_to_fastapi": round(med(rs), 3) if rs else None,
                "ratio_range": [round(min(rs), 3), round(max(rs), 3)] if rs else None,
                "rounds": [x["rps"] for x in runs],
                "cpu_rounds": [x.get("server_cpu_us_per_req", 0.0) for x in runs],
            }

    print(f"direct onnxruntime, batch 1: {ceiling:,.0f} inferences/s (the ceiling)")
    print(f"medians of {args.rounds} interleaved rounds of {args.seconds:g} s each; ratio: median of the per-round "
          f"ratios to FastAPI (range after); load average {min(loads, default=0):.2f}-{max(loads, default=0):.2f}")
    print("cpu/req: CPU time of the server process per request (swarm-*: the gateway process, "
          "which for +colocated includes the worker); worker: the worker process's, in two-process layouts")
    print(f"{'server':<22} {'conns':>5} {'req/s':>9} {'ratio':>18} {'p50 ms':>8} {'p99 ms':>8} {'cpu/req us':>10} "
          f"{'worker us':>9} {'errors':>6}")
    for name, by_c in results.items():
        for c, r in by_c.items():
            ratio = "" if r["ratio_to_fastapi"] is None else \
                f"{r['ratio_to_fastapi']:.2f} ({r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f})"
            worker = f"{r['worker_cpu_us_per_req']:,.0f}" if "worker_cpu_us_per_req" in r else ""
            print(f"{name:<22} {c:>5} {r['rps']:>9,.0f} {ratio:>18} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
                  f"{r['server_cpu_us_per_req']:>10,.0f} {worker:>9} {r['errors']:>6}")
    # issue 20's target: the standalone gateway's gRPC ModelInfer over its own HTTP JSON route, per round
    # (the two rows of a round run back to back, under the same load) and as a ratio of the medians
    grpc_ratio: dict[str, dict[str, dict[str, Any]]] = {}
    for name in [n for n in slices if n.startswith("gateway grpc")]:
        http = name.replace("gateway grpc", "gateway")
        for c, runs in slices[name].items():
            base = slices.get(http, {}).get(c, [])
            per = [g["rps"] / h["rps"] for g, h in zip(runs, base, strict=True) if h["rps"]]
            cpu = [h["server_cpu_us_per_req"] / g["server_cpu_us_per_req"] for g, h in zip(runs, base, strict=True)
                   if g.get("server_cpu_us_per_req")]
            g, h, f = results[name][c], results.get(http, {}).get(c), results.get("fastapi", {}).get(c)
            if h is None or not per:
                continue
            grpc_ratio.setdefault(http, {})[c] = {
                "grpc_rps": g["rps"], "http_json_rps": h["rps"], "fastapi_rps": f["rps"] if f else None,
                "ratio_of_medians": round(g["rps"] / h["rps"], 3) if h["rps"] else None,
                "median_per_round_ratio": round(med(per), 3), "per_round_ratios": [round(x, 3) for x in per],
                "cpu_ratio": round(med(cpu), 3) if cpu else None,
                "grpc_cpu_us_per_req": g["server_cpu_us_per_req"], "http_json_cpu_us_per_req": h["server_cpu_us_per_req"],
            }
    for http, by_c in grpc_ratio.items():
        for c, r in by_c.items():
            fa = f", FastAPI {r['fastapi_rps']:,.0f}" if r["fastapi_rps"] else ""
            print(f"gRPC ModelInfer vs HTTP JSON ({http}, {c} conns): {r['grpc_rps']:,.0f} vs {r['http_json_rps']:,.0f} "
                  f"req/s{fa}; ratio of medians {r['ratio_of_medians']:.2f}x, median of per-round ratios "
                  f"{r['median_per_round_ratio']:.2f}x (rounds: {', '.join(f'{x:.2f}' for x in r['per_round_ratios'])}); "
                  f"gateway CPU {r['grpc_cpu_us_per_req']:,.0f} vs {r['http_json_cpu_us_per_req']:,.0f} us/req; "
                  f"load average {min(loads, default=0):.2f}-{max(loads, default=0):.2f}")
    if grpc_ratio:
        print("target (issue 20): gRPC ModelInfer at 64 concurrent streams >= 1.5x the HTTP JSON route's req/s")
    print(json.dumps({"bench": "gateway", "direct_ort_per_s": round(ceiling, 1), "rounds": args.rounds,
                      "seconds": args.seconds, "loadavg": [round(x, 2) for x in loads], "results": results,
                      "grpc_over_http_json": grpc_ratio,
                      "baseline": {"fastapi_ort": results.get("fastapi")}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
