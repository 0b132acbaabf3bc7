"""NAT classification from STUN answers (the lab tests run it against real routers)."""

from __future__ import annotations

import asyncio

from swarmd.net.nat import (
    CONE,
    PUBLIC,
    SYMMETRIC,
    UDP_BLOCKED,
    UNKNOWN,
    NatConfig,
    Observation,
    classify,
    detect_nat,
)

S1, S2, S3 = ("198.18.0.1", 4000), ("198.18.0.20", 4000), ("198.18.0.1", 4001)
LOCAL = [("198.19.1.2", 5000)]


def test_no_answer_means_udp_blocked() -> None:
    assert classify([Observation(S1, None), Observation(S2, None)], LOCAL).nat_type == UDP_BLOCKED


def test_same_mapping_from_two_servers_is_cone() -> None:
    r = classify([Observation(S1, ("198.18.0.11", 5000)), Observation(S2, ("198.18.0.11", 5000))], LOCAL)
    assert r.nat_type == CONE and r.public_address == ("198.18.0.11", 5000)
    assert r.reachable_by_punch


def test_mapping_that_changes_per_destination_is_symmetric() -> None:
    r = classify([Observation(S1, ("198.18.0.11", 31000)), Observation(S3, ("198.18.0.11", 42000))], LOCAL)
    assert r.nat_type == SYMMETRIC and r.public_address is None and not r.reachable_by_punch


def test_mapping_equal_to_the_socket_is_public() -> None:
    r = classify([Observation(S1, ("198.19.1.2", 5000)), Observation(S2, ("198.19.1.2", 5000))], LOCAL)
    assert r.nat_type == PUBLIC


def test_one_answer_cannot_tell() -> None:
    r = classify([Observation(S1, ("198.18.0.11", 5000)), Observation(S2, None)], LOCAL)
    assert r.nat_type == UNKNOWN
    assert r.to_dict()["answers"] == 1 and r.to_dict()["asked"] == 2


async def test_detect_bounds_each_probe_and_asks_distinct_servers() -> None:
    asked: list[tuple[str, int]] = []

    async def stun(server: tuple[str, int]) -> tuple[str, int] | None:
        asked.append(server)
        if server == S2:
            await asyncio.Event().wait()  # never answers: the timeout must end it
        return ("198.18.0.11", 7000)

    r = await detect_nat(stun, [S1, S1, S2, S3], LOCAL, config=NatConfig(stun_timeout=0.2, stun_servers=3))
    assert sorted(asked) == sorted([S1, S2, S3])
    assert r.nat_type == CONE and r.to_dict()["answers"] == 2


def test_nobody_to_ask_is_unknown_not_blocked() -> None:
    assert classify([], LOCAL).nat_type == UNKNOWN


def test_bad_nat_and_relay_settings_are_named(tmp_path) -> None:
    import pytest

    from swarmd.errors import ConfigError
    from swarmd.node.config import load_settings
    from swarmd.settings import Settings

    with pytest.raises(ConfigError, match="nat.assume"):
        load_settings(Settings, environ={"SWARMD_NAT_ASSUME": "moon"})
    with pytest.raises(ConfigError, match="nat.signal_peers"):
        load_settings(Settings, environ={"SWARMD_NAT_SIGNAL_PEERS": "7"})
    with pytest.raises(ConfigError, match="relay.pair_timeout"):
        load_settings(Settings, environ={"SWARMD_RELAY_PAIR_TIMEOUT": "0"})
    ok = load_settings(Settings, environ={"SWARMD_NAT_ASSUME": "symmetric", "SWARMD_RELAY_MAX_CIRCUITS": "3"})
    assert ok.nat.assume == "symmetric" and ok.relay.max_circuits == 3


async def test_one_server_with_an_alternate_port_tells_cone_from_symmetric() -> None:
    alt = ("198.18.0.1", 4001)

    async def cone(server: tuple[str, int]) -> tuple[str, int] | None:
        return ("198.18.0.11", 7000)

    r = await detect_nat(cone, [S1], LOCAL, config=NatConfig(stun_timeout=0.2), alternate=lambda s: alt)
    assert r.nat_type == CONE and r.to_dict()["asked"] == 2

    async def symmetric(server: tuple[str, int]) -> tuple[str, int] | None:
        return ("198.18.0.11", 7000 + server[1])  # a new port per destination

    r = await detect_nat(symmetric, [S1], LOCAL, config=NatConfig(stun_timeout=0.2), alternate=lambda s: alt)
    assert r.nat_type == SYMMETRIC

    # two servers answered already: the alternate is not needed
    asked: list[tuple[str, int]] = []

    async def counting(server: tuple[str, int]) -> tuple[str, int] | None:
        asked.append(server)
        return ("198.18.0.11", 7000)

    r = await detect_nat(counting, [S1, S2], LOCAL, config=NatConfig(stun_timeout=0.2), alternate=lambda s: alt)
    assert r.nat_type == CONE and alt not in asked
