"""Path choice in the NAT lab, for each NAT pair: punched where ICE can, relayed where not,
direct TCP to a public peer. Each run streams 10 MB both ways and asserts the path used.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from tests.natlab.lab import INET_IP, PUB_IP, REPO_ROOT, lab_fixture

pytestmark = pytest.mark.natlab

PEER = str(REPO_ROOT / "tests" / "natlab" / "peer.py")
STUN = str(REPO_ROOT / "tests" / "natlab" / "stunserver.py")
TEN_MB = 10 * 1024 * 1024


@pytest.fixture
async def lab():
    async for one in lab_fixture():
        yield one


def events(proc, event: str) -> list[dict]:
    return [json.loads(ln) for ln in proc.lines if ln.startswith("{") and f'"event": "{event}"' in ln]


async def infrastructure(lab, tmp_path) -> tuple[int, str]:
    """A relay daemon (real CLI) and STUN on the internet segment: two servers, so
    a symmetric NAT shows two different mappings."""
    stun_a = await lab.spawn("inet", [sys.executable, STUN, "3478"])
    stun_b = await lab.spawn("pub", [sys.executable, STUN, "3478"])
    relay = await lab.spawn(
        "inet",
        [sys.executable, "-m", "swarmd", "--role", "relay", "--host", "0.0.0.0",
         "--data-dir", str(tmp_path / "relay"), "--log-format", "json"],
    )
    await stun_a.wait_for("stun_ready")
    await stun_b.wait_for("stun_ready")
    port = (await relay.wait_event("ready", 60))["ports"]["relay"]
    return port, f"{INET_IP}:3478,{PUB_IP}:3478"


@pytest.mark.parametrize(
    ("mode_a", "mode_b", "expected"),
    [
        ("cone", "cone", "punched"),
        ("restricted", "symmetric", "punched"),
        ("cone", "symmetric", "relayed"),
        ("symmetric", "symmetric", "relayed"),
    ],
)
async def test_path_by_nat_pair(lab, tmp_path, mode_a, mode_b, expected) -> None:
    lab.up(mode_a, mode_b)
    relay_port, stun = await infrastructure(lab, tmp_path)
    common = [sys.executable, PEER, "upgrade", "--relay", f"{INET_IP}:{relay_port}", "--token", os.urandom(32).hex(),
              "--stun", stun, "--bytes", str(TEN_MB), "--punch-timeout", "5", "--timeout", "60"]
    a = await lab.spawn("lan-a", [*common, "--side", "a"])
    b = await lab.spawn("lan-b", [*common, "--side", "b"])
    assert await a.wait(120) == 0, a.output[-3000:]
    assert await b.wait(120) == 0, b.output[-3000:]
    for p in (a, b):
        [done] = events(p, "done")
        assert done["ok"] and done["bytes"] == TEN_MB
        assert done["path"] == expected, p.output[-2000:]
        [punch] = events(p, "punch")
        assert punch["ok"] == (expected == "punched")
    if expected == "punched":
        # the punched pair runs between the routers' public sides, never through the relay host
        remote = events(a, "punch")[0]["remote"]
        assert remote.startswith("198.18.0.12:"), remote


async def test_public_peer_gets_direct_tcp(lab) -> None:
    lab.up("symmetric", "cone")
    server = await lab.spawn("pub", [sys.executable, PEER, "listen", "--port", "7000", "--timeout", "60"])
    await server.wait_for('"listening"')
    client = await lab.spawn(
        "lan-a",
        [sys.executable, PEER, "direct", "--connect", f"{PUB_IP}:7000", "--token", os.urandom(32).hex(),
         "--bytes", str(TEN_MB), "--timeout", "60"],
    )
    assert await client.wait(120) == 0, client.output
    assert await server.wait(120) == 0, server.output
    for p in (client, server):
        [done] = events(p, "done")
        assert done["ok"] and done["path"] == "direct" and done["bytes"] == TEN_MB
