"""Ask the router to forward a port to us: PCP, then NAT-PMP, then UPnP-IGD.

The thin asyncio glue over the sans-IO codecs (swarmd/net/pcp.py,
swarmd/net/natpmp.py, swarmd/net/upnp.py). `PortMapper.map` tries the three
protocols against the default gateway, in that order (PCP and NAT-PMP are one
UDP round trip each; UPnP needs a multicast search, an HTTP GET and two SOAP
calls), and remembers which one answered so renewals and later mappings go
straight to it. Every exchange is bounded (RETRIES for UDP, `timeout` for
HTTP); a router that answers nothing costs about two seconds once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from swarmd.errors import ERR_UNAVAILABLE, SwarmdError
from swarmd.net import natpmp, pcp, upnp

Address = tuple[str, int]
T = TypeVar("T")
PCP, NATPMP, UPNP = "pcp", "natpmp", "upnp"
METHODS = (PCP, NATPMP, UPNP)
DESCRIPTION = "swarmd"
UPNP_PORT_TRIES = 4  # the suggested external port, then random ones on ConflictInMappingEntry


@dataclass
class Mapping:
    """A port the router forwards to us (until granted_at + lifetime; 0 = permanent, UPnP only)."""

    method: str
    protocol: str  # "tcp" | "udp"
    internal: Address
    external: Address
    lifetime: int
    granted_at: float
    nonce: bytes = b""  # PCP: names the mapping for renewals and the delete
    control_url: str = ""  # UPnP
    service_type: str = ""  # UPnP

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "protocol": self.protocol,
            "internal": f"{self.internal[0]}:{self.internal[1]}",
            "external": f"{self.external[0]}:{self.external[1]}",
            "lifetime": self.lifetime,
            "expires_in": round(self.granted_at + self.lifetime - time.monotonic(), 1) if self.lifetime else None,
        }


def default_gateway(route_file: str = "/proc/net/route") -> str | None:
    """The IPv4 default gateway (Linux), or None."""
    try:
        with open(route_file) as f:
            lines = f.read(65536).splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        cols = line.split()
        if len(cols) >= 3 and cols[1] == "00000000" and cols[2] != "00000000":
            with contextlib.suppress(ValueError, struct.error):
                return socket.inet_ntoa(struct.pack("<I", int(cols[2], 16)))
    return None


def local_address_towards(ip: str) -> str:
    """Our address on the interface that reaches `ip` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((ip, 9))
        return str(s.getsockname()[0])


class _Answers(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=64)
        self.refused: OSError | None = None  # ICMP port unreachable: nothing listens there

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.queue.full():
            self.queue.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, ConnectionRefusedError):
            self.refused = exc
            if not self.queue.full():
                self.queue.put_nowait(b"")  # wake the waiter


async def _get(queue: asyncio.Queue[T], seconds: float) -> T | None:
    """The next item, or None after `seconds` (asyncio.timeout: wait_for can swallow a cancel on 3.11)."""
    try:
        async with asyncio.timeout(seconds):
            return await queue.get()
    except TimeoutError:
        return None


async def udp_exchange(server: Address, request: bytes, parse: Callable[[bytes], T],
                       retries: tuple[float, ...] = natpmp.RETRIES) -> T:
    """Send `request` to `server` until `parse` accepts an answer (ValueError: not ours,
    keep waiting; a refusal from the router (NatPmpError/PcpError) is raised at once)."""
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(_Answers, remote_addr=server)
    try:
        last: Exception = TimeoutError(f"no answer from {server[0]}:{server[1]}")
        for wait in retries:
            transport.sendto(request)
            deadline = loop.time() + wait
            while (left := deadline - loop.time()) > 0:
                data = await _get(proto.queue, left)
                if data is None:
                    break
                if proto.refused is not None:
                    raise SwarmdError(ERR_UNAVAILABLE, f"port mapping: {server[0]}:{server[1]} refused (no server there)")
                try:
                    return parse(data)
                except (natpmp.NatPmpError, pcp.PcpError):
                    raise
                except ValueError as e:
                    last = e  # garbage or someone else's answer: keep listening
        raise SwarmdError(ERR_UNAVAILABLE, f"port mapping: {last}")
    finally:
        transport.close()


async def http_request(url: str, method: str = "GET", body: bytes = b"", headers: dict[str, str] | None = None,
                       timeout: float = 3.0) -> tuple[int, bytes]:  # noqa: ASYNC109 - bound on the whole exchange
    """One HTTP/1.1 exchange with the router (Connection: close), bounded in time and size."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 80
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(upnp.encode_http_request(method, url, body, headers))
            await writer.drain()
            data = bytearray()
            while chunk := await reader.read(16384):
                data += chunk
                if len(data) > upnp.MAX_HTTP:
                    raise ValueError(f"HTTP answer from {host}:{port} is over {upnp.MAX_HTTP} bytes")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return upnp.parse_http_response(bytes(data))


class PortMapper:
    """Maps ports on the default gateway; one per node (Traversal.portmap owns it)."""

    def __init__(self, gateway: str | None = None, lifetime: int = 3600, timeout: float = 3.0,
                 methods: tuple[str, ...] = METHODS) -> None:
        self.gateway = gateway
        self.lifetime = lifetime
        self.timeout = timeout
        self.methods = tuple(m for m in methods if m in METHODS)
        self.preferred: str | None = None  # the method that answered last
        self.errors: dict[str, str] = {}  # method -> why it did not map (last try)
        self._upnp: upnp.Gateway | None = None

    def _gateway(self) -> str:
        gw = self.gateway or default_gateway()
        if gw is None:
            raise SwarmdError(ERR_UNAVAILABLE, "no default gateway: nothing to ask for a port mapping")
        return gw

    async def map(self, protocol: str, internal_port: int, external_port: int = 0) -> Mapping:
        gw = self._gateway()
        local = local_address_towards(gw)
        order = ([self.preferred] if self.preferred else []) + [m for m in self.methods if m != self.preferred]
        for method in order:
            try:
                m = await self._map(method, gw, local, protocol, internal_port, external_port or internal_port)
            except (SwarmdError, ValueError, OSError, TimeoutError) as e:
                self.errors[method] = str(getattr(e, "message", e))[:200]
                continue
            self.errors.pop(method, None)
            self.preferred = method
            return m
        raise SwarmdError(ERR_UNAVAILABLE, "no port mapping: " + "; ".join(f"{k}: {v}" for k, v in self.errors.items()))

    async def renew(self, m: Mapping) -> Mapping:
        """Ask again for the same mapping (same nonce / external port) before it expires."""
        local = m.internal[0]
        if m.method == UPNP:
            return await self._map_upnp(local, m.protocol, m.internal[1], m.external[1], tries=1)
        gw = self._gateway()
        if m.method == PCP:
            return await self._map_pcp(gw, local, m.protocol, m.internal[1], m.external[1], m.nonce)
        return await self._map_natpmp(gw, local, m.protocol, m.internal[1], m.external[1])

    async def unmap(self, m: Mapping) -> None:
        if m.method == PCP:
            req = pcp.encode_map_request(m.nonce, m.protocol, m.internal[0], m.internal[1], 0, 0)
            await udp_exchange((self._gateway(), pcp.PORT), req,
                               lambda d: pcp.parse_map_response(d, m.nonce, m.protocol, m.internal[1]))
        elif m.method == NATPMP:
            req = natpmp.encode_map_request(m.protocol, m.internal[1], 0, 0)
            await udp_exchange((self._gateway(), natpmp.PORT), req,
                               lambda d: natpmp.parse_map_response(d, m.protocol, m.internal[1]))
        else:
            body, headers = upnp.encode_soap(m.service_type, "DeletePortMapping", [
                ("NewRemoteHost", ""), ("NewExternalPort", m.external[1]), ("NewProtocol", m.protocol.upper())])
            status, answer = await http_request(m.control_url, "POST", body, headers, self.timeout)
            upnp.parse_soap_response(status, answer, "DeletePortMapping")

    async def _map(self, method: str, gw: str, local: str, protocol: str, iport: int, eport: int) -> Mapping:
        if method == PCP:
            return await self._map_pcp(gw, local, protocol, iport, eport, pcp.new_nonce())
        if method == NATPMP:
            return await self._map_natpmp(gw, local, protocol, iport, eport)
        return await self._map_upnp(local, protocol, iport, eport)

    async def _map_pcp(self, gw: str, local: str, protocol: str, iport: int, eport: int, nonce: bytes) -> Mapping:
        req = pcp.encode_map_request(nonce, protocol, local, iport, eport, self.lifetime)

        def parse(data: bytes) -> pcp.MapResult:
            if pcp.is_natpmp_answer(data):
                raise pcp.PcpError(pcp.RESULT_UNSUPPORTED_VERSION)  # a NAT-PMP-only router
            return pcp.parse_map_response(data, nonce, protocol, iport)

        r = await udp_exchange((gw, pcp.PORT), req, parse)
        return Mapping(PCP, protocol, (local, iport), (r.external_address, r.external_port), r.lifetime,
                       time.monotonic(), nonce=nonce)

    async def _map_natpmp(self, gw: str, local: str, protocol: str, iport: int, eport: int) -> Mapping:
        ext = await udp_exchange((gw, natpmp.PORT), natpmp.encode_external_address_request(),
                                 natpmp.parse_external_address)
        r = await udp_exchange((gw, natpmp.PORT), natpmp.encode_map_request(protocol, iport, eport, self.lifetime),
                               lambda d: natpmp.parse_map_response(d, protocol, iport))
        return Mapping(NATPMP, protocol, (local, iport), (ext.address, r.external_port), r.lifetime, time.monotonic())

    async def discover_upnp(self, local: str) -> upnp.Gateway:
        """SSDP search from our LAN address, then the description of the first IGD that answers."""
        if self._upnp is not None:
            return self._upnp
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(local))
        sock.bind((local, 0))
        answers: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue(maxsize=64)

        class _Proto(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                if not answers.full():
                    answers.put_nowait((data, addr))

        transport, _ = await loop.create_datagram_endpoint(_Proto, sock=sock)
        try:
            last: Exception = TimeoutError("no UPnP gateway answered the SSDP search")
            for wait in natpmp.RETRIES:
                for st in upnp.IGD_TYPES:
                    transport.sendto(upnp.encode_msearch(st), upnp.SSDP_ADDR)
                deadline = loop.time() + wait
                while (left := deadline - loop.time()) > 0:
                    got = await _get(answers, left)
                    if got is None:
                        break
                    data, addr = got
                    try:
                        location = upnp.parse_ssdp_response(data, addr[0])
                        status, body = await http_request(location, timeout=self.timeout)
                        if status != 200:
                            raise ValueError(f"UPnP description {location} answered HTTP {status}")
                        self._upnp = upnp.parse_description(body, location)
                        return self._upnp
                    except (ValueError, OSError, TimeoutError) as e:
                        last = e
            raise SwarmdError(ERR_UNAVAILABLE, f"UPnP: {last}")
        finally:
            transport.close()

    async def _map_upnp(self, local: str, protocol: str, iport: int, eport: int, tries: int = UPNP_PORT_TRIES) -> Mapping:
        gw = await self.discover_upnp(local)

        async def call(action: str, args: list[tuple[str, str | int]]) -> dict[str, str]:
            body, headers = upnp.encode_soap(gw.service_type, action, args)
            status, answer = await http_request(gw.control_url, "POST", body, headers, self.timeout)
            return upnp.parse_soap_response(status, answer, action)

        ext = upnp.external_ip(await call("GetExternalIPAddress", []))
        lease = self.lifetime
        for attempt in range(tries):
            port = eport if attempt == 0 else random.randint(1024, 65535)
            args: list[tuple[str, str | int]] = [
                ("NewRemoteHost", ""), ("NewExternalPort", port), ("NewProtocol", protocol.upper()),
                ("NewInternalPort", iport), ("NewInternalClient", local), ("NewEnabled", 1),
                ("NewPortMappingDescription", DESCRIPTION), ("NewLeaseDuration", lease)]
            try:
                await call("AddPortMapping", args)
            except upnp.UpnpError as e:
                if e.code == upnp.ERR_ONLY_PERMANENT and lease:
                    lease = 0
                    args[-1] = ("NewLeaseDuration", 0)
                    await call("AddPortMapping", args)
                elif e.code == upnp.ERR_CONFLICT and attempt + 1 < tries:
                    continue
                else:
                    raise
            return Mapping(UPNP, protocol, (local, iport), (ext, port), lease, time.monotonic(),
                           control_url=gw.control_url, service_type=gw.service_type)
        raise SwarmdError(ERR_UNAVAILABLE, "UPnP: every external port tried is taken")
