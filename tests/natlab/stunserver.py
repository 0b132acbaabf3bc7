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

from aioice import stun


class Responder(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            req = stun.parse_message(data)
        except ValueError:
            return
        if req.message_method != stun.Method.BINDING or req.message_class != stun.Class.REQUEST:
            return
        resp = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE, transaction_id=req.transaction_id)
        resp.attributes["XOR-MAPPED-ADDRESS"] = (addr[0], addr[1])
        resp.add_fingerprint()
        self.transport.sendto(bytes(resp), addr)  # type: ignore[attr-defined]


async def main(ports: list[int]) -> None:
    loop = asyncio.get_running_loop()
    for port in ports:
        await loop.create_datagram_endpoint(Responder, local_addr=("0.0.0.0", port))
    print(json.dumps({"event": "stun_ready", "ports": ports}), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main([int(p) for p in sys.argv[1:]]))
