"""NAT-traversal benchmark inside the NAT lab: the whole matrix of NAT pairs.

Per pair, real daemons (bootstrap+relay on inet, a public peer, lan-a and lan-b behind
the two routers, started with the CLI) and, per trial, `swarmd nat probe --fresh
--watch` from lan-a to lan-b: the path that carried the first call, the time to the
first RPC answer, the time until the path was final (punched, or relayed where nothing
better came), the final path, and every failed call or stream across the move; then a
stream on the final path (Noise + RPC end to end). The same-run baseline is plain TCP
(no Noise, no RPC) from lan-a to lan-b through the same two routers (a port forward on
nat-b), one way, the same size.

    sudo python bench/nat.py [--trials N] [--mib M] [--pairs cone-cone,restricted-symmetric]

The pair `cone-cone+upnp` runs miniupnpd on nat-b (tests/natlab/upnpd.py; Debian
`miniupnpd-nftables`): lan-b maps its port on the router and is reached on it (`mapped`).
The pair `cone-cone+udp` runs every daemon with `nat.punch_tcp = false`: the punched path
is the UDP punch with UDX on it (`punched-udp`), the path a pair takes where no TCP punch
meets.

The ratio to plain TCP is given two ways: the ratio of the two medians, and the median of
the per-trial ratios (each trial's stream beside the plain TCP run right after it, which
cancels most of the drift of a shared machine).

Needs root, `ip` and `nft` (it builds network namespaces); otherwise it says why and
prints a JSON line with "skipped". Prints a table, then one JSON line with the figures
and the baseline. The default (3 trials, 100 MiB) takes a few minutes; --trials 10 is
the full run. A path too slow to carry --mib in 20 s (aiortc's SCTP under load) is
measured with 8 MiB so a run stays bounded; the JSON says which size was used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.natlab.lab import LANB_IP, NATB_WAN, NatLab, unavailable_reason  # noqa: E402
from tests.natlab.swarmlab import probe, start_swarm  # noqa: E402

PAIRS = [
    ("cone", "cone"),
    ("restricted", "restricted"),
    ("fullcone", "fullcone"),
    ("restricted", "symmetric"),
    ("cone", "symmetric"),
    ("symmetric", "symmetric"),
    ("cone", "cone+upnp"),  # nat-b runs miniupnpd (UPnP-IGD, NAT-PMP, PCP): lan-b maps its port
    ("cone", "cone+udp"),  # no TCP punch: the UDP punch + UDX path
]
WATCH = 20.0  # s a trial keeps calling while waiting for the final path
SMALL_MIB = 8
BASE_PORT = 7300
# big probes need a bigger sink budget than a daemon's default
BENCH_ENV = {"SWARMD_NAT_PROBE_MAX_BYTES": str(1 << 30), "SWARMD_NAT_SINK_RATE": str(1 << 30)}

SERVER = (
    "import socket,sys,time,json\n"
    "s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
    "s.bind(('0.0.0.0',int(sys.argv[1])));s.listen(1);print('listening',flush=True)\n"
    "c,_=s.accept();n=0\n"
    "while True:\n"
    " d=c.recv(1<<20)\n"
    " if not d: break\n"
    " n+=len(d)\n"
    "c.sendall(n.to_bytes(8,'big'));c.close();print(json.dumps({'bytes':n}),flush=True)\n"
)
CLIENT = (
    "import socket,sys,time,json\n"
    "n=int(sys.argv[3]);buf=bytes(1<<20);t0=time.monotonic()\n"
    "c=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=60);t1=time.monotonic();sent=0\n"
    "while sent<n:\n"
    " sent+=c.send(memoryview(buf)[:min(len(buf),n-sent)])\n"
    "c.shutdown(socket.SHUT_WR);got=int.from_bytes(c.recv(8),'big');t2=time.monotonic()\n"
    "print(json.dumps({'bytes':got,'setup_ms':round((t1-t0)*1000,2),'mib_s':round(n/(t2-t1)/(1<<20),2)}))\n"
)


async def plain_tcp(lab: NatLab, port: int, size: int) -> dict:
    """Baseline: plain TCP lan-a -> nat-a -> inet -> nat-b (port forward) -> lan-b, one way."""
    lab.run("nat-b", ["nft", "add", "rule", "ip", "natlab", "prerouting", "iifname", "wan", "tcp", "dport",
                      str(port), "dnat", "ip", "to", f"{LANB_IP}:{port}"])
    srv = await lab.spawn("lan-b", [sys.executable, "-c", SERVER, str(port)])
    await srv.wait_for("listening")
    res = lab.run("lan-a", [sys.executable, "-c", CLIENT, NATB_WAN, str(port), str(size)], timeout=300)
    await srv.wait(60)
    return json.loads(res.stdout.strip().splitlines()[-1])


def med(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 2) if xs else None


async def run_pair(lab: NatLab, tmp: Path, modes: tuple[str, str], trials: int, mib: int, port: int) -> dict:
    try:
        mode_b, _, extra = modes[1].partition("+")
        env = {**BENCH_ENV, **({"SWARMD_NAT_PUNCH_TCP": "false"} if extra == "udp" else {})}
        world = await start_swarm(lab, tmp, modes[0], mode_b, env=env, upnp=("nat-b",) if extra == "upnp" else ())
        if extra == "upnp":  # trials start once lan-b's records lead with the mapped address
            await world["b"].wait_event("mapped_address_announced", 60)
        runs, base = [], []
        for i in range(trials):
            out = probe(lab, world, "b", 0, watch=WATCH, fresh=True)
            w = out["watch"]
            size = mib
            first = probe(lab, world, "b", SMALL_MIB << 20)  # pooled: the final path
            if first["stream"]["mib_s"] and first["stream"]["mib_s"] < mib / 20:  # the full size would take > 20 s
                size = SMALL_MIB
                stream = first["stream"]
            else:
                stream = probe(lab, world, "b", mib << 20)["stream"]
            runs.append({
                "first_path": out["first_path"], "first_rpc_ms": out["first_rpc_ms"],
                "final_path": w["final_path"], "final_ms": w["final_ms"],
                "failed": w["calls_failed"] + w["streams_failed"], "calls": w["calls_ok"] + w["streams_ok"],
                "mib": size, "mib_s": stream["mib_s"] if stream["ok"] else None, "cipher": stream.get("cipher"),
            })
            base.append(await plain_tcp(lab, port + i, mib << 20))
            if runs[-1]["mib_s"] and base[-1]["mib_s"]:
                runs[-1]["ratio"] = round(runs[-1]["mib_s"] / base[-1]["mib_s"], 3)
        # control: the same daemons over direct TCP to the public peer (what our stack carries on TCP here)
        direct = probe(lab, world, "pub", mib << 20)["stream"]["mib_s"]
        return {"runs": runs, "baseline": base, "direct": direct}
    finally:
        await lab.stop_processes()
        lab.down()


def summary(pair: str, r: dict) -> dict:
    runs, base = r["runs"], r["baseline"]
    finals = [x["final_path"] for x in runs]
    good = sum(1 for p in finals if p and p != "relayed")
    out = {
        "trials": len(runs),
        "first_path": sorted({x["first_path"] for x in runs}),
        "first_rpc_ms_p50": med([x["first_rpc_ms"] for x in runs]),
        "first_rpc_ms_max": max(x["first_rpc_ms"] for x in runs),
        "final_path": {p: finals.count(p) for p in sorted(set(finals), key=str)},
        "final_not_relayed": good,
        "final_ms_p50": med([x["final_ms"] for x in runs]),
        "failed_calls": sum(x["failed"] for x in runs),
        "calls_across_moves": sum(x["calls"] for x in runs),
        "stream_mib": max(x["mib"] for x in runs),
        "mib_s_p50": med([x["mib_s"] for x in runs]),
        "plain_tcp_mib_s_p50": med([b["mib_s"] for b in base]),
        "plain_tcp_setup_ms_p50": med([b["setup_ms"] for b in base]),
        "daemon_direct_tcp_mib_s": r["direct"],
        "ratio_p50_per_trial": med([x.get("ratio") for x in runs]),
        "mib_s_min_max": [min((x["mib_s"] for x in runs if x["mib_s"]), default=None),
                          max((x["mib_s"] for x in runs if x["mib_s"]), default=None)],
        "cipher": sorted({str(x.get("cipher")) for x in runs}),
    }
    if out["mib_s_p50"] and out["plain_tcp_mib_s_p50"]:
        out["ratio_to_plain_tcp"] = round(out["mib_s_p50"] / out["plain_tcp_mib_s_p50"], 2)
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=3, help="trials per pair (default 3; the issue's full run is 10)")
    ap.add_argument("--mib", type=int, default=100, help="MiB streamed on the final path (default 100)")
    ap.add_argument("--pairs", default="",
                    help="comma-separated MODE_A-MODE_B, MODE_B may end in +upnp (default: the whole matrix)")
    args = ap.parse_args()
    reason = unavailable_reason()
    if reason is not None:
        print(f"bench/nat.py skipped: {reason}")
        print(json.dumps({"skipped": reason}))
        return
    pairs = [tuple(p.split("-", 1)) for p in args.pairs.split(",") if p] or PAIRS
    lab = NatLab(f"bn{os.getpid() % 10000}-")
    figures: dict[str, dict] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for n, modes in enumerate(pairs):
            name = f"{modes[0]}-{modes[1]}"
            raw = await run_pair(lab, Path(tmp) / name, modes, args.trials, args.mib, BASE_PORT + 20 * n)
            figures[name] = summary(name, raw)
            print(f"  {name}: {json.dumps(figures[name])}", file=sys.stderr, flush=True)
    head = (f"{'pair':<22}{'first path':<22}{'1st RPC p50/max':>17}{'final path (n)':>30}{'final p50':>11}"
            f"{'failed':>8}{'MiB/s p50':>11}{'plain TCP':>11}{'ratio':>7}{'/trial':>8}{'direct':>8}")
    print(head)
    for name, f in figures.items():
        finals = ",".join(f"{k}:{v}" for k, v in f["final_path"].items())
        print(f"{name:<22}{','.join(f['first_path']):<22}{f['first_rpc_ms_p50']:>9.1f}/{f['first_rpc_ms_max']:<7.1f}"
              f"{finals:>30}{(f['final_ms_p50'] or 0):>9.1f}ms{f['failed_calls']:>8}"
              f"{(f['mib_s_p50'] or 0):>11.1f}{(f['plain_tcp_mib_s_p50'] or 0):>11.1f}{f.get('ratio_to_plain_tcp', 0):>7.2f}"
              f"{(f['ratio_p50_per_trial'] or 0):>8.2f}"
              f"{(f['daemon_direct_tcp_mib_s'] or 0):>8.1f}")
    load = [round(x, 2) for x in (*load_before, *os.getloadavg())]
    print(f"load average (1/5/15 min) before: {load[0]}/{load[1]}/{load[2]}, after: {load[3]}/{load[4]}/{load[5]}")
    print(f"trials per pair: {args.trials}; stream: {args.mib} MiB on the final path (8 MiB where that takes > 20 s);")
    print("first RPC = connect + one RPC answered (`nat.probe --fresh`); final = when the path stopped changing;")
    print("failed = calls and streams that failed while the path moved; plain TCP = same routers, no Noise/RPC;")
    print("direct = the same daemons' stream over direct TCP to the public peer (control for the stack's own cost);")
    print("ratio = p50 MiB/s over p50 plain TCP; /trial = median of each trial's stream over its own plain TCP run.")
    baseline = {k: {"plain_tcp_mib_s_p50": f["plain_tcp_mib_s_p50"], "plain_tcp_setup_ms_p50": f["plain_tcp_setup_ms_p50"],
                    "daemon_direct_tcp_mib_s": f["daemon_direct_tcp_mib_s"]} for k, f in figures.items()}
    print(json.dumps({"figures": figures, "baseline": baseline, "trials": args.trials, "mib": args.mib,
                      "loadavg_before": load[:3], "loadavg_after": load[3:]}))


if __name__ == "__main__":
    asyncio.run(main())
