"""Classify this host's NAT from STUN answers (lab tool around swarmd.net.nat).

    python tests/natlab/natprobe.py HOST:PORT [HOST:PORT ...]

Sends STUN Binding requests from ONE UDP socket (as a DHT node does from its
port) and prints the NatReport as JSON. The daemon runs the same classifier
with its DHT node's STUN client; this tool lets the lab check the classifier
against real kernel NAT on its own.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys

from swarmd.dht import stun
from swarmd.net.nat import NatConfig, detect_nat
from swarmd.node.address import parse_hostport


class Client(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.waiting: dict[bytes, asyncio.Future[tuple[str, int]]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            msg = stun.parse_message(data)
        except ValueError:
            return
        fut = self.waiting.pop(msg.transaction_id, None)
        if fut is not None and not fut.done():
            try:
                mapped = msg.mapped_address
            except ValueError:
                return
            if mapped is not None:
                fut.set_result(mapped)

    async def ask(self, server: tuple[str, int]) -> tuple[str, int] | None:
        tid = stun.new_transaction_id()
        req = stun.encode_binding_request(tid)
        fut = asyncio.get_running_loop().create_future()
        self.waiting[tid] = fut
        for _ in range(3):  # UDP: retransmit, as STUN clients do
            self.transport.sendto(req, server)  # type: ignore[attr-defined]
            try:
                return await asyncio.wait_for(asyncio.shield(fut), 0.5)
            except TimeoutError:
                continue
        return None


def local_ip_towards(server: tuple[str, int]) -> str:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(server)
        return s.getsockname()[0]
    finally:
        s.close()


async def main(servers: list[tuple[str, int]]) -> None:
    transport, client = await asyncio.get_running_loop().create_datagram_endpoint(Client, local_addr=("0.0.0.0", 0))
    port = transport.get_extra_info("sockname")[1]
    local = [(local_ip_towards(servers[0]), port)]
    report = await detect_nat(client.ask, servers, local, config=NatConfig(stun_timeout=2.0))
    print(json.dumps({"event": "nat", "local": f"{local[0][0]}:{port}", **report.to_dict()}), flush=True)
    transport.close()


if __name__ == "__main__":
    addrs = [parse_hostport(a, what="STUN server") for a in sys.argv[1:]]
    asyncio.run(main(addrs))
