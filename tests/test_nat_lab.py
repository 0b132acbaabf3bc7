"""The NAT lab itself: the routers translate outbound flows and drop unsolicited inbound ones.

These checks keep the other natlab tests honest: a punched or relayed path
that "works" in a lab whose routers let everything in proves nothing.
"""

from __future__ import annotations

import sys

import pytest

from tests.natlab.lab import INET_IP, LANA_IP, NATA_WAN, lab_fixture

pytestmark = pytest.mark.natlab

# A UDP listener that prints each datagram's source, and a one-shot sender.
LISTEN = (
    "import socket,sys;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
    "s.bind(('0.0.0.0',int(sys.argv[1])));print('listening',flush=True)\n"
    "while True:\n d,a=s.recvfrom(2048);print('got',d.decode(),a[0],a[1],flush=True)"
)
SEND = (
    "import socket,sys;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
    "s.bind(('0.0.0.0',int(sys.argv[3])));s.sendto(sys.argv[4].encode(),(sys.argv[1],int(sys.argv[2])))"
)


@pytest.fixture
async def lab():
    async for one in lab_fixture():
        yield one


@pytest.mark.parametrize("modes", [("cone", "cone"), ("symmetric", "fullcone")])
async def test_outbound_is_translated_and_unsolicited_inbound_dropped(lab, modes) -> None:
    lab.up(*modes)
    lan = await lab.spawn("lan-a", [sys.executable, "-c", LISTEN, "40000"])
    inet = await lab.spawn("inet", [sys.executable, "-c", LISTEN, "41000"])
    await lan.wait_for("listening")
    await inet.wait_for("listening")

    # unsolicited: nobody in lan-a ever sent anything, so the router has no mapping
    before = lab.counters("nat-a")
    lab.run("inet", [sys.executable, "-c", SEND, NATA_WAN, "40000", "41001", "unsolicited"])
    after = lab.counters("nat-a")
    assert after["input-dropped"] + after["forward-dropped"] > before["input-dropped"] + before["forward-dropped"]

    # outbound: the inet host sees the router's WAN address, never the LAN address
    lab.run("lan-a", [sys.executable, "-c", SEND, INET_IP, "41000", "40005", "hello"])
    line = await inet.wait_for("got hello")
    src_ip = line.split()[2]
    assert src_ip == NATA_WAN and src_ip != LANA_IP
    assert not any("unsolicited" in ln for ln in lan.lines)

    # a host on the other side of the lab cannot reach into lan-a either
    before = lab.counters("nat-a")
    lab.run("lan-b", [sys.executable, "-c", SEND, NATA_WAN, "40000", "40002", "from-b"])
    after = lab.counters("nat-a")
    assert sum(after.values()) > sum(before.values())
    assert not any("from-b" in ln for ln in lan.lines)
