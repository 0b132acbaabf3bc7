"""Daemons in the NAT lab, started with the real CLI: path choice per NAT pair.

inet runs `swarmd --role bootstrap,relay`; pub runs a public peer; lan-a and
lan-b run peers behind the two NAT routers. `swarmd nat probe` asks lan-a's
daemon to connect to a peer by key (direct -> punched -> relayed), make one
RPC round trip and stream 10 MB over that connection (Noise end to end), and
reports which path carried it.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.natlab.lab import INET_IP, lab_fixture
from tests.natlab.swarmlab import probe as swarm_probe
from tests.natlab.swarmlab import start_swarm

pytestmark = pytest.mark.natlab

TEN_MB = 10 * 1024 * 1024


@pytest.fixture
async def lab():
    async for one in lab_fixture():
        yield one


def probe(lab, world: dict, target: str, size: int = TEN_MB) -> dict:
    out = swarm_probe(lab, world, target, size)
    assert out["rtt_ms"] > 0  # the RPC round trip
    if size:
        assert out["stream"]["ok"] and out["stream"]["bytes"] == size, out
    return out


@pytest.mark.parametrize(("mode_a", "mode_b"), [("cone", "cone")])
async def test_cone_x_cone_is_punched(lab, tmp_path, mode_a, mode_b) -> None:
    world = await start_swarm(lab, tmp_path, mode_a, mode_b)
    out = probe(lab, world, "b")
    assert out["path"] == "punched", out
    assert [x["path"] for x in out["connection"]["attempts"]] == ["direct", "punched"]
    remote = out["connection"]["punch"]["remote"]
    assert remote.startswith("198.18.0.12:")  # straight to lan-b's router, not via the relay host
    # the other side sees the same punched connection, inbound
    up = await world["b"].wait_for(r'"event": "path_chosen".*"inbound": true', 30)
    assert json.loads(up)["path"] == "punched"


@pytest.mark.parametrize(("mode_a", "mode_b"), [("cone", "symmetric"), ("restricted", "symmetric")])
async def test_one_symmetric_side_is_birthday_punched(lab, tmp_path, mode_a, mode_b) -> None:
    world = await start_swarm(lab, tmp_path, mode_a, mode_b)
    out = probe(lab, world, "b")
    assert out["path"] == "punched", out
    punch = out["connection"]["punch"]
    assert punch["birthday"] and punch["remote"].startswith("198.18.0.12:")  # lan-b's router, not the relay
    assert punch["remote_type"] == "prflx"  # one of the symmetric side's many mappings, never listed
    up = await world["b"].wait_for(r'"event": "path_chosen".*"inbound": true', 30)
    assert json.loads(up)["path"] == "punched" and json.loads(up)["punch"]["sockets"] == 256


async def test_relayed_when_punching_cannot_work(lab, tmp_path) -> None:
    world = await start_swarm(lab, tmp_path, "symmetric", "symmetric")
    out = probe(lab, world, "b")
    assert out["path"] == "relayed", out
    assert out["connection"]["relay"].startswith(INET_IP + ":")
    paired = await world["boot"].wait_event("relay_paired", 30)
    assert {paired["a"], paired["b"]} == {"198.18.0.11", "198.18.0.12"}  # the routers, never the LANs
    assert not any(re.search("repunch|path_upgraded", ln) for ln in world["a"].lines)


async def test_public_peer_gets_direct_tcp(lab, tmp_path) -> None:
    world = await start_swarm(lab, tmp_path, "symmetric", "cone")
    out = probe(lab, world, "pub")
    assert out["path"] == "direct", out
    assert out["connection"] == {"path": "direct"}
