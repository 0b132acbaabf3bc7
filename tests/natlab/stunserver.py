"""A STUN binding responder for lab runs where no DHT node answers STUN yet.

    python tests/natlab/stunserver.py PORT [PORT ...]

Prints `{"event": "stun_ready", "ports": [...]}` and answers Binding requests
with the requester's reflexive address, on each port. The swarm's own STUN
responder lives on every DHT node's UDP port (swarmd/dht); this one exists so
the punching tests can also run standalone.
"""

from __future__ import annotations

import asyncio
import json
import sys

from swarmd.dht import stun


class Responder(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            req = stun.parse_message(data)
        except ValueError:
            return
        if req.msg_type != stun.BINDING_REQUEST:
            return
        resp = stun.encode_binding_response(req.transaction_id, (addr[0], addr[1]))
        self.transport.sendto(resp, addr)  # type: ignore[attr-defined]


async def main(ports: list[int]) -> None:
    loop = asyncio.get_running_loop()
    for port in ports:
        await loop.create_datagram_endpoint(Responder, local_addr=("0.0.0.0", port))
    print(json.dumps({"event": "stun_ready", "ports": ports}), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main([int(p) for p in sys.argv[1:]]))
