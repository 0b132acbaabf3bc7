"""Punching pieces that need no NAT: our STUN servers only, hostile ICE descriptions,
and the pool's preference for a punched path over a relayed one."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarmd.errors import ERR_BAD_REQUEST, ERR_TOO_LARGE, ERR_UNAVAILABLE, SwarmdError
from swarmd.net.punch import PathAttempt, PathInfo, Puncher
from swarmd.node.identity import Identity
from swarmd.rpc import Methods, RpcServer, connect
from swarmd.rpc.registry import ConnectionRegistry


def test_no_stun_server_means_no_punching_never_a_public_one() -> None:
    with pytest.raises(SwarmdError) as ei:
        Puncher([])
    assert ei.value.code == ERR_UNAVAILABLE


async def test_puncher_uses_exactly_the_servers_given() -> None:
    p = Puncher([("127.0.0.1", 3478), ("127.0.0.2", 3479)])
    try:
        urls = [s.urls for s in p._pc._RTCPeerConnection__configuration.iceServers]
        assert urls == ["stun:127.0.0.1:3478", "stun:127.0.0.2:3479"]
    finally:
        await p.close()


@pytest.mark.parametrize(
    ("sdp", "code"),
    [("hello", ERR_BAD_REQUEST), ("v=0\r\n" + "a=x\r\n" * 5000, ERR_TOO_LARGE), ("v=0\r\nm=bogus\r\n", ERR_BAD_REQUEST)],
)
async def test_hostile_offer_gets_a_stable_code(sdp: str, code: str) -> None:
    p = Puncher([("127.0.0.1", 9)])
    try:
        with pytest.raises(SwarmdError) as ei:
            await p.answer(sdp)
        assert ei.value.code == code
    finally:
        await p.close()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=300).map(lambda t: "v=0\r\nm=application " + t))
async def test_arbitrary_offers_never_escape_as_other_errors(sdp: str) -> None:
    p = Puncher([("127.0.0.1", 9)])
    try:
        await p.answer(sdp)
    except SwarmdError as e:
        assert e.code == ERR_BAD_REQUEST
    finally:
        await p.close()


def test_path_info_reports_attempts() -> None:
    info = PathInfo("relayed", 0.05, [PathAttempt("direct", False, 2.0, "timed out"), PathAttempt("relayed", True, 0.04)])
    d = info.to_dict()
    assert d["path"] == "relayed" and d["setup_ms"] == 50.0
    assert d["attempts"][0] == {"path": "direct", "ok": False, "ms": 2000.0, "error": "timed out"}


async def test_registry_prefers_a_better_path_over_the_dialler_rule() -> None:
    srv_id, cli_id = Identity.generate(), Identity.generate()
    srv = RpcServer(srv_id, Methods())
    await srv.start()
    try:
        first = await connect(cli_id, "127.0.0.1", srv.port, remote_public_key=srv_id.public_key)
        second = await connect(cli_id, "127.0.0.1", srv.port, remote_public_key=srv_id.public_key)
        second.conn.path_rank = 0  # as the traversal marks a relayed connection
        reg = ConnectionRegistry(cli_id.public_key)
        assert reg.add(first) is first
        assert reg.add(second) is first  # newer, same dialler, but relayed: the direct one stays
        assert second.is_closed or second.conn.error is not None
        third = await connect(cli_id, "127.0.0.1", srv.port, remote_public_key=srv_id.public_key)
        first.conn.path_rank = 0
        assert reg.add(third) is third  # a better path replaces a relayed one
        await third.close()
    finally:
        await srv.stop()
