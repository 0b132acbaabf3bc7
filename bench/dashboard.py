"""What one dashboard viewer costs the gateway: CPU of the gateway process with and without
a reader of /api/v1/dashboard/feed, on a three-process swarm (gateway node + two workers).

    python bench/dashboard.py [--seconds 20]

Baseline in the same run: the same gateway process over the same time with nobody watching
(its DHT, health checks and announcements still run). Also: time from connect to the first
snapshot that lists every node, and the interval between snapshots. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def start(*args: str, log: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), SWARMD_TRUST_OPEN="true")  # a lab swarm: every key admitted
    return subprocess.Popen([sys.executable, "-m", "swarmd", "--log-format", "json", "--log-level", "INFO", *args],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)


def wait_line(log: Path, needle: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if needle in line:
                return line
        time.sleep(0.2)
    raise RuntimeError(f"no {needle!r} in {log}:\n{log.read_text()[-2000:]}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="swarmd-bench-dash-"))
    procs: list[subprocess.Popen[str]] = []
    try:
        g = start("--role", "bootstrap,store,orchestrator,gateway", "--http", "127.0.0.1:0",
                  "--data-dir", str(tmp / "g"), log=tmp / "g.log")
        procs.append(g)
        ready = json.loads(wait_line(tmp / "g.log", '"event": "ready"'))
        boot, port = f"127.0.0.1:{ready['ports']['dht']}", ready["ports"]["http"]
        admin = wait_line(tmp / "g.log", "first admin API key (shown once").rsplit(" ", 1)[-1].strip()
        for i in (1, 2):
            procs.append(start("--role", "worker", "--bootstrap", boot, "--data-dir", str(tmp / f"w{i}"),
                               log=tmp / f"w{i}.log"))
            wait_line(tmp / f"w{i}.log", '"event": "ready"')
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/keys", method="POST",
                                     data=json.dumps({"name": "viewer", "permissions": ["models:read"]}).encode(),
                                     headers={"x-api-key": admin, "content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            key = json.loads(r.read())["key"]
        time.sleep(3.0)  # let start-up work settle

        c0, t0 = cpu_seconds(g.pid), time.monotonic()
        time.sleep(args.seconds)
        idle = (cpu_seconds(g.pid) - c0) / (time.monotonic() - t0) * 100

        frames: list[tuple[float, int]] = []
        stop = threading.Event()
        t_connect = time.monotonic()

        def read() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/api/v1/dashboard/feed", headers={"x-api-key": key})
            resp = conn.getresponse()
            while not stop.is_set():
                line = resp.fp.readline(1 << 22)
                if not line:
                    break
                if line.startswith(b"data: "):
                    snap = json.loads(line[6:])
                    frames.append((time.monotonic(), sum(1 for n in snap["nodes"] if n["up"])))
            conn.close()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        time.sleep(3.0)  # the first crawl and the reader's own start-up are not steady state
        c1, t1 = cpu_seconds(g.pid), time.monotonic()
        time.sleep(args.seconds)
        watched = (cpu_seconds(g.pid) - c1) / (time.monotonic() - t1) * 100
        stop.set()
        first_full = next((t - t_connect for t, up in frames if up >= 3), None)
        steady = [b[0] - a[0] for a, b in zip(frames, frames[1:], strict=False) if a[0] >= t1]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    extra = watched - idle
    gap = max(steady) if steady else None
    print(f"{'gateway CPU, nobody watching (baseline)':<44}{idle:>8.2f} % of a core")
    print(f"{'gateway CPU, one dashboard viewer':<44}{watched:>8.2f} % of a core")
    print(f"{'cost of the viewer (target < 2 %)':<44}{extra:>8.2f} %")
    print(f"{'connect -> snapshot listing all 3 nodes':<44}{(first_full or float('nan')) * 1000:>8.0f} ms (target <= 1000)")
    print(f"{'longest gap between snapshots':<44}{(gap or float('nan')) * 1000:>8.0f} ms (target <= 2000)")
    print(json.dumps({"bench": "dashboard", "gateway_cpu_pct_one_viewer": round(watched, 2),
                      "baseline": {"gateway_cpu_pct_no_viewer": round(idle, 2)},
                      "viewer_cost_pct": round(extra, 2),
                      "first_full_snapshot_ms": None if first_full is None else round(first_full * 1000, 1),
                      "max_snapshot_gap_ms": None if gap is None else round(gap * 1000, 1),
                      "seconds": args.seconds, "load": os.getloadavg()[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
