"""A departed DHT node costs at most one wait (issue 17: after a node left, every new CLI
call took ~3 s longer for 30-60 s): a contact that timed out is evicted and not learned
again from others' replies, and nodes that hand a silent contact out check it, so the
next newcomer is not sent to it."""

from __future__ import annotations

import asyncio
import time

from swarmd.dht.node import DhtNode
from swarmd.dht.protocol import SwarmdProtocol
from swarmd.dht.records import topic_from_name
from swarmd.node.identity import Identity
from tests.dht_testnet import DhtTestnet, dht_config, record_for

CHECK_AFTER = 0.5  # contact_check_after, shrunk so the test takes seconds
# ...and the check budget scaled by the same factor (10 s -> 0.5 s: x20), so the compressed
# clock does not let checks of live contacts during the testnet's own start-up use it up
CHECKS_PER_S = 20.0


class RecordingNode(DhtNode):
    """A DhtNode that notes the destination of every DHT request it sends."""

    sent: list[tuple[str, int]]

    def _create_protocol(self) -> SwarmdProtocol:
        proto = super()._create_protocol()
        self.sent = []
        original = proto.request

        def request(address, method, *args, **kw):  # noqa: ANN001, ANN003, ANN202 - pass-through
            self.sent.append((address[0], address[1]))
            return original(address, method, *args, **kw)

        proto.request = request  # type: ignore[method-assign]
        return proto


async def _until(cond, timeout: float = 20.0) -> None:  # noqa: ANN001, ASYNC109
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def _net_with_departed(n: int, gone: int) -> tuple[DhtTestnet, list[DhtNode], bytes]:
    net = await DhtTestnet.create(n, contact_check_after=CHECK_AFTER)
    topic = topic_from_name("dead-contacts", None)
    await net.nodes[1].announce(record_for(Identity.generate(), topic))
    departed = net.nodes[-gone:]
    for node in departed:  # like kill -9: the socket closes, nothing is withdrawn
        await node.stop()
    net.nodes = net.nodes[:-gone]
    await asyncio.sleep(CHECK_AFTER * 2)  # the survivors last heard from them a while ago
    return net, departed, topic


async def test_a_lookup_pays_for_a_departed_contact_once():
    net = await DhtTestnet.create(1, contact_check_after=CHECK_AFTER)
    boot = [net.nodes[0].address]
    for _ in range(5):
        await net.add(contact_check_after=CHECK_AFTER)
    node = RecordingNode(Identity.generate(), dht_config(bootstrap=boot, contact_check_after=CHECK_AFTER))
    await node.start()
    net.nodes.append(node)
    topic = topic_from_name("dead-contacts", None)
    try:
        await net.nodes[1].announce(record_for(Identity.generate(), topic))
        departed = net.nodes[4:6]
        gone = {d.address for d in departed}
        await _until(lambda: gone <= {(ip, port) for _, ip, port in node.contacts()})
        for d in departed:  # like kill -9: the socket closes, nothing is withdrawn
            await d.stop()
        assert len(await node.lookup_all(topic)) == 1
        # the lookup did not wait for the silent ones; their requests time out behind it and evict them
        await _until(lambda: not gone & {(ip, port) for _, ip, port in node.contacts()})
        assert all(node.protocol.is_dead(d.node_id) for d in departed)
        node.sent.clear()
        assert len(await node.lookup_all(topic)) == 1
        assert node.sent and not gone & set(node.sent), "a second lookup asked a contact that already timed out"
    finally:
        await net.close()


async def test_the_next_newcomer_is_not_sent_to_a_departed_node():
    net = await DhtTestnet.create(7, contact_check_after=CHECK_AFTER, contact_checks_per_s=CHECKS_PER_S)
    topic = topic_from_name("dead-contacts", None)
    boot = [net.nodes[0].address]
    try:
        await net.nodes[1].announce(record_for(Identity.generate(), topic))
        departed, net.nodes = net.nodes[5:], net.nodes[:5]
        gone = {d.address for d in departed}
        for d in departed:
            await d.stop()
        await asyncio.sleep(CHECK_AFTER * 2)  # the survivors last heard from them a while ago
        first = RecordingNode(Identity.generate(), dht_config(bootstrap=boot, mode="client"))
        await first.start()
        try:
            assert len(await first.lookup_all(topic)) == 1
        finally:
            await first.stop()
        assert gone & set(first.sent)  # the first newcomer learnt them from the survivors and tried
        # every survivor that handed the departed contacts out pinged them, and evicts them on the timeout
        await _until(lambda: all(not gone & {(ip, port) for _, ip, port in n.contacts()} for n in net.nodes))
        second = RecordingNode(Identity.generate(), dht_config(bootstrap=boot, mode="client"))
        await second.start()
        try:
            assert len(await second.lookup_all(topic)) == 1
        finally:
            await second.stop()
        assert second.sent and not gone & set(second.sent), "a newcomer was sent to a departed node again"
    finally:
        await net.close()
