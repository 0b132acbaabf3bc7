"""NAT-traversal benchmark inside the NAT lab: per path (direct TCP to a public
peer, hole-punched, relayed), the connection setup time and the stream MiB/s of
real daemons (Noise + RPC end to end, `swarmd nat probe`), beside a plain TCP
stream (no Noise, no RPC) between the same lab hosts in the same run.

    sudo python bench/nat.py        # prints a table, then one JSON line

Needs root, `ip` and `nft` (it builds network namespaces); otherwise it says why
and prints a JSON line with "skipped". RUNS runs per path, each in a fresh lab
with fresh daemons (a pooled connection would hide the setup time).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.natlab.lab import PUB_IP, REPO_ROOT, NatLab, unavailable_reason  # noqa: E402
from tests.natlab.swarmlab import probe, start_swarm  # noqa: E402

RUNS = 2
MB = 8
PEER = str(REPO_ROOT / "tests" / "natlab" / "peer.py")
# (name, NAT pair, probe target): what each path needs
SCENARIOS = [
    ("direct", ("symmetric", "symmetric"), "pub"),
    ("punched", ("cone", "cone"), "b"),
    ("relayed", ("symmetric", "symmetric"), "b"),
]


async def plain_tcp(lab: NatLab, port: int) -> dict:
    """Baseline: plain TCP lan-a -> pub through nat-a, same bytes, both ways at once."""
    srv = await lab.spawn("pub", [sys.executable, PEER, "listen", "--port", str(port), "--timeout", "60"])
    await srv.wait_for('"listening"')
    cli = await lab.spawn(
        "lan-a",
        [sys.executable, PEER, "direct", "--connect", f"{PUB_IP}:{port}", "--token", os.urandom(32).hex(),
         "--bytes", str(MB << 20), "--timeout", "60"],
    )
    await cli.wait(120)
    await srv.wait(120)
    for line in reversed(cli.lines):
        if '"event": "done"' in line:
            return json.loads(line)
    raise RuntimeError(f"baseline produced no result:\n{cli.output[-2000:]}")


async def one_run(lab: NatLab, tmp: Path, name: str, modes: tuple[str, str], target: str, i: int) -> tuple[dict, dict]:
    try:
        world = await start_swarm(lab, tmp, *modes)
        out = probe(lab, world, target, MB << 20)
        base = await plain_tcp(lab, 7100 + i)
        return out, base
    finally:
        await lab.stop_processes()
        lab.down()


def med(xs: list[float]) -> float:
    return round(statistics.median(xs), 2) if xs else float("nan")


async def main() -> None:
    reason = unavailable_reason()
    if reason is not None:
        print(f"bench/nat.py skipped: {reason}")
        print(json.dumps({"skipped": reason}))
        return
    lab = NatLab(f"bn{os.getpid() % 10000}-")
    figures: dict[str, dict] = {}
    baseline: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, modes, target in SCENARIOS:
            runs = []
            for i in range(RUNS):
                out, base = await one_run(lab, Path(tmp) / f"{name}{i}", name, modes, target, i)
                runs.append(out)
                baseline.append(base)
            ok = [r for r in runs if r.get("stream", {}).get("ok")]
            figures[name] = {
                "runs": len(runs),
                "ok": len(ok),
                "paths": sorted({r["path"] for r in runs}),
                "setup_ms_p50": med([r["connect_ms"] for r in ok]),
                "rpc_rtt_ms_p50": med([r["rtt_ms"] for r in ok]),
                "mib_s_p50": med([r["stream"]["mib_s"] for r in ok]),
            }
    base = {
        "plain_tcp_lan_a_to_pub": {
            "runs": len(baseline),
            "setup_ms_p50": med([b["setup_s"] * 1000 for b in baseline]),
            "mib_s_p50": med([b["mib_s"] for b in baseline]),
        }
    }
    print(f"{'path':<26}{'ok':>6}{'setup p50':>13}{'RPC RTT p50':>14}{'MiB/s p50':>12}")
    for name, f in figures.items():
        print(f"{name + ' (' + ','.join(f['paths']) + ')':<26}{f['ok']:>4}/{f['runs']}"
              f"{f['setup_ms_p50']:>11.1f}ms{f['rpc_rtt_ms_p50']:>12.2f}ms{f['mib_s_p50']:>12.2f}")
    b = base["plain_tcp_lan_a_to_pub"]
    print(f"{'baseline: plain TCP':<26}{b['runs']:>6}{b['setup_ms_p50']:>11.1f}ms{'-':>14}{b['mib_s_p50']:>12.2f}")
    print("setup = `swarmd nat probe` connect time: direct includes the Noise handshake; punched and relayed")
    print("include a failed direct attempt (bounded by nat.direct_timeout), signalling and the handshake.")
    print(f"stream = {MB} MiB over one RPC stream (daemons, one way); baseline = {MB} MiB each way, plain TCP.")
    print(json.dumps({"figures": figures, "baseline": base}))


if __name__ == "__main__":
    asyncio.run(main())
