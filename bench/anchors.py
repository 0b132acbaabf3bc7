"""swarmd beside its anchors, in one run: the Hyperswarm stack and FastAPI + onnxruntime.

    python bench/anchors.py [--rounds 2] [--anchors DIR] [--only rpc,dht,gateway] [--skip-gateway] [--quick]
                            [--loop asyncio|uvloop]

Runs the JavaScript anchor benchmarks (../shared/anchors/hyperswarm: @hyperswarm/rpc,
hyperswarm, hyperdht; copied to a temporary folder and installed there with `npm ci`)
and swarmd's own bench/rpc.py, bench/dht.py and bench/gateway.py, alternately
(anchor, swarmd, anchor, swarmd ... for `--rounds` rounds), so both sides see the
same machine load. Each figure is the median over the rounds; the ratio is
swarmd / anchor, with the direction that counts for it (lower is better for
times, higher for rates). Prints one table; the last line is one JSON object.

Needs node and npm on PATH (Node 20) and the anchors' folder; without them it says
so and measures swarmd's side alone. Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# shared/ lies beside the checkout (../shared from the project root); a git worktree sits deeper
DEFAULT_ANCHORS = next((p / "shared" / "anchors" / "hyperswarm" for p in ROOT.parents
                        if (p / "shared" / "anchors" / "hyperswarm").is_dir()),
                       ROOT.parent / "shared" / "anchors" / "hyperswarm")
STEP_TIMEOUT = 900.0  # one benchmark script; each is bounded by its own loops well below this


def last_json(out: str) -> dict[str, Any]:
    """The last line of a benchmark's output that is one JSON object."""
    for line in reversed(out.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            return json.loads(line)
    raise RuntimeError("no JSON line in the output:\n" + out[-2000:])


def run_step(argv: list[str], cwd: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=STEP_TIMEOUT,
                          stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    print(f"  ran {' '.join(Path(a).name if '/' in a else a for a in argv)} "
          f"({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
    return last_json(proc.stdout)


def install_anchors(src: Path) -> Path | None:
    """A writable copy of the anchors with node_modules installed, or None (said why)."""
    if not src.is_dir():
        print(f"anchors: {src} not found; measuring swarmd alone", file=sys.stderr)
        return None
    if shutil.which("node") is None or shutil.which("npm") is None:
        print("anchors: node/npm not on PATH; measuring swarmd alone", file=sys.stderr)
        return None
    dst = Path(tempfile.mkdtemp(prefix="swarmd-anchors-")) / "hyperswarm"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("node_modules"))
    for p in [dst, *dst.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)
    proc = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=dst, capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0:
        print(f"anchors: npm ci failed; measuring swarmd alone:\n{proc.stderr[-1500:]}", file=sys.stderr)
        shutil.rmtree(dst.parent, ignore_errors=True)
        return None
    return dst


# One row of the table: how to read swarmd's figure and the anchor's from their JSON, and
# whether lower or higher is better. `None` readers mean "not measured in this run".
Reader = Callable[[dict[str, Any]], float]


def _cpu_sum(per_side: dict[str, float]) -> float:
    return float(per_side["client"] + per_side["server"])


def dig(doc: dict[str, Any], *path: str) -> float:
    cur: Any = doc
    for key in path:
        cur = cur[key]
    return float(cur)


ROWS: list[tuple[str, str, str, Reader, Reader, bool, str]] = [
    # label, swarmd step, anchor step, swarmd reader, anchor reader, lower_is_better, target
    ("RPC echo 64 B p50 (us)", "rpc", "rpc-latency",
     lambda d: dig(d, "rpc", "p50_us"), lambda d: dig(d, "rtt_us", "p50"), True, "<= 0.8x"),
    ("RPC req/s, 64 in flight", "rpc", "rpc-throughput",
     lambda d: dig(d, "rpc", "req_per_s"), lambda d: dig(d, "req_per_s"), False, ">= 2x"),
    ("one bulk stream (MiB/s)", "rpc", "stream",
     lambda d: dig(d, "rpc", "bulk_mib_s"), lambda d: dig(d, "mib_per_s"), False, ">= 5x"),
    # CPU both processes spent per call (client + server): what a loaded machine shifts less than rates
    ("  CPU/call, echo sequential (us)", "rpc", "rpc-latency",
     lambda d: _cpu_sum(d["rpc"]["cpu_us_per_call_seq"]),
     lambda d: (d["client_cpu"]["total_pct"] + d["server_cpu"]["total_pct"]) / 100 / d["seq_calls_per_s"] * 1e6,
     True, "info"),
    ("  CPU/call, 64 in flight (us)", "rpc", "rpc-throughput",
     lambda d: _cpu_sum(d["rpc"]["cpu_us_per_call_64"]),
     lambda d: (d["client_cpu"]["total_pct"] + d["server_cpu"]["total_pct"]) / 100 * d["seconds"] / d["requests"] * 1e6,
     True, "info"),
    ("DHT lookup first peer, 100 (ms)", "dht", "lookup-100",
     lambda d: dig(d, "figures", "n100", "lookup_fresh_first_p50_ms"),
     lambda d: dig(d, "lookup_first_peer_ms", "p50"), True, "<= 1.0x"),
    ("DHT lookup first peer, 500 (ms)", "dht", "lookup-500",
     lambda d: dig(d, "figures", "n500", "lookup_fresh_first_p50_ms"),
     lambda d: dig(d, "lookup_first_peer_ms", "p50"), True, "<= 1.0x"),
    ("join -> connection p50 (ms)", "dht", "connect",
     lambda d: dig(d, "figures", "swarm_two_process", "join_to_connection_p50_ms"),
     lambda d: dig(d, "join_to_connection_ms", "p50"), True, "<= 1.0x"),
    # the same figures in the layouts bench/dht.py measured before (not the anchors' layout; for trend)
    ("  lookup 100, warm asker (ms)", "dht", "lookup-100",
     lambda d: dig(d, "figures", "n100", "lookup_first_p50_ms"),
     lambda d: dig(d, "lookup_first_peer_ms", "p50"), True, "info"),
    ("  lookup 500, warm asker (ms)", "dht", "lookup-500",
     lambda d: dig(d, "figures", "n500", "lookup_first_p50_ms"),
     lambda d: dig(d, "lookup_first_peer_ms", "p50"), True, "info"),
    ("  join -> connection, one loop (ms)", "dht", "connect",
     lambda d: dig(d, "figures", "swarm", "join_to_connection_p50_ms"),
     lambda d: dig(d, "join_to_connection_ms", "p50"), True, "info"),
]


def gateway_rows(doc: dict[str, Any]) -> list[tuple[str, float, float, str]]:
    """(label, swarmd req/s, FastAPI req/s, target) from one bench/gateway.py run."""
    res = doc["results"]
    base = res.get("fastapi", {})
    out = []
    for name, label, targets in (("swarm", "gateway->worker, 2 processes", {"1": ">= 1.2x", "64": ">= 2.0x"}),
                                 ("swarm+colocated", "all roles, 1 process", {"1": ">= 1.3x"})):
        for conns, target in targets.items():
            if name in res and conns in res[name] and conns in base:
                out.append((f"{label}, {conns} conn (req/s)", res[name][conns]["rps"], base[conns]["rps"], target))
    return out


def default_loop() -> str:
    """The event loop a node runs when nothing is configured (node.event_loop resolved)."""
    sys.path.insert(0, str(ROOT))
    from swarmd.node.eventloop import loop_factory
    from swarmd.settings import NodeConfig

    return "asyncio" if loop_factory(NodeConfig().event_loop) is None else "uvloop"


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:,.2f}" if v < 100 else f"{v:,.0f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds (median taken)")
    ap.add_argument("--anchors", type=Path, default=DEFAULT_ANCHORS, help="the hyperswarm anchors' folder")
    ap.add_argument("--quick", action="store_true", help="smaller loops on both sides (a smoke run)")
    ap.add_argument("--skip-gateway", action="store_true", help="leave out bench/gateway.py")
    ap.add_argument("--only", default="rpc,dht,gateway",
                    help="comma-separated parts to run: rpc (echo, req/s, bulk), dht (lookups, join), gateway")
    ap.add_argument("--loop", choices=("default", "asyncio", "uvloop"), default="default",
                    help="event loop of bench/rpc.py and bench/dht.py (default: a node's default, node.event_loop)")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    if not parts or parts - {"rpc", "dht", "gateway"}:
        ap.error(f"--only takes some of rpc, dht, gateway; got {args.only!r}")
    if args.skip_gateway:
        parts.discard("gateway")

    anchors = install_anchors(args.anchors)
    py = sys.executable
    loop = args.loop if args.loop != "default" else default_loop()
    rpc_flags = (["--quick"] if args.quick else []) + (["--uvloop"] if loop == "uvloop" else [])
    calls, seconds, trials = ("1000", "2", "10") if args.quick else ("5000", "5", "20")
    ours: dict[str, list[dict[str, Any]]] = {"rpc": [], "dht": [], "gateway": []}
    theirs: dict[str, list[dict[str, Any]]] = {k: [] for k in
                                               ("rpc-latency", "rpc-throughput", "stream", "lookup-100",
                                                "lookup-500", "connect")}
    js = {
        "rpc-latency": ["bench-rpc.js", "latency", calls, "64"],
        "rpc-throughput": ["bench-rpc.js", "throughput", seconds, "64", "64"],
        "stream": ["bench-stream.js", "128" if args.quick else "512", "64"],
        "lookup-100": ["bench-lookup.js", "100", trials],
        "lookup-500": ["bench-lookup.js", "500", trials],
        "connect": ["bench-connect.js", trials],
    }
    load_before = os.getloadavg()
    try:
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
            if "rpc" in parts:
                if anchors is not None:
                    for step in ("rpc-latency", "rpc-throughput", "stream"):
                        theirs[step].append(run_step(["node", *js[step]], anchors))
                ours["rpc"].append(run_step([py, "bench/rpc.py", *rpc_flags], ROOT))
            if "dht" in parts:
                if anchors is not None:
                    for step in ("lookup-100", "lookup-500", "connect"):
                        theirs[step].append(run_step(["node", *js[step]], anchors))
                ours["dht"].append(run_step([py, "bench/dht.py", "--loop", loop], ROOT))
            if "gateway" in parts:
                ours["gateway"].append(run_step(
                    [py, "bench/gateway.py", "--seconds", "2" if args.quick else "4", "--conns", "1,64",
                     "--routes", "swarm,swarm+colocated"], ROOT))
    finally:
        if anchors is not None:
            shutil.rmtree(anchors.parent, ignore_errors=True)

    table: list[dict[str, Any]] = []
    for label, mine, other, read_mine, read_other, lower, target in ROWS:
        if not ours[mine] and not theirs[other]:
            continue  # a part left out of this run
        s = statistics.median(read_mine(d) for d in ours[mine]) if ours[mine] else None
        a = statistics.median(read_other(d) for d in theirs[other]) if theirs[other] else None
        rounds = [round(read_mine(m) / read_other(o), 3) for m, o in zip(ours[mine], theirs[other], strict=False)]
        table.append({"figure": label, "swarmd": s, "anchor": a, "ratio": (s / a) if s and a else None,
                      "lower_is_better": lower, "target": target, "anchor_name": "hyperswarm",
                      "round_ratios": rounds})
    if ours["gateway"]:
        per_run = [gateway_rows(d) for d in ours["gateway"]]
        for i, (label, _, _, target) in enumerate(per_run[0]):
            s = statistics.median(run[i][1] for run in per_run if len(run) > i)
            a = statistics.median(run[i][2] for run in per_run if len(run) > i)
            table.append({"figure": label, "swarmd": s, "anchor": a, "ratio": s / a if a else None,
                          "lower_is_better": False, "target": target, "anchor_name": "fastapi+onnxruntime"})

    print(f"{'figure':<40}{'swarmd':>12}{'anchor':>12}{'ratio':>8}  {'target':<9}anchor")
    for row in table:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        print(f"{row['figure']:<40}{fmt(row['swarmd']):>12}{fmt(row['anchor']):>12}{ratio:>8}  "
              f"{row['target']:<9}{row['anchor_name']}")
    load_after = os.getloadavg()
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; rounds: {args.rounds}; "
          f"swarmd on {loop}")
    print(json.dumps({"bench": "anchors", "rounds": args.rounds, "event_loop": loop, "table": table,
                      "load_before": load_before[0], "load_after": load_after[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
