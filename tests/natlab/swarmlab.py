"""A swarm of real daemons in the NAT lab (used by the natlab tests and bench/nat.py).

inet runs `swarmd --role bootstrap,relay`, pub a public peer, lan-a and lan-b
peers behind the two NAT routers; all started with the real CLI inside the
namespaces. `probe()` runs `swarmd nat probe` on lan-a's daemon.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tests.natlab.lab import INET_IP, PUB_IP, NatLab
from tests.natlab.upnpd import start_miniupnpd

SWARMD = [sys.executable, "-m", "swarmd"]
# short punching bounds keep the lab quick; the defaults suit real networks
LAB_NAT_ENV = {"SWARMD_NAT_PUNCH_TIMEOUT": "6", "SWARMD_NAT_REPUNCH_INTERVAL": "2"}


async def start_swarm(
    lab: NatLab, tmp: Path, mode_a: str, mode_b: str, env: dict[str, str] | None = None, *, with_pub: bool = True,
    upnp: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Bring the lab up in mode_a-mode_b and start the four daemons (three without
    `with_pub`: then inet's bootstrap is the one public node); wait until the NATed
    ones know their NAT type and list a signal peer. `env`: more SWARMD_* settings.
    `upnp`: routers ("nat-a", "nat-b") that run miniupnpd (UPnP-IGD, NAT-PMP, PCP)."""
    env = {**LAB_NAT_ENV, **(env or {})}
    lab.up(mode_a, mode_b)
    boot = await lab.spawn(
        "inet",
        [*SWARMD, "--role", "bootstrap,relay", "--host", INET_IP, "--dht-port", "4000",
         "--data-dir", str(tmp / "inet"), "--log-format", "json"],
        env=env,
    )
    await boot.wait_event("ready", 60)
    for router in upnp:  # its STUN check asks the bootstrap's DHT port, so after "ready"
        await start_miniupnpd(lab, router, tmp)
    joined = ["--bootstrap", f"{INET_IP}:4000", "--log-format", "json"]
    pub = None
    if with_pub:
        pub = await lab.spawn(
            "pub", [*SWARMD, *joined, "--host", PUB_IP, "--data-dir", str(tmp / "pub")], env=env
        )
    a = await lab.spawn(
        "lan-a", [*SWARMD, *joined, "--host", "0.0.0.0", "--data-dir", str(tmp / "a")], env=env
    )
    b = await lab.spawn(
        "lan-b", [*SWARMD, *joined, "--host", "0.0.0.0", "--data-dir", str(tmp / "b")], env=env
    )
    keys = {}
    for name, proc in (("pub", pub), ("a", a), ("b", b)):
        if proc is not None:
            keys[name] = (await proc.wait_event("ready", 60))["public_key"]
    for proc in (a, b):
        await proc.wait_for(r'"event": "signal_peers", "nat": "(cone|symmetric)", "peers": \["', 60)
    return {"boot": boot, "pub": pub, "a": a, "b": b, "keys": keys, "tmp": tmp}


def probe(
    lab: NatLab, world: dict[str, Any], target: str, size: int, watch: float = 0.0, fresh: bool = False
) -> dict[str, Any]:
    """`swarmd nat probe` from lan-a's daemon to world's `target` ("b" or "pub"); with
    `watch`, calls and streams continue until the path is final (see nat.probe)."""
    res = lab.run(
        "lan-a",
        [*SWARMD, "nat", "--data-dir", str(world["tmp"] / "a"), "probe", world["keys"][target],
         "--bytes", str(size), "--watch", str(watch), "--json", *(["--fresh"] if fresh else [])],
        timeout=150,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def status(lab: NatLab, world: dict[str, Any], who: str) -> dict[str, Any]:
    """`swarmd status --json` of world's daemon `who` ("a", "b"), run in its namespace."""
    host = {"a": "lan-a", "b": "lan-b", "pub": "pub"}[who]
    res = lab.run(host, [*SWARMD, "status", "--data-dir", str(world["tmp"] / who), "--json"], timeout=60)
    return json.loads(res.stdout.strip().splitlines()[-1])
