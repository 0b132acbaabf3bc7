"""Port mapping against a real router implementation: miniupnpd on the lab's NAT router.

miniupnpd (tests/natlab/upnpd.py) speaks UPnP-IGD, NAT-PMP and PCP on nat-b.
Each client maps, renews and removes a port on it; then real daemons: lan-b's
maps its ports when it learns it is behind NAT and announces the mapped
address, lan-a reaches it there (path `mapped`, no punch, no relay), and the
forward is gone once lan-b's daemon stopped.
"""

from __future__ import annotations

import json
import re
import sys

import pytest

from tests.natlab.lab import NATB_WAN, lab_fixture
from tests.natlab.swarmlab import probe, start_swarm, status
from tests.natlab.upnpd import forwarded, skip_unless_installed, start_miniupnpd

pytestmark = pytest.mark.natlab

CLIENT = """
import asyncio, json, os, sys
from swarmd.net.portmap import PortMapper

async def main():
    pm = PortMapper(methods=(sys.argv[1],), lifetime=120)
    m = await pm.map("tcp", 4100)
    r = await pm.renew(m)
    u = await pm.map("udp", 4101)
    print(json.dumps({"tcp": m.to_dict(), "renewed": r.to_dict(), "udp": u.to_dict()}), flush=True)
    while not os.path.exists(sys.argv[2]):  # the test looks at the router meanwhile
        await asyncio.sleep(0.05)
    await pm.unmap(m)
    await pm.unmap(u)
    print(json.dumps({"removed": True}), flush=True)

asyncio.run(main())
"""


@pytest.fixture
async def lab():
    skip_unless_installed()
    async for one in lab_fixture():
        yield one


@pytest.mark.parametrize("method", ["pcp", "natpmp", "upnp"])
async def test_each_client_maps_renews_and_removes_a_port_on_miniupnpd(lab, tmp_path, method) -> None:
    lab.up("cone", "cone")
    stun = await lab.spawn("inet", [sys.executable, "tests/natlab/stunserver.py", "4000"])
    await stun.wait_event("stun_ready", 30)
    await start_miniupnpd(lab, "nat-b", tmp_path)
    done = tmp_path / "done"
    client = await lab.spawn("lan-b", [sys.executable, "-c", CLIENT, method, str(done)])
    out = json.loads(await client.wait_for(r'^\{"tcp"', 30))
    assert out["tcp"]["method"] == out["udp"]["method"] == method, out
    assert out["tcp"]["external"] == f"{NATB_WAN}:4100" and out["udp"]["external"] == f"{NATB_WAN}:4101", out
    assert out["renewed"]["external"] == out["tcp"]["external"] and out["tcp"]["lifetime"] > 0, out
    rules = forwarded(lab, "nat-b")
    assert re.search(r"tcp|0x6", rules) and "dport 4100 dnat ip to 198.19.2.2:4100" in rules, rules
    assert "dport 4101 dnat ip to 198.19.2.2:4101" in rules, rules
    # the forward works: a public host reaches the LAN host through it
    listener = await lab.spawn("lan-b", [sys.executable, "-c", (
        "import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
        "s.bind(('0.0.0.0',4100));s.listen();print('listening',flush=True);c,a=s.accept();c.sendall(a[0].encode())")])
    await listener.wait_for("listening", 10)
    got = lab.run("pub", [sys.executable, "-c", (
        f"import socket;s=socket.create_connection(('{NATB_WAN}',4100),timeout=5);print(s.recv(64).decode())")])
    assert got.stdout.strip() == "198.18.0.20"  # DNAT only: the LAN host sees the caller's own address
    done.touch()
    await client.wait_for('"removed": true', 30)
    assert "dnat" not in forwarded(lab, "nat-b"), forwarded(lab, "nat-b")


async def test_a_daemon_behind_a_mapping_router_is_reached_on_the_mapped_port(lab, tmp_path) -> None:
    world = await start_swarm(lab, tmp_path, "cone", "cone", upnp=("nat-b",))
    mapped = await world["b"].wait_event("port_mapped", 30)
    announced = await world["b"].wait_event("mapped_address_announced", 30)  # before that, peers punch as before
    assert announced["addresses"] and announced["addresses"][0].startswith(f"{NATB_WAN}:"), announced
    assert mapped["protocol"] in ("tcp", "udp") and mapped["method"] == "pcp", mapped  # PCP is asked first
    rules = forwarded(lab, "nat-b")
    st = status(lab, world, "b")
    tcp = [m for m in st["portmap"]["mappings"] if m["protocol"] == "tcp"]
    assert tcp and tcp[0]["external"].startswith(f"{NATB_WAN}:"), st
    assert f"dport {tcp[0]['external'].split(':')[1]} dnat ip to 198.19.2.2:" in rules, rules
    out = probe(lab, world, "b", 4 * 1024 * 1024, watch=5, fresh=True)
    assert out["first_path"] == out["path"] == "mapped", out
    assert out["connection"]["attempts"] == [] or out["connection"]["path"] == "mapped", out
    assert out["stream"]["ok"], out
    w = out["watch"]
    assert w["calls_failed"] == 0 and w["streams_failed"] == 0 and w["final_path"] == "mapped", w
    assert status(lab, world, "a")["paths"]["opened"]["mapped"] >= 1
    # the side behind the router labels the connection that came through its forward the same way
    assert status(lab, world, "b")["paths"]["opened"]["mapped"] >= 1
    # removed on stop
    await world["b"].stop()
    assert "dnat" not in forwarded(lab, "nat-b"), forwarded(lab, "nat-b")
