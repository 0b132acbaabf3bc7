"""NAT detection against real kernel NAT: public, cone, symmetric and UDP-blocked hosts."""

from __future__ import annotations

import json
import sys

import pytest

from tests.natlab.lab import INET_IP, NATA_WAN, PUB_IP, REPO_ROOT, lab_fixture

pytestmark = pytest.mark.natlab

PROBE = str(REPO_ROOT / "tests" / "natlab" / "natprobe.py")
STUN = str(REPO_ROOT / "tests" / "natlab" / "stunserver.py")
SERVERS = [f"{INET_IP}:3478", f"{INET_IP}:3479", f"{PUB_IP}:3478"]


@pytest.fixture
async def lab():
    async for one in lab_fixture():
        yield one


async def test_detects_each_kind_of_nat(lab) -> None:
    lab.up("cone", "symmetric")
    inet = await lab.spawn("inet", [sys.executable, STUN, "3478", "3479"])
    pub = await lab.spawn("pub", [sys.executable, STUN, "3478"])
    await inet.wait_for("stun_ready")
    await pub.wait_for("stun_ready")

    def probe(host: str, servers: list[str]) -> dict:
        out = lab.run(host, [sys.executable, PROBE, *servers]).stdout
        return json.loads(out.strip().splitlines()[-1])

    cone = probe("lan-a", SERVERS)
    assert cone["type"] == "cone" and cone["answers"] == 3
    assert cone["public_address"].startswith(NATA_WAN + ":")  # the router's address, one mapping

    sym = probe("lan-b", SERVERS)
    assert sym["type"] == "symmetric" and len(sym["mappings"]) >= 2  # a new port per destination

    public = probe("pub", [f"{INET_IP}:3478", f"{INET_IP}:3479"])
    assert public["type"] == "public" and public["public_address"] == public["local"]

    # a router that drops all UDP: nothing answers
    lab.run("nat-a", ["nft", "insert", "rule", "ip", "natlab", "forward", "meta", "l4proto", "udp", "drop"])
    blocked = probe("lan-a", SERVERS)
    assert blocked["type"] == "udp_blocked" and blocked["answers"] == 0
