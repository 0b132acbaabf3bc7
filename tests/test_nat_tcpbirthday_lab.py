"""TCP birthday punching through the lab's routers (swarmd/net/tcppunch.py), both halves for real.

lan-b sits behind a symmetric NAT: `birthday_many` connect()s 256 sockets at lan-a's
public mapping (256 random ports on nat-b). lan-a sits behind a cone or restricted
NAT: `birthday_probe` connect()s from its one punch port at random ports of nat-b,
500 per second. One probe lands on a mapping and both kernels finish the handshake;
the bytes then flow both ways on that one connection. (~1 in 250 probes hits; the
10 s bound allows thousands, so a miss here means the punch is broken, not unlucky.)
"""

from __future__ import annotations

import sys

import pytest

from tests.natlab.lab import NATA_WAN, NATB_WAN, lab_fixture

pytestmark = pytest.mark.natlab

SIDE = """
import asyncio, json, sys
from swarmd.net import tcppunch

async def main():
    role, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    print(json.dumps({"event": "started"}), flush=True)
    if role == "many":
        s = await tcppunch.birthday_many((ip, port), 10.0)
    else:
        s = await tcppunch.birthday_probe(port, ip, 10.0)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(s, role.encode())
    got = await loop.sock_recv(s, 16)
    print(json.dumps({"event": "met", "peer": list(s.getpeername()), "got": got.decode()}), flush=True)
    s.close()

asyncio.run(main())
"""


@pytest.fixture
async def lab():
    async for one in lab_fixture():
        yield one


@pytest.mark.parametrize("mode_a", ["cone", "restricted"])
async def test_tcp_birthday_punch_meets_a_symmetric_nat(lab, mode_a) -> None:
    lab.up(mode_a, "symmetric")
    port = 23456  # lan-a's punch port; the cone router keeps it as the public port
    many = await lab.spawn("lan-b", [sys.executable, "-c", SIDE, "many", NATA_WAN, str(port)])
    await many.wait_event("started", 20)
    probe = await lab.spawn("lan-a", [sys.executable, "-c", SIDE, "probe", NATB_WAN, str(port)])
    a = await probe.wait_event("met", 30)
    b = await many.wait_event("met", 30)
    assert a["got"] == "many" and b["got"] == "probe", (a, b)  # one connection, bytes both ways
    assert a["peer"][0] == NATB_WAN and b["peer"] == [NATA_WAN, port], (a, b)
