"""A swarm with ONE public node (inet's bootstrap): NAT detection still tells cone
from symmetric (the bootstrap's second STUN port), so NATed peers still punch,
here a cone and a symmetric NAT by birthday punching (TCP or UDP)."""

from __future__ import annotations

import pytest

from tests.natlab.lab import lab_fixture
from tests.natlab.swarmlab import probe, start_swarm

pytestmark = pytest.mark.natlab


@pytest.fixture
async def lab():
    async for one in lab_fixture():
        yield one


async def test_one_bootstrap_swarm_detects_and_punches(lab, tmp_path) -> None:
    world = await start_swarm(lab, tmp_path, "cone", "symmetric", with_pub=False)
    for side, kind, mappings in (("a", "cone", 1), ("b", "symmetric", 2)):
        detected = world[side].events("nat_detected")[-1]
        assert detected["type"] == kind, detected
        assert detected["answers"] == 2 and len(detected["mappings"]) == mappings  # both ports of one node
    out = probe(lab, world, "b", 1 << 20, watch=30)
    assert out["stream"]["ok"], out
    # birthday-punched, over TCP or (when TCP's search did not meet in time) UDP: never relayed
    assert out["watch"]["final_path"] == out["path"] and out["path"] in ("punched-tcp", "punched-udp"), out
