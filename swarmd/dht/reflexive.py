"""STUN on a DHT node's UDP socket: answering binding requests (so peers learn
their reflexive address from our own nodes, no public STUN server), asking
other nodes for ours, and the second port that answers STUN only.

The codec is ``swarmd.dht.stun`` (sans-IO); this is its asyncio glue, fed by
the DHT socket's datagram path (``swarmd.dht.wire``), which rate-limits first.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from swarmd.dht import stun
from swarmd.dht.routing import is_loopback

if TYPE_CHECKING:
    from swarmd.dht.wire import DatagramRpc

MAX_PENDING_STUN = 64
MAX_STUN_ALTERNATES = 256  # alternate STUN ports remembered from other nodes' answers


class StunAgent:
    """The STUN side of one DHT socket (its owner's transport, limits and log)."""

    def __init__(self, owner: DatagramRpc) -> None:
        self.owner = owner
        self._pending: dict[bytes, asyncio.Future[tuple[str, int]]] = {}
        # RFC 5780 style: a second socket that answers STUN only (see AltStunProtocol)
        self.alt: asyncio.DatagramTransport | None = None
        self.alt_port: int | None = None
        # alternate STUN ports other nodes named in their answers: (ip, port) -> alt port
        self.alternates: dict[tuple[str, int], int] = {}

    def on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        """A STUN message on the main socket: answer a binding request, settle our own."""
        owner = self.owner
        try:
            msg = stun.parse_message(data)
        except ValueError as e:
            owner.rlog.warn("bad_stun", "dropped malformed STUN message", error=str(e), source=addr[0])
            return
        if msg.msg_type == stun.BINDING_REQUEST:
            transport = owner.transport
            if transport is not None and not transport.is_closing():
                transport.sendto(
                    stun.encode_binding_response(msg.transaction_id, (addr[0], addr[1]), self.alt_port), addr
                )
        elif msg.msg_type == stun.BINDING_SUCCESS:
            fut = self._pending.pop(msg.transaction_id, None)
            if fut is None or fut.done():
                return
            try:
                mapped = msg.mapped_address
                other = msg.other_port
            except ValueError:
                mapped, other = None, None
            if mapped is None:
                fut.cancel()
                return
            if other is not None and other != addr[1]:
                if len(self.alternates) >= MAX_STUN_ALTERNATES:
                    self.alternates.pop(next(iter(self.alternates)))
                self.alternates[(addr[0], addr[1])] = other
            fut.set_result(mapped)

    def alt_request_ok(self, addr: tuple[str, int]) -> bool:
        """The alternate STUN socket applies the same per-IP and per-source limits."""
        owner = self.owner
        if not is_loopback(addr[0]) and not owner.ip_limiter.allow(addr[0]):
            return False
        return owner.limiter.allow(addr[:2])

    async def request(self, address: tuple[str, int], wait: float | None = None) -> tuple[str, int] | None:
        """Our reflexive address as seen by the node at address, or None."""
        transport = self.owner.transport
        if len(self._pending) >= MAX_PENDING_STUN or transport is None:
            return None
        tid = stun.new_transaction_id()
        fut: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
        self._pending[tid] = fut
        try:
            transport.sendto(stun.encode_binding_request(tid), address)
            async with asyncio.timeout(wait or self.owner._wait_timeout):
                return await fut
        except (TimeoutError, OSError, TypeError, ValueError):
            return None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # our caller was cancelled: never swallow that
            return None  # the answer's future was cancelled (no mapped address, or closing)
        finally:
            self._pending.pop(tid, None)

    def close(self) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.cancel()
        self._pending.clear()
        if self.alt is not None:
            self.alt.close()
            self.alt = None


class AltStunProtocol(asyncio.DatagramProtocol):
    """The DHT node's second UDP socket: answers STUN binding requests, nothing else.

    A client that knows one DHT node asks it on both ports; a NAT that maps each
    destination to a new port (symmetric) shows two mappings, a cone one. The main
    socket names this port in OTHER-ADDRESS. Same size in as out: no amplification.
    """

    def __init__(self, agent: StunAgent) -> None:
        self.agent = agent
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        rlog = self.agent.owner.rlog
        try:
            if not stun.looks_like_stun(data) or not self.agent.alt_request_ok(addr):
                return
            msg = stun.parse_message(data)
            if msg.msg_type == stun.BINDING_REQUEST and self.transport is not None:
                self.transport.sendto(stun.encode_binding_response(msg.transaction_id, (addr[0], addr[1])), addr)
        except ValueError as e:
            rlog.warn("bad_stun", "dropped malformed STUN message", error=str(e), source=addr[0])
        except Exception as e:  # asyncio closes the socket when this raises: never let a peer do that
            rlog.warn("internal", "dropped datagram that broke its handler", error=f"{type(e).__name__}: {e}"[:160])

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors from clients that went away: nothing to do


__all__ = ["AltStunProtocol", "StunAgent"]
