"""Relayed path in the NAT lab: the path that always works, even symmetric x symmetric.

A relay daemon (`swarmd --role relay`, real CLI) runs on the "internet"
segment; two peers behind NAT routers each dial out to it and get spliced.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from tests.natlab.lab import INET_IP, NATA_WAN, NATB_WAN, REPO_ROOT, lab_fixture

pytestmark = pytest.mark.natlab

PEER = str(REPO_ROOT / "tests" / "natlab" / "peer.py")
TEN_MB = 10 * 1024 * 1024


@pytest.fixture
async def lab():
    async for one in lab_fixture():
        yield one


async def start_relay(lab, tmp_path, **env: str):
    relay = await lab.spawn(
        "inet",
        [sys.executable, "-m", "swarmd", "--role", "relay", "--host", "0.0.0.0",
         "--data-dir", str(tmp_path / "relay"), "--log-format", "json"],
        env={f"SWARMD_RELAY_{k.upper()}": v for k, v in env.items()},
    )
    ready = await relay.wait_event("ready", 60)
    return relay, ready["ports"]["relay"]


def last_json(proc, event: str) -> dict:
    return [json.loads(ln) for ln in proc.lines if ln.startswith("{") and f'"{event}"' in ln][-1]


@pytest.mark.parametrize("modes", [("symmetric", "symmetric"), ("cone", "symmetric")])
async def test_relayed_stream_between_two_nated_peers(lab, tmp_path, modes) -> None:
    lab.up(*modes)
    relay, port = await start_relay(lab, tmp_path)
    token = os.urandom(32).hex()
    argv = [sys.executable, PEER, "relay", "--relay", f"{INET_IP}:{port}", "--token", token, "--bytes", str(TEN_MB)]
    a = await lab.spawn("lan-a", argv)
    b = await lab.spawn("lan-b", argv)
    assert await a.wait(120) == 0, a.output
    assert await b.wait(120) == 0, b.output
    da, db = last_json(a, "done"), last_json(b, "done")
    assert da["ok"] and db["ok"] and da["bytes"] == db["bytes"] == TEN_MB
    assert last_json(a, "paired")["path"] == "relayed"
    paired = (await relay.wait_event("relay_paired", 30))
    # the relay saw the routers' public addresses, never the LAN hosts
    assert {paired["a"], paired["b"]} == {NATA_WAN, NATB_WAN}
    closed = await relay.wait_event("relay_circuit_closed", 30)
    assert closed["bytes"] == 2 * TEN_MB


async def test_relay_in_the_lab_refuses_unpaired_and_over_limit_circuits(lab, tmp_path) -> None:
    lab.up("cone", "symmetric")
    relay, port = await start_relay(lab, tmp_path, max_circuits="1", pair_timeout="3")
    # one unpaired stream fills the relay; a second one is refused as overloaded
    argv = [sys.executable, PEER, "relay", "--relay", f"{INET_IP}:{port}", "--bytes", "1", "--timeout", "30"]
    a = await lab.spawn("lan-a", [*argv, "--token", os.urandom(32).hex()])
    await a.wait_for('"waiting"', 30)
    b = await lab.spawn("lan-b", [*argv, "--token", os.urandom(32).hex()])
    assert await b.wait(60) != 0 and await a.wait(60) != 0
    codes = {p.host: last_json(p, "error")["code"] for p in (a, b)}
    assert codes == {"lan-a": "ERR_TIMEOUT", "lan-b": "ERR_OVERLOADED"}, (a.output, b.output)
