"""UDP hole punching, birthday punching included, and UDX on the punched socket.

Each side opens a UDP socket, learns its reflexive address from one of our own
DHT nodes (STUN on that very socket), and sends the other side an offer
(`PunchOffer`: a punch id, its addresses, its NAT type) through signalling.
Then both send small probes to every address the other listed; a probe that
arrives is answered with an ack to the address it came from (peer-reflexive:
what lets a restricted cone meet a symmetric NAT). The caller takes the first
(socket, address) that a probe or ack arrived on and opens UDX there
(swarmd/net/udx.py, the punch id as its token); the callee serves UDX on the
socket whose peer sends the first UDX SYN.
Probing stops at the first hit.

Birthday punching, when exactly one side is behind a symmetric NAT (a new
public port for every destination): the symmetric side opens
BIRTHDAY_SOCKETS sockets and sends from each to the other side, which opens
that many mappings on its router; the other side sends probes to random ports
of the symmetric side's public IP at BIRTHDAY_RATE per second until one lands
on an open mapping (256 of ~64,000 ports: a hit every ~250 probes, ~0.5 s).
Both numbers are bounds: sockets are closed as soon as one socket won, probes
stop at the first hit or at the timeout. Two symmetric NATs are not punched.

Probe wire format (UDP, 21 bytes): b"\\x00SWP" | u8 kind (1 probe, 2 ack) |
punch id[16]. The first byte is 0x00, so a probe can never be taken for a UDX
packet (magic 0x55) nor for STUN (which parses its own magic cookie).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loguru import logger

from swarmd.dht import stun
from swarmd.errors import ERR_BAD_REQUEST, ERR_TIMEOUT, ERR_UNAVAILABLE, SwarmdError
from swarmd.net.udx import is_udx_syn

if TYPE_CHECKING:
    from swarmd.net.udxio import UdxTransport

Address = tuple[str, int]

PROBE_MAGIC = b"\x00SWP"
PROBE = 1
ACK = 2
PROBE_LEN = len(PROBE_MAGIC) + 1 + 16
ID_LEN = 16
MAX_ADDRS = 8  # addresses one offer may list
PROBE_INTERVAL = 0.02  # to each listed address, until the first hit
BIRTHDAY_SOCKETS = 256  # sockets the symmetric side opens (bounded: each is a file descriptor)
BIRTHDAY_RATE = 500.0  # random-port probes per second from the other side
BIRTHDAY_RESEND = 1.0  # the symmetric side re-opens its mappings this often
STUN_TIMEOUT = 1.0
NAT_TYPES = ("public", "cone", "symmetric", "unknown", "udp_blocked")
SOCKET_BUFFER = 4 << 20  # SO_RCVBUF/SO_SNDBUF asked for (the kernel caps them)


def tune_socket(sock: socket.socket | None) -> None:
    """Bigger kernel buffers: a burst of a congestion window must not overflow them."""
    if sock is None:
        return
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)


async def udp_socket(host: str = "0.0.0.0", port: int = 0) -> tuple[asyncio.DatagramTransport, Any]:
    """A fresh UDP socket with an inert protocol (callers set their own)."""
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=(host, port))
    tune_socket(transport.get_extra_info("socket"))
    return transport, proto


def encode_probe(kind: int, punch_id: bytes) -> bytes:
    if kind not in (PROBE, ACK) or len(punch_id) != ID_LEN:
        raise ValueError("a punch probe is kind 1 or 2 with a 16-byte punch id")
    return PROBE_MAGIC + bytes([kind]) + punch_id


def parse_probe(datagram: bytes) -> tuple[int, bytes]:
    """(kind, punch id) of a probe; ValueError saying why for anything else."""
    if len(datagram) != PROBE_LEN:
        raise ValueError(f"a punch probe is {PROBE_LEN} bytes, got {len(datagram)}")
    if datagram[:4] != PROBE_MAGIC:
        raise ValueError("not a punch probe (magic)")
    kind = datagram[4]
    if kind not in (PROBE, ACK):
        raise ValueError(f"unknown punch probe kind {kind}")
    return kind, bytes(datagram[5:])


@dataclass(frozen=True)
class PunchOffer:
    """What one side tells the other through signalling (msgpack map on the wire)."""

    punch_id: bytes  # 16 random bytes chosen by the caller; the callee repeats it
    addrs: tuple[Address, ...]  # where to send probes: reflexive first, then local ones
    nat: str  # the sender's NAT type (decides who opens many sockets)
    public: Address | None = None  # the reflexive address (its IP is what birthday probing targets)

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.punch_id,
            "addrs": [[h, p] for h, p in self.addrs],
            "nat": self.nat,
            "public": [self.public[0], self.public[1]] if self.public else None,
        }


def _address(value: Any, what: str) -> Address:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not isinstance(value[0], str)
        or not isinstance(value[1], int)
        or isinstance(value[1], bool)
        or not 0 < value[1] <= 65535
    ):
        raise SwarmdError(ERR_BAD_REQUEST, f"punch offer '{what}' must be [IPv4 address, port 1..65535]")
    try:
        packed = socket.inet_aton(value[0])
    except OSError:
        raise SwarmdError(ERR_BAD_REQUEST, f"punch offer '{what}' host must be an IPv4 address") from None
    if socket.inet_ntoa(packed) != value[0]:
        raise SwarmdError(ERR_BAD_REQUEST, f"punch offer '{what}' host must be a dotted IPv4 address")
    return (value[0], value[1])


def parse_offer(obj: Any) -> PunchOffer:
    """Validate an offer read from a peer; SwarmdError(ERR_BAD_REQUEST) names the field."""
    if not isinstance(obj, dict):
        raise SwarmdError(ERR_BAD_REQUEST, f"punch offer must be a map, got {type(obj).__name__}")
    pid = obj.get("id")
    if not isinstance(pid, bytes) or len(pid) != ID_LEN:
        raise SwarmdError(ERR_BAD_REQUEST, "punch offer 'id' must be 16 bytes")
    addrs = obj.get("addrs")
    if not isinstance(addrs, list) or not 1 <= len(addrs) <= MAX_ADDRS:
        raise SwarmdError(ERR_BAD_REQUEST, f"punch offer 'addrs' must list 1..{MAX_ADDRS} addresses")
    nat = obj.get("nat")
    if nat not in NAT_TYPES:
        raise SwarmdError(ERR_BAD_REQUEST, f"punch offer 'nat' must be one of {', '.join(NAT_TYPES)}")
    public = obj.get("public")
    return PunchOffer(
        pid,
        tuple(_address(a, "addrs") for a in addrs),
        nat,
        None if public is None else _address(public, "public"),
    )


@dataclass
class PunchResult:
    """How the punch went: connection info and logs."""

    local: str = ""
    remote: str = ""
    remote_type: str = ""  # listed (an address the peer offered) / prflx (only seen on the wire)
    birthday: bool = False
    sockets: int = 0
    probes: int = 0
    punch_s: float = 0.0
    open_s: float = 0.0  # the UDX handshake on the punched socket

    def to_dict(self) -> dict[str, Any]:
        return {
            "local": self.local,
            "remote": self.remote,
            "remote_type": self.remote_type,
            "birthday": self.birthday,
            "sockets": self.sockets,
            "probes": self.probes,
            "punch_ms": round(self.punch_s * 1000, 1),
            "open_ms": round(self.open_s * 1000, 1),
        }


class _Probe(asyncio.DatagramProtocol):
    def __init__(self, owner: UdpPuncher, index: int) -> None:
        self.owner = owner
        self.index = index

    def datagram_received(self, data: bytes, addr: Address) -> None:  # type: ignore[override]
        self.owner._received(self.index, data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP unreachable from a closed mapping: expected while punching


async def _stun_on(transport: asyncio.DatagramTransport, proto: _Probe, servers: list[Address]) -> Address | None:
    """Our reflexive address as one of `servers` sees this socket (first answer wins)."""
    tids = {}
    for server in servers[:3]:
        tid = stun.new_transaction_id()
        tids[tid] = server
        with contextlib.suppress(OSError):
            transport.sendto(stun.encode_binding_request(tid), server)
    fut = asyncio.get_running_loop().create_future()
    proto.owner._stun_waiters[proto.index] = (tids, fut)
    try:
        async with asyncio.timeout(STUN_TIMEOUT):
            return await fut
    except TimeoutError:
        return None
    finally:
        proto.owner._stun_waiters.pop(proto.index, None)


@dataclass
class _State:
    seen: dict[int, set[Address]] = field(default_factory=dict)  # socket index -> addresses a valid probe came from


class UdpPuncher:
    """One side of one UDP punch. Caller: `offer = await p.prepare()`, send it, get the
    answer, `transport = await p.connect(answer, timeout)`. Callee: `p =
    UdpPuncher(..., punch_id=offer.punch_id)`, `answer = await p.prepare(offer)`, return
    it, then `await p.connect(offer, timeout)`."""

    def __init__(
        self,
        stun_servers: list[Address],
        nat: str,
        *,
        initiator: bool,
        punch_id: bytes | None = None,
        peer_nat: str | None = None,
        birthday_sockets: int = BIRTHDAY_SOCKETS,
        birthday_rate: float = BIRTHDAY_RATE,
    ) -> None:
        if not stun_servers:
            raise SwarmdError(ERR_UNAVAILABLE, "hole punching needs at least one of our STUN servers (DHT nodes)")
        self.stun_servers = list(stun_servers)
        self.nat = nat
        self.initiator = initiator
        self.punch_id = punch_id if punch_id is not None else os.urandom(ID_LEN)
        self.peer_nat = peer_nat
        self.birthday_sockets = max(1, birthday_sockets)
        self.birthday_rate = birthday_rate
        self._sockets: list[tuple[asyncio.DatagramTransport, _Probe]] = []
        self._stun_waiters: dict[int, tuple[dict[bytes, Address], asyncio.Future[Address]]] = {}
        self._state = _State()
        self._hit: asyncio.Future[tuple[int, Address, bytes | None]] | None = None
        self._peer: PunchOffer | None = None
        self._closed = False
        self.result = PunchResult()
        self.log = logger.bind(part="udppunch")

    # -- set-up ------------------------------------------------------------------------

    def _many(self, peer_nat: str | None) -> bool:
        """Open a socket per birthday slot: we are symmetric, the peer is not."""
        return self.nat == "symmetric" and peer_nat not in (None, "symmetric")

    async def _open(self, count: int) -> None:
        for _ in range(count - len(self._sockets)):
            index = len(self._sockets)
            try:
                t, _p = await udp_socket()
            except OSError as e:  # out of descriptors (many birthday punches at once): punch with fewer
                if not self._sockets:
                    raise SwarmdError(ERR_UNAVAILABLE, f"cannot open a UDP socket to punch with: {e}") from None
                self.log.bind(event="punch_sockets_short", opened=len(self._sockets), wanted=count).warning(
                    "birthday punching with fewer sockets: {}", e
                )
                return
            proto = _Probe(self, index)
            t.set_protocol(proto)
            self._sockets.append((t, proto))

    async def prepare(self, peer: PunchOffer | None = None) -> PunchOffer:
        """Open the socket(s), learn our reflexive address, and return our offer."""
        if peer is not None:
            self.peer_nat = peer.nat
        self._hit = asyncio.get_running_loop().create_future()
        count = self.birthday_sockets if self._many(self.peer_nat) else 1
        await self._open(1)
        first, proto = self._sockets[0]
        public = await _stun_on(first, proto, self.stun_servers)
        # the caller does not know the callee's NAT yet: open the others in connect()
        await self._open(count)
        port = first.get_extra_info("sockname")[1]
        addrs: list[Address] = [public] if public else []
        for ip in _local_ips(self.stun_servers[0]):
            if (ip, port) not in addrs:
                addrs.append((ip, port))
        if not addrs:
            raise SwarmdError(ERR_UNAVAILABLE, "no address to offer for punching")
        self.result.sockets = len(self._sockets)
        return PunchOffer(self.punch_id, tuple(addrs[:MAX_ADDRS]), self.nat, public)

    # -- punching ----------------------------------------------------------------------

    def _received(self, index: int, data: bytes, addr: Address) -> None:
        if self._closed:
            return
        if stun.looks_like_stun(data):
            waiter = self._stun_waiters.get(index)
            if waiter is None:
                return
            tids, fut = waiter
            with contextlib.suppress(ValueError):
                msg = stun.parse_message(data)
                if msg.msg_type == stun.BINDING_SUCCESS and tids.get(msg.transaction_id) == addr:
                    mapped = msg.mapped_address
                    if mapped is not None and not fut.done():
                        fut.set_result(mapped)
            return
        hit = self._hit
        if hit is None:
            return
        if is_udx_syn(data):
            # callee: the first UDX SYN from an address that sent us a valid probe wins
            if not self.initiator and addr in self._state.seen.get(index, ()) and not hit.done():
                hit.set_result((index, addr, data))
            return
        try:
            kind, pid = parse_probe(data)
        except ValueError:
            return  # strays and garbage: a punch socket answers nothing else
        if pid != self.punch_id:
            return
        self._state.seen.setdefault(index, set()).add(addr)
        if len(self._state.seen[index]) > 64:  # bounded: a flood of spoofed sources cannot grow it
            self._state.seen[index].pop()
        transport = self._sockets[index][0]
        if kind == PROBE:
            with contextlib.suppress(OSError):
                transport.sendto(encode_probe(ACK, self.punch_id), addr)
        if self.initiator and not hit.done():
            hit.set_result((index, addr, None))

    async def _probe_loop(self, peer: PunchOffer) -> None:
        """Probe every listed address from every socket (bounded), plus random ports of a
        symmetric peer's IP (birthday), until the first hit."""
        assert self._hit is not None
        probe = encode_probe(PROBE, self.punch_id)
        birthday_ip = None
        if peer.nat == "symmetric" and self.nat != "symmetric":
            birthday_ip = (peer.public or peer.addrs[0])[0]
            self.result.birthday = True
        if self._many(peer.nat):
            self.result.birthday = True
        loop = asyncio.get_running_loop()
        rng = random.SystemRandom()
        last_all = -1e9
        interval = PROBE_INTERVAL
        while not self._hit.done():
            now = loop.time()
            # every socket to every listed address; many sockets: once per BIRTHDAY_RESEND
            resend = BIRTHDAY_RESEND if len(self._sockets) > 1 else PROBE_INTERVAL
            if now - last_all >= resend:
                last_all = now
                for t, _p in self._sockets:
                    for a in peer.addrs:
                        with contextlib.suppress(OSError):
                            t.sendto(probe, a)
                            self.result.probes += 1
                    if self._hit.done():
                        break
                    if len(self._sockets) > 1:
                        await asyncio.sleep(0)  # 256 sockets: do not hog the loop
            if birthday_ip is not None:
                n = max(1, int(self.birthday_rate * interval))
                t0 = self._sockets[0][0]
                for _ in range(n):
                    with contextlib.suppress(OSError):
                        t0.sendto(probe, (birthday_ip, rng.randint(1024, 65535)))
                        self.result.probes += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await asyncio.shield(self._hit)

    async def connect(self, peer: PunchOffer, timeout: float) -> UdxTransport:
        """Punch (bounded) and open UDX on the socket that got through."""
        if self._hit is None:
            raise RuntimeError("prepare() first")
        if peer.punch_id != self.punch_id:
            raise SwarmdError(ERR_BAD_REQUEST, "punch answer carries another punch id than offered")
        self._peer = peer
        self.peer_nat = peer.nat
        if peer.nat == "symmetric" and self.nat == "symmetric":
            await self.close()
            raise SwarmdError(ERR_UNAVAILABLE, "both sides are behind symmetric NATs: no punch can work")
        if self._many(peer.nat):
            await self._open(self.birthday_sockets)
            self.result.sockets = len(self._sockets)
        t0 = time.monotonic()
        deadline = t0 + timeout
        prober = asyncio.get_running_loop().create_task(self._probe_loop(peer))
        try:
            try:
                async with asyncio.timeout(timeout):
                    index, addr, first = await asyncio.shield(self._hit)
            except TimeoutError:
                raise SwarmdError(
                    ERR_TIMEOUT, f"no punched UDP path within {timeout:g}s ({self.result.probes} probes)"
                ) from None
        except BaseException:
            prober.cancel()
            await asyncio.gather(prober, return_exceptions=True)
            await self.close()
            raise
        prober.cancel()
        await asyncio.gather(prober, return_exceptions=True)
        self.result.punch_s = time.monotonic() - t0
        self.result.remote = f"{addr[0]}:{addr[1]}"
        self.result.remote_type = "listed" if addr in peer.addrs else "prflx"
        udp = self._sockets[index][0]
        sock = udp.get_extra_info("sockname")
        self.result.local = f"{sock[0]}:{sock[1]}"
        if self.initiator:  # acks first: the callee accepts UDX only from an address it saw
            for _ in range(2):
                with contextlib.suppress(OSError):
                    udp.sendto(encode_probe(ACK, self.punch_id), addr)
        # every other socket closes now; the winner belongs to UDX
        self._sockets.pop(index)
        self._closed = True
        self._close_sockets()
        t1 = time.monotonic()
        left = max(0.5, deadline - t1)
        from swarmd.net.udxio import UdxTransport

        udx = await UdxTransport.open(udp, addr, token=self.punch_id, is_client=self.initiator, timeout=left, first=first)
        self.result.open_s = time.monotonic() - t1
        return udx

    def _close_sockets(self) -> None:
        socks, self._sockets = self._sockets, []
        for t, _p in socks:
            t.close()

    async def close(self) -> None:
        """Close every socket still ours (the winner, once handed to UDX, is not)."""
        self._closed = True
        self._close_sockets()
        if self._hit is not None and not self._hit.done():
            self._hit.cancel()


def _local_ips(towards: Address) -> list[str]:
    """Our address on the route to `towards` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(towards)
            return [s.getsockname()[0]]
        except OSError:
            return []
