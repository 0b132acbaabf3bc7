"""The DHT node of a daemon's settings (dht_config_from) and the bootstrap role, as the daemon composes them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from swarmd.dht.config import DhtConfig
from swarmd.dht.part import dht_config_from
from swarmd.errors import ERR_UNAVAILABLE, ConfigError, SwarmdError
from swarmd.node.identity import Identity
from swarmd.roles.bootstrap import BootstrapRole
from swarmd.settings import NodeConfig, Settings
from swarmd.swarm.stack import Stack, open_stack


def _ctx(**node: object) -> SimpleNamespace:
    settings = Settings(node=NodeConfig(host="127.0.0.1", **node), dht=DhtConfig(request_timeout=0.3))
    return SimpleNamespace(identity=Identity.generate(), settings=settings, ports={}, dht=None)


class DhtPart:
    """The daemon's stack (the one factory, swarmd.swarm.stack) built from the settings' DHT config."""

    def __init__(self, ctx: SimpleNamespace) -> None:
        self.ctx = ctx
        self.stack: Stack | None = None

    async def start(self) -> None:
        self.stack = await open_stack(self.ctx.identity, dht_config_from(self.ctx.settings))
        self.ctx.dht = self.stack.dht
        self.ctx.ports["dht"] = self.stack.dht.address[1]

    async def stop(self) -> None:
        if self.stack is not None:
            await self.stack.stop()


async def test_first_node_and_a_second_joining_through_it() -> None:
    first = _ctx()
    p1 = DhtPart(first)
    await p1.start()
    second = _ctx(bootstrap=[f"127.0.0.1:{first.ports['dht']}"])
    p2 = DhtPart(second)
    await p2.start()
    try:
        assert first.dht.mode == "server" and second.dht.mode == "server"
        assert second.dht.contacts() and first.dht.contacts()
        role = BootstrapRole(first)
        await role.start()
        assert role.status()["contacts"] == 1
    finally:
        await p2.stop()
        await p1.stop()


async def test_unreachable_bootstrap_fails_start_with_a_reason() -> None:
    ctx = _ctx(bootstrap=["127.0.0.1:9"])
    ctx.settings.node.dht_port = 0
    ctx.settings.node.bootstrap_wait = 1.0  # a daemon waits forever by default; this bounds it
    part = DhtPart(ctx)
    with pytest.raises(SwarmdError) as e:
        await part.start()
    assert e.value.code == ERR_UNAVAILABLE and "no bootstrap node answered" in e.value.message


def test_bad_bootstrap_entry_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        dht_config_from(Settings(node=NodeConfig(bootstrap=["nope"])))


async def test_a_node_listed_in_its_own_bootstrap_list_starts_as_the_first_node() -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = _ctx(bootstrap=[f"127.0.0.1:{port}"], dht_port=port)
    part = DhtPart(ctx)
    await part.start()
    try:
        assert ctx.dht.mode == "server" and ctx.dht.contacts() == []
    finally:
        await part.stop()
