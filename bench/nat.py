"""NAT-traversal benchmark, inside the NAT lab: connection setup time and stream
throughput per path (direct TCP to a public peer, relayed, punched), beside a
plain TCP stream over the same lab path measured in the same run.

    sudo python bench/nat.py        # prints a table, then one JSON line

Needs root, `ip` and `nft` (it builds network namespaces); otherwise it says why
and prints a JSON line with "skipped". Each figure is the median of RUNS runs,
each run streaming MB megabytes both ways at once (MiB/s is per direction).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.natlab.lab import INET_IP, PUB_IP, REPO_ROOT, NatLab, unavailable_reason  # noqa: E402

RUNS = 3
MB = 8
PEER = str(REPO_ROOT / "tests" / "natlab" / "peer.py")
STUN = str(REPO_ROOT / "tests" / "natlab" / "stunserver.py")


def done_of(proc) -> dict:
    for line in reversed(proc.lines):
        if line.startswith("{") and '"event": "done"' in line:
            return json.loads(line)
    raise RuntimeError(f"no result from {proc.host}:\n{proc.output[-2000:]}")


async def plain_tcp(lab: NatLab, server_host: str, server_ip: str, client_host: str, port: int) -> dict:
    """The baseline: plain TCP (no relay, no ICE) between two lab hosts."""
    srv = await lab.spawn(server_host, [sys.executable, PEER, "listen", "--port", str(port), "--timeout", "60"])
    await srv.wait_for('"listening"')
    cli = await lab.spawn(
        client_host,
        [sys.executable, PEER, "direct", "--connect", f"{server_ip}:{port}", "--token", os.urandom(32).hex(),
         "--bytes", str(MB << 20), "--timeout", "60"],
    )
    await cli.wait(120)
    await srv.wait(120)
    return done_of(cli)


async def via_relay(lab: NatLab, relay_port: int, stun: str, upgrade: bool) -> dict:
    mode = "upgrade" if upgrade else "relay"
    common = [sys.executable, PEER, mode, "--relay", f"{INET_IP}:{relay_port}", "--token", os.urandom(32).hex(),
              "--stun", stun, "--bytes", str(MB << 20), "--punch-timeout", "5", "--timeout", "60"]
    a = await lab.spawn("lan-a", [*common, "--side", "a"])
    b = await lab.spawn("lan-b", [*common, "--side", "b"])
    await a.wait(120)
    await b.wait(120)
    return done_of(a)


async def scenario(lab: NatLab, modes: tuple[str, str], tmp: str) -> dict[str, list[dict]]:
    lab.up(*modes)
    try:
        s1 = await lab.spawn("inet", [sys.executable, STUN, "3478"])
        s2 = await lab.spawn("pub", [sys.executable, STUN, "3478"])
        relay = await lab.spawn(
            "inet",
            [sys.executable, "-m", "swarmd", "--role", "relay", "--host", "0.0.0.0", "--data-dir", tmp,
             "--log-format", "json"],
        )
        await s1.wait_for("stun_ready")
        await s2.wait_for("stun_ready")
        relay_port = json.loads(await relay.wait_for('"event": "ready"'))["ports"]["relay"]
        stun = f"{INET_IP}:3478,{PUB_IP}:3478"
        out: dict[str, list[dict]] = {"baseline_plain_tcp_lan_a_to_inet": [], "direct_lan_a_to_pub": []}
        for i in range(RUNS):
            out["baseline_plain_tcp_lan_a_to_inet"].append(await plain_tcp(lab, "inet", INET_IP, "lan-a", 7100 + i))
            out["direct_lan_a_to_pub"].append(await plain_tcp(lab, "pub", PUB_IP, "lan-a", 7200 + i))
            if modes == ("symmetric", "symmetric"):
                out.setdefault("relayed", []).append(await via_relay(lab, relay_port, stun, upgrade=False))
            else:
                out.setdefault("punched", []).append(await via_relay(lab, relay_port, stun, upgrade=True))
        return out
    finally:
        await lab.stop_processes()
        lab.down()


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


async def main() -> None:
    reason = unavailable_reason()
    if reason is not None:
        print(f"bench/nat.py skipped: {reason}")
        print(json.dumps({"skipped": reason}))
        return
    import tempfile

    lab = NatLab(f"bn{os.getpid() % 10000}-")
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for modes in (("cone", "cone"), ("symmetric", "symmetric")):
            for k, v in (await scenario(lab, modes, os.path.join(tmp, "-".join(modes)))).items():
                results.setdefault(k, []).extend(v)
    figures = {}
    for name, runs in results.items():
        ok = [r for r in runs if r.get("ok")]
        figures[name] = {
            "runs": len(runs),
            "ok": len(ok),
            "paths": sorted({r["path"] for r in runs}),
            "setup_ms_p50": round(med([r["setup_s"] * 1000 for r in ok]), 2),
            "mib_s_p50": round(med([r["mib_s"] for r in ok]), 2),
        }
    print(f"{'path':<28}{'runs ok':>8}{'setup p50':>14}{'MiB/s p50':>12}   (each way, {MB} MB both ways at once)")
    for name, f in figures.items():
        print(f"{name:<28}{f['ok']:>5}/{f['runs']:<2}{f['setup_ms_p50']:>11.1f}ms{f['mib_s_p50']:>12.2f}")
    print("punched setup = ICE offer/answer over the relayed circuit + checks + data channel open;")
    print("relayed setup = TCP connect to the relay + pairing; direct = TCP connect.")
    base = {k: v for k, v in figures.items() if k.startswith("baseline")}
    print(json.dumps({"figures": {k: v for k, v in figures.items() if not k.startswith("baseline")}, "baseline": base}))


if __name__ == "__main__":
    asyncio.run(main())
