"""Daemons in the NAT lab, started with the real CLI: the path of the first call, the path
each NAT pair ends on, and no failed call or stream across the move between them.

inet runs `swarmd --role bootstrap,relay`; pub runs a public peer; lan-a and lan-b run
peers behind the two NAT routers. `swarmd nat probe --watch S` asks lan-a's daemon to
connect to a peer by key (the first path that works carries the first call; punches keep
trying behind it), then keeps calling and streaming through its swarm until the path is
final, counting every failure, then streams 10 MB (Noise end to end) on the final path.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.natlab.lab import INET_IP, lab_fixture
from tests.natlab.swarmlab import probe as swarm_probe
from tests.natlab.swarmlab import start_swarm, status

pytestmark = pytest.mark.natlab

TEN_MB = 10 * 1024 * 1024


@pytest.fixture
async def lab():
    async for one in lab_fixture():
        yield one


def probe(lab, world: dict, target: str, size: int = TEN_MB, watch: float = 0.0) -> dict:
    out = swarm_probe(lab, world, target, size, watch)
    assert out["rtt_ms"] > 0  # the RPC round trip
    if size:
        assert out["stream"]["ok"] and out["stream"]["bytes"] == size, out
    if watch:
        w = out["watch"]
        # the move between paths never fails a call or a stream
        assert w["calls_failed"] == 0 and w["streams_failed"] == 0, w
        assert w["calls_ok"] > 0 and w["streams_ok"] > 0, w
    return out


@pytest.mark.parametrize(("mode_a", "mode_b"), [("cone", "cone"), ("restricted", "restricted"), ("fullcone", "cone")])
async def test_cone_like_pairs_are_punched_over_tcp_at_once(lab, tmp_path, mode_a, mode_b) -> None:
    world = await start_swarm(lab, tmp_path, mode_a, mode_b)
    out = probe(lab, world, "b", watch=20)
    assert out["path"] == out["watch"]["final_path"] == "punched-tcp", out
    # the TCP punch usually carries the first call itself; on a starved machine it can take
    # longer than its head start and the relay (raced behind it) may win, then it upgrades
    assert out["first_path"] in ("punched-tcp", "relayed"), out
    attempts = [(x["path"], x["ok"]) for x in out["connection"]["attempts"]]
    assert attempts[0] == ("direct", False) and attempts[-1] == ("punched-tcp", True), out
    punch = out["connection"]["punch"]
    assert punch["remote"].startswith("198.18.0.12:")  # straight to lan-b's router, not via the relay host
    assert punch["local"].startswith("198.18.0.11:")  # our mapping, as the relay saw it
    # the other side runs the same punched connection, inbound (after a relayed one, when the
    # relay carried the first call)
    up = await world["b"].wait_for(r'"msg": "connection over the punched-tcp path".*"event": "path_chosen".*"inbound": true', 30)
    assert json.loads(up)["path"] == "punched-tcp"
    m = status(lab, world, "a")["paths"]
    assert m["opened"]["punched-tcp"] >= 1 and m["attempts"]["punched-tcp"]["ok"] >= 1, m
    assert m["first_path"][out["first_path"]] == 1 and m["upgrades"] == (out["first_path"] == "relayed"), m


@pytest.mark.parametrize(("mode_a", "mode_b"), [("restricted", "symmetric"), ("cone", "symmetric")])
async def test_one_symmetric_side_starts_relayed_and_moves_to_a_birthday_punched_path(  # TCP or UDP
    lab, tmp_path, mode_a, mode_b
) -> None:
    world = await start_swarm(lab, tmp_path, mode_a, mode_b)
    out = probe(lab, world, "b", watch=30)
    # a symmetric NAT is only met by a birthday search (hundreds of probes): the relay usually
    # carries the first call; a search that meets within the relay's few ms has nothing to upgrade
    w = out["watch"]
    if out["first_path"] == "punched-tcp":
        assert out["path"] == w["final_path"] == "punched-tcp" and out["connection"]["punch"]["birthday"], out
        assert w["calls_failed"] == 0 and w["streams_failed"] == 0, w
        return
    assert out["first_path"] == "relayed", out
    # the TCP birthday punch, or the UDP one when TCP's did not meet within its bound (a starved machine);
    # the watch ends only once no dial tries a better path
    assert [p["path"] for p in w["paths"]][0] == "relayed" and w["final_path"] in ("punched-tcp", "punched-udp"), w
    assert out["path"] == w["final_path"]
    await world["a"].wait_for(r'"event": "path_upgraded"', 30)
    ups = world["a"].events("path_upgraded")
    assert ups[0]["upgraded_from"] == "relayed" and all(u["punch"]["birthday"] for u in ups), ups
    assert ups[-1]["path"] == w["final_path"], ups
    for up in ups:
        assert up["punch"]["remote"].startswith("198.18.0.12:"), up  # lan-b's router, not the relay host
        if up["path"] == "punched-udp":
            assert up["punch"]["remote_type"] == "prflx"  # one of the symmetric side's 256 mappings, never listed
    # both sides closed the relayed connection only after its calls finished
    retired_a = await world["a"].wait_event("connection_retired", 30)
    retired_b = await world["b"].wait_event("connection_retired", 30)
    # lan-a dialled the relayed connection: it asked lan-b to stop using it, then closed it
    assert retired_a["agreed"] is True and retired_a["closed_by"] == "us", retired_a
    assert retired_b["closed_by"] == "peer", retired_b
    # the counters behind `swarmd status` / nat.status saw the relayed start and the upgrade
    m = status(lab, world, "a")["paths"]
    assert m["opened"]["relayed"] >= 1 and m["opened"][w["final_path"]] >= 1 and m["upgrades"] >= 1, m
    assert m["first_path"]["relayed"] >= 1 and m["upgrade_ms_p50"] > 0 and m["relay_bytes_in"] > 0, m


@pytest.mark.parametrize(("mode_a", "mode_b"), [("symmetric", "symmetric")])
async def test_relayed_when_punching_cannot_work(lab, tmp_path, mode_a, mode_b) -> None:
    world = await start_swarm(lab, tmp_path, mode_a, mode_b)
    out = probe(lab, world, "b", watch=4)
    assert out["first_path"] == out["path"] == "relayed", out
    assert out["connection"]["relay"].startswith(INET_IP + ":")
    paired = await world["boot"].wait_event("relay_paired", 30)
    assert {paired["a"], paired["b"]} == {"198.18.0.11", "198.18.0.12"}  # the routers, never the LANs
    if mode_a == mode_b == "symmetric":
        assert not any(re.search("repunch|path_upgraded|punched", ln) for ln in world["a"].lines)


async def test_public_peer_gets_direct_tcp(lab, tmp_path) -> None:
    world = await start_swarm(lab, tmp_path, "symmetric", "cone")
    out = probe(lab, world, "pub")
    assert out["path"] == "direct", out
    assert out["connection"] == {"path": "direct"}


async def test_without_tcp_punching_the_udp_punch_carries_udx_intact_through_loss(lab, tmp_path) -> None:
    """`nat.punch_tcp = false`: the final path is the UDP punch with UDX on it. Then nat-b drops
    3 % of the UDP it forwards (both ways): the 10 MB stream still arrives whole (the sink
    checks every byte), no call fails, and lan-a's UDX connection log shows it retransmitted."""
    world = await start_swarm(lab, tmp_path, "cone", "cone", {"SWARMD_NAT_PUNCH_TCP": "false"})
    out = probe(lab, world, "b", watch=20)
    assert out["path"] == out["watch"]["final_path"] == "punched-udp", out
    assert out["connection"]["punch"]["open_ms"] > 0, out
    up = await world["b"].wait_for(r'"msg": "connection over the punched-udp path".*"event": "path_chosen".*"inbound": true', 30)
    assert json.loads(up)["path"] == "punched-udp"
    lab.run("nat-b", ["nft", "insert", "rule", "ip", "natlab", "forward", "meta", "l4proto", "udp",
                      "numgen", "random", "mod", "100", "<", "3", "counter", "drop"])
    lossy = swarm_probe(lab, world, "b", TEN_MB, 20.0, True)  # fresh: punch and stream under loss
    assert lossy["stream"]["ok"] and lossy["stream"]["bytes"] == TEN_MB, lossy
    assert lossy["watch"]["calls_failed"] == 0 and lossy["watch"]["streams_failed"] == 0, lossy["watch"]
    assert lossy["path"] == lossy["watch"]["final_path"] == "punched-udp", lossy  # probes are resent: loss only slows the punch
    swarm_probe(lab, world, "b", 0, 0.0, True)  # closes the lossy connection: its log line follows
    line = await world["a"].wait_for(r'(?=.*"event": "udx_closed")(?=.*"retransmits": [1-9])', 30)
    closed = json.loads(line)
    assert closed["dropped_bad"] == 0 and closed["loss_episodes"] >= 1, closed
