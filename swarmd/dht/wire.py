"""The DHT's datagram RPC: framing, hostile-input limits, request/response
matching and the background tasks of one UDP socket, under the kademlia layer.

rpcudp (which kademlia builds on) decodes each datagram in a task of its own,
so an undecodable one ends that task with a traceback, and lets a bad address
reach ``sendto``, which closes the socket. Here every datagram is decoded
synchronously within a size cap and per-source and per-IP rates, anything a
peer sends that breaks a handler is one rate-limited log line, and sends are
guarded. Datagrams carrying the STUN magic cookie go to ``swarmd.dht.reflexive``.

Wire format (same framing as rpcudp, documented in docs/dht.md): a request is
``0x00 | 20-byte id | msgpack([method, [args...]])``, a response
``0x01 | id | msgpack(result)``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any

import msgpack
from rpcudp.protocol import RPCProtocol

from swarmd.dht import stun
from swarmd.dht.config import DhtConfig
from swarmd.dht.reflexive import StunAgent
from swarmd.dht.routing import ID_SIZE, is_loopback, valid_ip, valid_port
from swarmd.node.loglimit import LogLimiter
from swarmd.node.ratelimit import RateLimiter
from swarmd.node.supervisor import LOG, Supervisor

REQUEST = 0x00
RESPONSE = 0x01

Handler = Callable[..., Any]
Reply = asyncio.Future[tuple[bool, Any]]  # (True, result) or (False, None)
Notify = Callable[[Reply], None]


class DatagramRpc(RPCProtocol):
    """One UDP socket's requests and answers; subclasses fill `_handlers` (method -> handler)."""

    def __init__(self, config: DhtConfig, bind: dict[str, Any] | None = None, tasks: Supervisor | None = None) -> None:
        """`tasks`: the scope its background work runs in; failures there are logged,
        rate-limited, and never stop the node."""
        RPCProtocol.__init__(self, wait_timeout=config.request_timeout)
        self.config = config
        self.rlog = LogLimiter(period=1.0, **(bind or {}))  # a line a second per kind
        self.limiter = RateLimiter(config.per_source_rate, config.per_source_burst, config.max_sources_tracked)
        self.ip_limiter = RateLimiter(config.per_ip_rate, config.per_ip_burst, config.max_sources_tracked)
        self.stun = StunAgent(self)
        self._handlers: dict[str, Handler] = {}
        self._packer = msgpack.Packer(use_bin_type=True)
        self._closing = False
        # msg id -> (future, deadline, destination), oldest first: every request waits the
        # same time, so one timer at the oldest deadline times them all out in order (a
        # timer per request costs a heap push and a cancelled handle left in the loop's heap)
        self._outstanding: dict[bytes, tuple[Reply, float, tuple[str, int], Notify | None]] = {}
        self._expiry: asyncio.TimerHandle | None = None
        self.closed = asyncio.get_running_loop().create_future()
        owner = tasks if tasks is not None else Supervisor(name="dht", policy=LOG)
        self.tasks = owner.scope("protocol", LOG, report=self._report)

    # -- task ownership ------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str = "dht-task") -> asyncio.Task[Any] | None:
        """Run a background coroutine in this protocol's scope (cancelled on close)."""
        if self.transport is None or self.transport.is_closing():
            coro.close()
            return None
        try:
            return self.tasks.spawn(coro, name)
        except RuntimeError:  # the scope is closed: we are stopping
            return None

    def _report(self, where: str, exc: BaseException) -> None:
        self.rlog.warn("task_error", "dht background task failed", task=where, error=f"{type(exc).__name__}: {exc}")

    async def aclose(self) -> None:
        self._closing = True  # requests cut short by the close evict nobody
        await self.tasks.close()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        outstanding, self._outstanding = self._outstanding, {}
        for fut, _deadline, _dest, notify in outstanding.values():
            self._settle(fut, (False, None), notify)
        self.stun.close()
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like: the request simply times out
        self.rlog.warn("socket_error", "dht socket error", error=str(exc))

    # -- datagram path -------------------------------------------------------

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        # asyncio closes a datagram transport when this raises: nothing a peer
        # sends may get that far, whatever slipped past the typed checks below
        try:
            self._datagram(data, addr)
        except Exception as e:
            self.rlog.warn(
                "internal", "dropped datagram that broke its handler", error=f"{type(e).__name__}: {e}"[:160]
            )

    def _datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) > self.config.max_datagram:
            self.rlog.warn("oversized", "dropped oversized datagram", size=len(data), source=addr[0])
            return
        if not is_loopback(addr[0]) and not self.ip_limiter.allow(addr[0]):
            self.rlog.warn("flood_ip", "dropped datagram over the per-IP rate", source=addr[0])
            return
        if not self.limiter.allow(addr[:2]):
            self.rlog.warn(
                "flood", "dropped datagram over the per-source rate", source=f"{addr[0]}:{addr[1]}"
            )
            return
        if stun.looks_like_stun(data):
            self.stun.on_datagram(data, addr)
            return
        if len(data) < 22 or data[0] not in (REQUEST, RESPONSE):
            self.rlog.warn(
                "garbage", "dropped datagram that is neither rpc nor stun", size=len(data), source=addr[0]
            )
            return
        msg_id = data[1:21]
        try:
            body = msgpack.unpackb(
                data[21:],
                raw=False,
                strict_map_key=False,
                max_ext_len=0,
            )
        except Exception as e:  # msgpack raises ValueError, ExtraData, FormatError, StackError...
            self.rlog.warn(
                "undecodable", "dropped undecodable datagram", error=type(e).__name__, source=addr[0]
            )
            return
        if data[0] == RESPONSE:
            self._on_response(msg_id, body, addr)
        else:
            self._on_request(msg_id, body, addr)

    def _on_response(self, msg_id: bytes, body: Any, addr: tuple[str, int]) -> None:
        entry = self._outstanding.get(msg_id)
        if entry is None:
            self.rlog.warn("unsolicited", "dropped response to no outstanding request", source=addr[0])
            return
        future, _deadline, dest, notify = entry
        if (addr[0], addr[1]) != dest:
            self.rlog.warn("spoofed", "dropped response from another address than asked", source=addr[0])
            return
        del self._outstanding[msg_id]
        self._settle(future, (True, body), notify)

    def _on_request(self, msg_id: bytes, body: Any, addr: tuple[str, int]) -> None:
        if (
            not isinstance(body, list)
            or len(body) != 2
            or not isinstance(body[0], str)
            or not isinstance(body[1], list)
        ):
            self.rlog.warn("malformed", "dropped malformed rpc request", source=addr[0])
            return
        name, args = body
        handler = self._handlers.get(name)
        if handler is None:
            self.rlog.warn(
                "unknown_method", "dropped request for unknown dht method", method=name[:32], source=addr[0]
            )
            return
        try:
            result = handler((addr[0], addr[1]), *args)
        except (TypeError, ValueError, AttributeError) as e:
            self.rlog.warn(
                "bad_args", "dropped dht request with bad arguments", method=name, error=str(e)[:120]
            )
            return
        self._send(RESPONSE, msg_id, result, (addr[0], addr[1]))

    def _send(self, kind: int, msg_id: bytes, obj: Any, addr: tuple[str, int]) -> bool:
        if self.transport is None or self.transport.is_closing():
            return False
        data = bytes([kind]) + msg_id + self._packer.pack(obj)
        if len(data) > self.config.max_datagram:
            self.rlog.warn("reply_too_large", "refused to send datagram over the size cap", size=len(data))
            return False
        try:
            self.transport.sendto(data, addr)
        except (OSError, TypeError, ValueError) as e:
            self.rlog.warn("send_error", "dht send failed", error=str(e)[:120])
            return False
        return True

    # -- outgoing requests ---------------------------------------------------

    def _new_msg_id(self) -> bytes:
        while True:
            mid = os.urandom(ID_SIZE)
            if mid[3:7] != stun.COOKIE_BYTES:  # keep rpc datagrams distinguishable from STUN
                return mid

    def request(
        self, address: tuple[str, int], method: str, *args: Any, notify: Notify | None = None
    ) -> Reply:
        """Send one request; the future resolves to (True, result) or (False, None)
        after the configured timeout. Never raises for a bad address. `notify(future)`
        runs as it resolves, in the same step (a done-callback would wait a loop turn:
        a lookup's next request leaves one turn sooner per hop)."""
        loop = asyncio.get_running_loop()
        future: Reply = loop.create_future()
        if not (
            isinstance(address, (tuple, list))
            and len(address) == 2
            and valid_ip(address[0])
            and valid_port(address[1])
        ) or not self._send(REQUEST, msg_id := self._new_msg_id(), [method, list(args)], (address[0], address[1])):
            future.set_result((False, None))
            if notify is not None:
                loop.call_soon(notify, future)  # after the caller has the future
            return future
        self._outstanding[msg_id] = (future, loop.time() + self._wait_timeout, (address[0], address[1]), notify)
        if self._expiry is None:
            self._expiry = loop.call_later(self._wait_timeout, self._expire)
        return future

    def _settle(self, future: Reply, result: tuple[bool, Any], notify: Notify | None) -> None:
        if future.done():
            return
        future.set_result(result)
        if notify is not None:
            try:
                notify(future)
            except Exception as e:  # a reply handler's bug: never the socket's, never the timer's
                self.rlog.warn("internal", "dht reply handler failed", error=f"{type(e).__name__}: {e}"[:160])

    def _expire(self) -> None:
        """Time out the requests whose deadline passed; re-arm for the oldest left."""
        self._expiry = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        outstanding = self._outstanding
        while outstanding:
            msg_id = next(iter(outstanding))
            future, deadline, _dest, notify = outstanding[msg_id]
            if deadline > now:
                self._expiry = loop.call_at(deadline, self._expire)
                return
            del outstanding[msg_id]
            self._settle(future, (False, None), notify)


__all__ = ["REQUEST", "RESPONSE", "DatagramRpc"]
