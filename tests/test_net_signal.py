"""Signalling requests: strict validation of peer input and per-source rate limits."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from swarmd.errors import ERR_BAD_REQUEST, ERR_RATE_LIMITED, ERR_TOO_LARGE, SwarmdError
from swarmd.net.signal import MAX_SOURCES, SignalLimiter, SignalRequest, parse_request
from swarmd.net.udppunch import PunchOffer

A, B = os.urandom(32), os.urandom(32)


def test_round_trip_udp_tcp_and_relay() -> None:
    offer = PunchOffer(os.urandom(16), (("198.18.0.11", 4000), ("198.19.1.2", 4000)), "cone", ("198.18.0.11", 4000))
    udp = SignalRequest(A, B, "udp", punch=offer)
    assert parse_request(udp.to_wire()) == udp
    rel = SignalRequest(A, B, "relay", relay=("198.18.0.1", 4000), token=os.urandom(32))
    assert parse_request(rel.to_wire()) == rel
    tcp = SignalRequest(A, B, "tcp", addr=("198.18.0.11", 40123))
    assert parse_request(tcp.to_wire()) == tcp and "nat" not in tcp.to_wire()  # as older callers send it
    birthday = SignalRequest(A, B, "tcp", addr=("198.18.0.11", 40123), nat="symmetric")
    assert parse_request(birthday.to_wire()) == birthday


@pytest.mark.parametrize(
    ("obj", "code", "words"),
    [
        ([], ERR_BAD_REQUEST, "must be a map"),
        ({"source": b"x", "target": B, "kind": "udp"}, ERR_BAD_REQUEST, "'source'"),
        ({"source": A, "target": B, "kind": "ice"}, ERR_BAD_REQUEST, "'kind'"),
        ({"source": A, "target": B, "kind": "tcp"}, ERR_BAD_REQUEST, "'addr'"),
        ({"source": A, "target": B, "kind": "tcp", "addr": ["h", 70000]}, ERR_BAD_REQUEST, "'addr'"),
        ({"source": A, "target": B, "kind": "tcp", "addr": ["h", True]}, ERR_BAD_REQUEST, "'addr'"),
        ({"source": A, "target": B, "kind": "tcp", "addr": ["", 1]}, ERR_BAD_REQUEST, "'addr'"),
        ({"source": A, "target": B, "kind": "tcp", "addr": ["h", 1], "nat": "odd"}, ERR_BAD_REQUEST, "'nat'"),
        ({"source": A, "target": B, "kind": "tcp", "addr": ["h", 1], "nat": 3}, ERR_BAD_REQUEST, "'nat'"),
        ({"source": A, "target": B, "kind": "udp", "punch": "hello"}, ERR_BAD_REQUEST, "must be a map"),
        ({"source": A, "target": B, "kind": "udp", "punch": {"id": b"1" * 16, "addrs": [], "nat": "cone"}},
         ERR_BAD_REQUEST, "'addrs'"),
        ({"source": A, "target": B, "kind": "udp",
          "punch": {"id": b"1" * 16, "addrs": [["a.example", 1]], "nat": "cone"}}, ERR_BAD_REQUEST, "IPv4"),
        ({"source": A, "target": B, "kind": "udp",
          "punch": {"id": b"1" * 16, "addrs": [["1.2.3.4", 1]] * 9, "nat": "cone"}}, ERR_BAD_REQUEST, "1..8"),
        ({"source": A, "target": B, "kind": "udp",
          "punch": {"id": b"1" * 16, "addrs": [["1.2.3.4", 1]], "nat": "weird"}}, ERR_BAD_REQUEST, "'nat'"),
        ({"source": A, "target": B, "kind": "udp",
          "punch": {"id": b"1", "addrs": [["1.2.3.4", 1]], "nat": "cone"}}, ERR_BAD_REQUEST, "'id'"),
        ({"source": A, "target": B, "kind": "relay", "relay": ["h", 0], "token": A}, ERR_BAD_REQUEST, "port"),
        ({"source": A, "target": B, "kind": "relay", "relay": ["h", 1], "token": b"t"}, ERR_BAD_REQUEST, "token"),
    ],
)
def test_bad_requests_are_named(obj, code, words) -> None:
    with pytest.raises(SwarmdError, match=words) as ei:
        parse_request(obj)
    assert ei.value.code == code


@given(st.recursive(st.none() | st.integers() | st.binary(max_size=40) | st.text(max_size=40),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=6),
                    max_leaves=20))
def test_parse_request_only_raises_swarmd_errors(obj) -> None:
    try:
        parse_request(obj)
    except SwarmdError as e:
        assert e.code in (ERR_BAD_REQUEST, ERR_TOO_LARGE) and e.message


_VALUE = st.none() | st.booleans() | st.integers(-5, 70000) | st.binary(max_size=20) | st.text(max_size=20)


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "id": st.binary(min_size=15, max_size=17) | _VALUE,
            "addrs": st.lists(st.lists(st.sampled_from(["1.2.3.4", "01.2.3.4", "::1", ""]) | _VALUE, max_size=3)
                              | st.tuples(st.sampled_from(["198.18.0.1", "1.2.3"]), st.integers(-1, 70000)),
                              max_size=10) | _VALUE,
            "nat": st.sampled_from(["cone", "symmetric", "public", "x"]) | _VALUE,
            "public": st.none() | st.tuples(st.sampled_from(["198.18.0.1", "1.2.3"]), st.integers(-1, 70000)) | _VALUE,
        },
    )
)
def test_hostile_punch_offers_give_a_worded_error_or_a_well_formed_offer(punch) -> None:
    try:
        req = parse_request({"source": A, "target": B, "kind": "udp", "punch": punch})
    except SwarmdError as e:
        assert e.code == ERR_BAD_REQUEST and "punch offer" in e.message
        return
    offer = req.punch
    assert offer is not None and len(offer.punch_id) == 16 and 1 <= len(offer.addrs) <= 8
    for host, port in offer.addrs + ((offer.public,) if offer.public else ()):
        assert host.count(".") == 3 and 0 < port <= 65535
    assert parse_request(req.to_wire()) == req


def test_flood_from_one_source_is_limited_others_still_served() -> None:
    lim = SignalLimiter(rate=2.0, burst=5)
    allowed = sum(lim.allow(A, now=100.0) for _ in range(1000))
    assert allowed == 5
    assert lim.allow(B, now=100.0)  # another caller is not punished for A's flood
    with pytest.raises(SwarmdError) as ei:
        lim.check(A, now=100.0)
    assert ei.value.code == ERR_RATE_LIMITED
    assert lim.allow(A, now=100.5)  # refilled at 2/s


def test_flood_of_fresh_keys_hits_the_global_bucket_and_bounded_memory() -> None:
    lim = SignalLimiter(rate=2.0, burst=5, total_rate=10.0, total_burst=20)
    allowed = sum(lim.allow(os.urandom(32), now=50.0) for _ in range(3 * MAX_SOURCES))
    assert allowed == 20
    assert len(lim._sources) <= MAX_SOURCES
