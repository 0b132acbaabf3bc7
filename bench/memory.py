"""Memory and start-up of real daemons started through the CLI, beside baselines
measured in the same run (DESIGN.md, "Memory and start-up"):

- bootstrap-only and relay-only nodes: RSS and time to the "ready" line, beside a
  bare `python -c "import asyncio"` process (RSS, time to its first line);
- a worker holding the 784-1024-1024-10 MLP, beside a bare python process that
  holds the same onnxruntime session (same options, same warm-up inferences);
- 10k topic records: the heap figure of bench/dht.py, and the RSS a real
  bootstrap daemon gains when 10k signed records arrive over UDP;
- RSS of a daemon before and after hostile traffic (tests/hostile_traffic.py).

    python bench/memory.py          # a table, then one JSON line
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.hostile_traffic import Load, rss_mb, run_all  # noqa: E402

RUNS = 3  # start-up samples per kind of process
SETTLE = 1.0  # seconds after ready before RSS is read (late allocations land)
WARM = 50  # inferences before the worker / baseline RSS is read


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("SWARMD_")}
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["SWARMD_TRUST_OPEN"] = "true"  # a benchmark lab: every key admitted
    return e


class Proc:
    """A child started with a pipe on stdout; `wait_line` reads until a predicate holds."""

    def __init__(self, args: list[str], extra_env: dict[str, str] | None = None) -> None:
        self.t0 = time.perf_counter()
        self.p = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**env(), **(extra_env or {})}, cwd=str(ROOT),
        )  # fmt: skip
        self.lines: list[str] = []

    def wait_line(self, pred: Any, timeout: float = 60.0) -> tuple[float, str]:
        deadline = time.monotonic() + timeout
        assert self.p.stdout is not None
        while time.monotonic() < deadline:
            line = self.p.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.p.args} exited ({self.p.wait()}):\n" + "".join(self.lines[-30:]))
            self.lines.append(line)
            if pred(line):
                return time.perf_counter() - self.t0, line
        raise RuntimeError(f"{self.p.args}: no expected line within {timeout}s")

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def ready_doc(line: str) -> dict[str, Any] | None:
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    return doc if doc.get("event") == "ready" else None


def start_daemon(roles: str, data_dir: str, extra_env: dict[str, str] | None = None,
                 extra_args: tuple[str, ...] = ()) -> tuple[Proc, float, dict[str, Any]]:  # fmt: skip
    p = Proc([sys.executable, "-m", "swarmd", "--role", roles, "--log-format", "json", "--data-dir", data_dir,
              *extra_args], extra_env)  # fmt: skip
    t, line = p.wait_line(lambda s: ready_doc(s) is not None)
    return p, t, ready_doc(line)  # type: ignore[return-value]


def bare_python() -> tuple[float, float]:
    """Baseline: time to first line and RSS of `python -c "import asyncio"` (kept alive to read RSS)."""
    code = "import asyncio, sys; print('up', flush=True); sys.stdin.readline()"
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdin is not None
    p.stdout.readline()
    t = time.perf_counter() - t0
    time.sleep(SETTLE)
    rss = rss_mb(p.pid)
    p.stdin.close()
    p.wait(10)
    return t, rss


def node_figures(roles: str) -> dict[str, float] | None:
    """Ready time and RSS of a node with only these roles; None when the role is not in this tree."""
    if not (ROOT / "swarmd" / "roles" / f"{roles}.py").exists():
        return None
    times, rss, mods = [], [], []
    for _ in range(RUNS):
        with tempfile.TemporaryDirectory() as d:
            p, t, _doc = start_daemon(roles, d)
            try:
                time.sleep(SETTLE)
                rss.append(rss_mb(p.p.pid))
                times.append(t)
                mods.append(heavy_modules(p.p.pid))
            finally:
                p.stop()
    return {"ready_s": statistics.median(times), "rss_mb": statistics.median(rss), "heavy": sorted(set().union(*mods))}


HEAVY = ("numpy", "onnxruntime", "onnx", "aiohttp", "aiortc", "aioice", "fastapi", "uvicorn", "sklearn")


def heavy_modules(pid: int) -> set[str]:
    """Heavy packages mapped into the process (their shared objects show in /proc/pid/maps)."""
    found = set()
    with open(f"/proc/{pid}/maps") as f:
        text = f.read()
    for name in HEAVY:
        if f"/site-packages/{name}/" in text:
            found.add(name)
    return found


BASELINE_SESSION = r"""
import sys, time
import numpy as np
import onnxruntime as ort
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
opts.inter_op_num_threads = 1
opts.log_severity_level = 3
s = ort.InferenceSession(sys.argv[1], opts, providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).standard_normal((1, 784)).astype(np.float32)
for _ in range(int(sys.argv[2])):
    s.run(None, {"input": x})
print("up", flush=True)
sys.stdin.readline()
"""


def session_baseline(model: Path) -> float:
    """RSS of a bare python process holding the same onnxruntime session, warmed the same way."""
    p = subprocess.Popen([sys.executable, "-c", BASELINE_SESSION, str(model), str(WARM)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert p.stdout is not None and p.stdin is not None
    p.stdout.readline()
    time.sleep(SETTLE)
    base = rss_mb(p.pid)
    p.stdin.close()
    p.wait(10)
    return base


async def worker_figures(model: Path) -> dict[str, float]:
    """Worker RSS with the MLP loaded and warmed, beside a bare process holding the same session."""
    import numpy as np

    from swarmd.rpc import connect

    base = await asyncio.to_thread(session_baseline, model)
    with tempfile.TemporaryDirectory() as d:
        w, t, doc = start_daemon("worker", d, {"SWARMD_WORKER_MODELS": f"mlp={model}"})
        try:
            at_ready = rss_mb(w.p.pid)
            peer = await connect(None, "127.0.0.1", doc["ports"]["rpc"],
                                 remote_public_key=bytes.fromhex(doc["public_key"]), timeout=30)  # fmt: skip
            x = np.random.default_rng(0).standard_normal((1, 784)).astype(np.float32)
            try:
                for _ in range(WARM):
                    await peer.call("runInference", {"model": "mlp", "inputs": {"input": x}}, timeout=30)
            finally:
                await peer.close()
            await asyncio.sleep(SETTLE)
            warm = rss_mb(w.p.pid)
            heavy = sorted(heavy_modules(w.p.pid))
        finally:
            w.stop()
    return {"worker_ready_s": t, "worker_rss_ready_mb": at_ready, "worker_rss_mb": warm,
            "session_process_rss_mb": base, "worker_overhead_mb": warm - base,
            "worker_heavy_modules": heavy}  # fmt: skip


def other_roles() -> dict[str, Any]:
    """One sample each of the other single-role nodes (no target; for the record)."""
    out: dict[str, Any] = {}
    for role in ("store", "orchestrator", "gateway"):
        with tempfile.TemporaryDirectory() as d:
            p, t, _doc = start_daemon(role, d)
            try:
                time.sleep(SETTLE)
                out[f"{role}_ready_s"] = t
                out[f"{role}_rss_mb"] = rss_mb(p.p.pid)
                out[f"{role}_heavy_modules"] = sorted(heavy_modules(p.p.pid))
            finally:
                p.stop()
    return out


async def records_in_daemon(n: int = 10_000) -> dict[str, float]:
    """RSS a real bootstrap daemon gains holding n signed topic records put over UDP.

    A node keeps at most 64 records per source IP, so the puts come from
    127.0.1.x addresses (all loopback on Linux), each first fetching a token.
    """
    import msgpack

    from swarmd.dht.records import make_record, topic_from_name
    from swarmd.node.identity import Identity

    per_source = 50
    now = time.time()
    idents = [Identity.generate() for _ in range(100)]
    recs = [
        make_record(idents[i % 100], topic_from_name(f"t{i // 50}"), [("10.0.0.1", 4000 + i % 1000)],
                    {"state": "ONLINE", "load": 0.5, "models": ["mnist"]}, i, 900, now).to_wire()
        for i in range(n)
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        p, _t, doc = start_daemon("bootstrap", d)
        try:
            port = doc["ports"]["dht"]
            await asyncio.sleep(SETTLE)
            before = rss_mb(p.p.pid)
            stored = 0
            for s_i in range(0, n, per_source):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind((f"127.0.{1 + s_i // per_source // 250}.{1 + s_i // per_source % 250}", 0))
                sock.settimeout(5)
                try:
                    batch = recs[s_i : s_i + per_source]
                    sock.sendto(b"\x00" + os.urandom(20) + msgpack.packb(["topic_get", [b"", batch[0]["t"]]]),
                                ("127.0.0.1", port))  # fmt: skip
                    token = msgpack.unpackb(sock.recv(65536)[21:])["tk"]
                    for r in batch:
                        sock.sendto(b"\x00" + os.urandom(20) + msgpack.packb(["topic_put", [b"", token, r]]),
                                    ("127.0.0.1", port))  # fmt: skip
                        if msgpack.unpackb(sock.recv(65536)[21:]).get("ok"):
                            stored += 1
                finally:
                    sock.close()
            await asyncio.sleep(SETTLE)
            after = rss_mb(p.p.pid)
        finally:
            p.stop()
    return {"records_stored": stored, "records_rss_before_mb": before, "records_rss_after_mb": after,
            "records_daemon_mb": after - before}  # fmt: skip


async def hostile_figures(roles: str = "bootstrap") -> dict[str, Any]:
    """RSS of a daemon before and after each round of hostile traffic, and its warning lines."""
    with tempfile.TemporaryDirectory() as d:
        p, _t, doc = start_daemon(roles, d)
        try:
            await asyncio.sleep(SETTLE)
            before = rss_mb(p.p.pid)
            # drain the daemon's log in a thread so its pipe never blocks it
            reader = asyncio.get_running_loop().run_in_executor(None, p.p.stdout.read)  # type: ignore[union-attr]
            key = bytes.fromhex(doc["public_key"])
            rounds = []
            peak = before
            did: dict[str, Any] = {}
            for _ in range(2):
                # the stream-call errors push each non-reader past the write cap (cut off)
                did = await run_all(doc["ports"]["rpc"], doc["ports"]["dht"], key, Load(nonreader_errors=250_000))
                peak = max(peak, rss_mb(p.p.pid))
                await asyncio.sleep(SETTLE)
                rounds.append(rss_mb(p.p.pid))
            from swarmd.rpc import connect

            peer = await connect(None, "127.0.0.1", doc["ports"]["rpc"], remote_public_key=key, timeout=30)
            pong = await peer.call("ping", timeout=30)
            await peer.close()
        finally:
            p.stop()
        log = (await reader).splitlines()
    warnings = sum(1 for line in log if '"level": "WARNING"' in line or '"WARNING"' in line)
    tracebacks = sum(1 for line in log if "Traceback" in line)
    return {"hostile_rss_before_mb": before, "hostile_rss_after_round1_mb": rounds[0],
            "hostile_rss_after_round2_mb": rounds[-1], "hostile_rss_peak_sampled_mb": peak,
            "hostile_growth_mb": rounds[-1] - before, "hostile_log_lines": len(log),
            "hostile_warning_lines": warnings, "hostile_tracebacks": tracebacks,
            "ping_after": pong, **{f"load_{k}": v for k, v in did.items()}}  # fmt: skip


async def main() -> None:
    from loguru import logger

    logger.remove()  # our own hostile clients log every hang-up; the daemons' logs are theirs
    figures: dict[str, Any] = {}
    bare = [bare_python() for _ in range(RUNS)]
    figures["bare_python_start_s"] = statistics.median(t for t, _ in bare)
    figures["bare_python_rss_mb"] = statistics.median(r for _, r in bare)
    for role in ("bootstrap", "relay"):
        f = node_figures(role)
        figures[f"{role}_ready_s"] = f and f["ready_s"]
        figures[f"{role}_rss_mb"] = f and f["rss_mb"]
        figures[f"{role}_heavy_modules"] = f and f["heavy"]

    sys.path.insert(0, str(ROOT / "bench"))
    from dht import records_memory  # bench/dht.py: the RecordStore heap figure
    from models import mlp_model

    with tempfile.TemporaryDirectory() as d:
        model = Path(d) / "mlp.onnx"
        model.write_bytes(mlp_model((784, 1024, 1024, 10)))
        figures.update(await worker_figures(model))
    figures.update(other_roles())
    figures["records_10k_heap_mb"] = records_memory()
    figures.update(await records_in_daemon())
    figures.update(await hostile_figures())

    def row(name: str, value: Any, unit: str, base: str, target: str) -> None:
        v = "n/a" if value is None else (f"{value:.2f}" if isinstance(value, float) else str(value))
        print(f"{name:<44}{v:>10} {unit:<3} {base:<28}{target}")

    print(f"{'what':<44}{'value':>10}     {'baseline (same run)':<28}target")
    bp = f"bare python {figures['bare_python_rss_mb']:.1f} MB"
    bt = f"bare python {figures['bare_python_start_s']:.2f} s"
    for role in ("bootstrap", "relay"):
        row(f"{role}-only node RSS", figures[f"{role}_rss_mb"], "MB", bp, "<= 50 MB")
        row(f"{role}-only node time to ready", figures[f"{role}_ready_s"], "s", bt, "<= 1 s")
        row(f"{role}-only heavy imports", ",".join(figures[f"{role}_heavy_modules"] or []) or "none", "", "", "none")
    sp = f"session process {figures['session_process_rss_mb']:.1f} MB"
    row("worker RSS (MLP loaded, warm)", figures["worker_rss_mb"], "MB", sp, "<= session + 80 MB")
    row("worker overhead over session process", figures["worker_overhead_mb"], "MB", "", "<= 80 MB")
    row("worker heavy imports", ",".join(figures["worker_heavy_modules"]) or "none", "", "", "numpy,onnxruntime")
    for role in ("store", "orchestrator", "gateway"):
        heavy = ",".join(figures[f"{role}_heavy_modules"]) or "no heavy imports"
        row(f"{role}-only node RSS (for the record)", figures[f"{role}_rss_mb"], "MB", heavy, "")
    row("10k topic records, heap (bench/dht.py)", figures["records_10k_heap_mb"], "MB", "", "<= 20 MB")
    row("10k topic records, daemon RSS gain", figures["records_daemon_mb"], "MB",
        f"{figures['records_stored']} stored over UDP", "<= 20 MB")  # fmt: skip
    row("hostile: RSS before", figures["hostile_rss_before_mb"], "MB", "", "")
    row("hostile: RSS after 2 rounds", figures["hostile_rss_after_round2_mb"], "MB", "", "")
    row("hostile: growth", figures["hostile_growth_mb"], "MB", "", "<= 20 MB")
    row("hostile: RSS right after a round (unsettled)", figures["hostile_rss_peak_sampled_mb"], "MB", "", "")
    row("hostile: non-readers cut off by the daemon", str(figures["load_nonreader_cut_off"]), "", "", "True")
    row("hostile: warning lines / tracebacks",
        f"{figures['hostile_warning_lines']}/{figures['hostile_tracebacks']}", "", "", "bounded / 0")  # fmt: skip
    print(json.dumps(figures))


if __name__ == "__main__":
    asyncio.run(main())
