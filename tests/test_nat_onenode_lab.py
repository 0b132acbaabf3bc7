"""A swarm with ONE public node (inet's bootstrap): NAT detection still tells cone
from symmetric (the bootstrap's second STUN port), so NATed peers still punch."""

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
    world = await start_swarm(lab, tmp_path, "cone", "cone", with_pub=False)
    for side in ("a", "b"):
        detected = world[side].events("nat_detected")
        assert detected[-1]["type"] == "cone", detected
        assert detected[-1]["answers"] == 2 and len(detected[-1]["mappings"]) == 1  # both ports of one node
    out = probe(lab, world, "b", 1 << 20)
    assert out["stream"]["ok"], out
    assert out["path"] == "punched", out
