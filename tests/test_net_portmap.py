"""Port-mapping codecs (NAT-PMP, PCP, UPnP-IGD) against well-formed and hostile answers,
and the UDP exchange glue on loopback. The real router is tested in the lab
(tests/test_nat_portmap_lab.py, miniupnpd)."""

from __future__ import annotations

import asyncio
import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmd.errors import SwarmdError
from swarmd.net import natpmp, pcp, upnp
from swarmd.net.portmap import default_gateway, udp_exchange

# -- NAT-PMP ---------------------------------------------------------------------------------


def _pmp_map_answer(op: int = 2, result: int = 0, iport: int = 4000, eport: int = 4000, lifetime: int = 3600) -> bytes:
    return struct.pack("!BBHIHHI", 0, 128 + op, result, 77, iport, eport, lifetime)


def test_natpmp_requests_are_the_rfc_layout() -> None:
    assert natpmp.encode_external_address_request() == b"\x00\x00"
    assert natpmp.encode_map_request("tcp", 4000, 4001, 7200) == struct.pack("!BBHHHI", 0, 2, 0, 4000, 4001, 7200)
    assert natpmp.encode_map_request("udp", 4000, 0, 0)[1] == 1
    for bad in (("sctp", 1, 1, 1), ("tcp", 0, 1, 1), ("tcp", 1, 70000, 1), ("tcp", 1, 1, -1)):
        with pytest.raises(ValueError):
            natpmp.encode_map_request(*bad)


def test_natpmp_answers_are_checked_against_the_request() -> None:
    r = natpmp.parse_map_response(_pmp_map_answer(), "tcp", 4000)
    assert (r.external_port, r.lifetime, r.epoch) == (4000, 3600, 77)
    ext = natpmp.parse_external_address(struct.pack("!BBHI", 0, 128, 0, 5) + bytes([198, 18, 0, 11]))
    assert ext.address == "198.18.0.11"
    cases = {
        b"": "shorter than its 4-byte header",
        _pmp_map_answer()[:15]: "expected 16",
        _pmp_map_answer() + b"\x00": "expected 16",
        _pmp_map_answer(op=1): "expected 130",  # a UDP answer to a TCP request
        b"\x02" + _pmp_map_answer()[1:]: "version 2",
        _pmp_map_answer(iport=4001): "internal port 4001",
        _pmp_map_answer(eport=0): "external port 0",
    }
    for data, words in cases.items():
        with pytest.raises(ValueError, match=words):
            natpmp.parse_map_response(data, "tcp", 4000)
    with pytest.raises(natpmp.NatPmpError, match="not authorized") as e:
        natpmp.parse_map_response(_pmp_map_answer(result=2), "tcp", 4000)
    assert e.value.code == 2
    with pytest.raises(ValueError, match="not a usable"):
        natpmp.parse_external_address(struct.pack("!BBHI", 0, 128, 0, 5) + bytes(4))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40) | st.binary(min_size=12, max_size=12).map(lambda b: b"\x00\x82\x00\x00" + b))
def test_natpmp_parsers_only_raise_value_error(data: bytes) -> None:
    for parse in (lambda d: natpmp.parse_map_response(d, "tcp", 4000), natpmp.parse_external_address):
        try:
            parse(data)
        except ValueError:
            pass


# -- PCP ---------------------------------------------------------------------------------------

NONCE = bytes(range(12))


def _mapped(ip: str) -> bytes:
    return b"\x00" * 10 + b"\xff\xff" + ipaddress.IPv4Address(ip).packed


def _pcp_answer(result: int = 0, nonce: bytes = NONCE, proto: int = 6, iport: int = 4000, eport: int = 4000,
                ext: bytes | None = None, lifetime: int = 3600, r_op: int = 0x81, options: bytes = b"") -> bytes:
    header = struct.pack("!BBBBII", 2, r_op, 0, result, lifetime, 99) + bytes(12)
    body = nonce + struct.pack("!B3xHH", proto, iport, eport) + (ext if ext is not None else _mapped("198.18.0.12"))
    return header + body + options


def test_pcp_map_request_layout() -> None:
    req = pcp.encode_map_request(NONCE, "udp", "198.19.2.2", 4000, 4000, 120)
    assert len(req) == 60 and req[:2] == b"\x02\x01" and struct.unpack_from("!I", req, 4)[0] == 120
    assert req[8:24] == _mapped("198.19.2.2") and req[24:36] == NONCE and req[36] == 17
    for bad in ((b"short", "udp", "1.2.3.4", 1, 1, 1), (NONCE, "udp", "::1", 1, 1, 1), (NONCE, "icmp", "1.2.3.4", 1, 1, 1)):
        with pytest.raises(ValueError):
            pcp.encode_map_request(*bad)


def test_pcp_answers_are_checked_against_the_request() -> None:
    r = pcp.parse_map_response(_pcp_answer(), NONCE, "tcp", 4000)
    assert (r.external_address, r.external_port, r.lifetime, r.epoch) == ("198.18.0.12", 4000, 3600, 99)
    assert pcp.parse_map_response(_pcp_answer(options=bytes(8)), NONCE, "tcp", 4000).external_port == 4000
    cases = {
        _pcp_answer()[:23]: "shorter than its 24-byte header",
        _pcp_answer()[:59]: "shorter than header",
        _pcp_answer(options=bytes(3)): "multiple of 4",
        _pcp_answer(options=bytes(1100)): "more than 1100",
        _pcp_answer(r_op=0x01): "R bit clear",
        _pcp_answer(r_op=0x82): "expected MAP",
        b"\x01" + _pcp_answer()[1:]: "version 1",
        _pcp_answer(nonce=bytes(12)): "another mapping nonce",
        _pcp_answer(proto=17): "protocol 17",
        _pcp_answer(iport=1): "internal port 1",
        _pcp_answer(eport=0): "external port 0",
        _pcp_answer(ext=bytes(16)): "not an IPv4-mapped",
        _pcp_answer(ext=_mapped("0.0.0.0")): "0.0.0.0",
    }
    for data, words in cases.items():
        with pytest.raises(ValueError, match=words):
            pcp.parse_map_response(data, NONCE, "tcp", 4000)
    with pytest.raises(pcp.PcpError, match="address mismatch") as e:
        pcp.parse_map_response(_pcp_answer(result=12, lifetime=30), NONCE, "tcp", 4000)
    assert (e.value.code, e.value.lifetime) == (12, 30)


def test_a_natpmp_only_router_is_recognised_by_its_answer_to_pcp() -> None:
    assert pcp.is_natpmp_answer(struct.pack("!BBHI", 0, 129, 1, 5))
    assert not pcp.is_natpmp_answer(_pcp_answer()) and not pcp.is_natpmp_answer(b"\x00")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120) | st.binary(min_size=36, max_size=80).map(lambda b: b"\x02\x81\x00\x00" + bytes(20) + b))
def test_pcp_parser_only_raises_value_error(data: bytes) -> None:
    try:
        pcp.parse_map_response(data, NONCE, "tcp", 4000)
    except ValueError:
        pass


# -- UPnP ----------------------------------------------------------------------------------

SSDP_OK = (b"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
           b"LOCATION: http://198.19.2.1:5000/rootDesc.xml\r\nSERVER: x\r\n\r\n")

DESCRIPTION = b"""<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0"><device><deviceList><device><deviceList><device>
<serviceList><service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:2</serviceType>
<controlURL>/ctl/IPConn</controlURL></service></serviceList></device></deviceList></device></deviceList></device></root>"""

FAULT = b"""<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><s:Fault>
<faultcode>s:Client</faultcode><detail><UPnPError xmlns="urn:schemas-upnp-org:control-1-0"><errorCode>718</errorCode>
<errorDescription>ConflictInMappingEntry</errorDescription></UPnPError></detail></s:Fault></s:Body></s:Envelope>"""


def test_ssdp_answer_must_point_at_the_host_that_answered() -> None:
    assert upnp.parse_ssdp_response(SSDP_OK, "198.19.2.1") == "http://198.19.2.1:5000/rootDesc.xml"
    with pytest.raises(ValueError, match="points at 198.19.2.1, but 198.19.2.7 answered"):
        upnp.parse_ssdp_response(SSDP_OK, "198.19.2.7")
    for data, words in {
        SSDP_OK.replace(b"LOCATION", b"X-LOC"): "no LOCATION",
        SSDP_OK.replace(b"200 OK", b"404 NF"): "status line",
        SSDP_OK.replace(b"http://198.19.2.1:5000", b"https://198.19.2.1"): "not an http",
        SSDP_OK.replace(b"198.19.2.1:5000", b"router.lan"): "IPv4 address",
        SSDP_OK + b"\xff": "not ASCII",
        SSDP_OK.replace(b"SERVER: x\r\n", b"X: y\r\n" * 100): "header lines",
        b"x" * 3000: "bytes",
    }.items():
        with pytest.raises(ValueError, match=words):
            upnp.parse_ssdp_response(data, "198.19.2.1")


def test_description_yields_the_wan_connection_service_on_the_router() -> None:
    gw = upnp.parse_description(DESCRIPTION, "http://198.19.2.1:5000/rootDesc.xml")
    assert gw == upnp.Gateway("http://198.19.2.1:5000/ctl/IPConn", "urn:schemas-upnp-org:service:WANIPConnection:2")
    elsewhere = DESCRIPTION.replace(b"/ctl/IPConn", b"http://203.0.113.9/ctl")
    with pytest.raises(ValueError, match="controlURL points at 203.0.113.9"):
        upnp.parse_description(elsewhere, "http://198.19.2.1:5000/rootDesc.xml")
    with pytest.raises(ValueError, match="no WANIPConnection"):
        upnp.parse_description(DESCRIPTION.replace(b"WANIPConnection", b"Layer3Forwarding"), "http://198.19.2.1:5000/")
    bomb = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]>'
            b"<root>&lol2;</root>")
    with pytest.raises(ValueError, match="DOCTYPE"):
        upnp.parse_description(bomb, "http://198.19.2.1:5000/")
    with pytest.raises(ValueError, match="not well-formed"):
        upnp.parse_description(b"<root><device>", "http://198.19.2.1:5000/")


def test_soap_call_and_answers() -> None:
    body, headers = upnp.encode_soap("urn:schemas-upnp-org:service:WANIPConnection:1", "AddPortMapping",
                                     [("NewPortMappingDescription", "a<b&c"), ("NewExternalPort", 4000)])
    assert b"<NewPortMappingDescription>a&lt;b&amp;c</NewPortMappingDescription>" in body
    assert headers["SOAPAction"] == '"urn:schemas-upnp-org:service:WANIPConnection:1#AddPortMapping"'
    with pytest.raises(ValueError):
        upnp.encode_soap("x", "Add<Port>", [])
    ok = (b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>'
          b'<u:GetExternalIPAddressResponse xmlns:u="x"><NewExternalIPAddress>198.18.0.12</NewExternalIPAddress>'
          b"</u:GetExternalIPAddressResponse></s:Body></s:Envelope>")
    assert upnp.external_ip(upnp.parse_soap_response(200, ok, "GetExternalIPAddress")) == "198.18.0.12"
    with pytest.raises(upnp.UpnpError, match="718") as e:
        upnp.parse_soap_response(500, FAULT, "AddPortMapping")
    assert e.value.code == upnp.ERR_CONFLICT
    with pytest.raises(ValueError, match="without a UPnP errorCode"):
        upnp.parse_soap_response(500, FAULT.replace(b"errorCode", b"code"), "AddPortMapping")
    with pytest.raises(ValueError, match="no AddPortMappingResponse"):
        upnp.parse_soap_response(200, ok, "AddPortMapping")
    for bad in ("", "0.0.0.0", "224.0.0.1", "not-an-ip", "::1"):
        with pytest.raises(ValueError):
            upnp.external_ip({"NewExternalIPAddress": bad})


def test_http_answers_are_bounded_and_framed() -> None:
    assert upnp.parse_http_response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef") == (200, b"abc")
    assert upnp.parse_http_response(b"HTTP/1.0 500 Internal\r\n\r\nbody") == (500, b"body")
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"
    assert upnp.parse_http_response(chunked) == (200, b"abcde")
    for data, words in {
        b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc": "Content-Length said 9",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n": "Content-Length is",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n": "not hexadecimal",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nff\r\nabc": "truncated",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n": "inside a chunk size",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n": "inside its headers",
        b"SIP/2.0 200 OK\r\n\r\n": "status line",
        b"HTTP/1.1 200 OK\r\n" + b"x" * (upnp.MAX_HTTP + 1): "over",
    }.items():
        with pytest.raises(ValueError, match=words):
            upnp.parse_http_response(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_upnp_parsers_only_raise_value_error(data: bytes) -> None:
    for parse in (
        lambda d: upnp.parse_ssdp_response(d, "198.19.2.1"),
        upnp.parse_http_response,
        lambda d: upnp.parse_description(d, "http://198.19.2.1:5000/"),
        lambda d: upnp.parse_soap_response(500, d, "AddPortMapping"),
        lambda d: upnp.parse_http_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + d),
    ):
        try:
            parse(data)
        except ValueError:
            pass


# -- glue --------------------------------------------------------------------------------------


def test_default_gateway_reads_the_route_table(tmp_path) -> None:
    table = tmp_path / "route"
    table.write_text("Iface\tDestination\tGateway\tFlags\n"
                     "eth0\t0002A8C0\t00000000\t0001\n"
                     "eth0\t00000000\t010213C6\t0003\n")
    assert default_gateway(str(table)) == "198.19.2.1"
    table.write_text("Iface\tDestination\tGateway\n eth0\t0002A8C0\t00000000\n")
    assert default_gateway(str(table)) is None
    assert default_gateway(str(tmp_path / "missing")) is None


class _Router(asyncio.DatagramProtocol):
    """Answers each request with garbage first, then (if given) the real answer."""

    def __init__(self, answer: bytes | None) -> None:
        self.answer = answer
        self.requests = 0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.requests += 1
        self.transport.sendto(b"\x00\x81junk", addr)  # an answer to another opcode
        self.transport.sendto(b"", addr)
        if self.answer is not None:
            self.transport.sendto(self.answer, addr)


async def test_udp_exchange_skips_garbage_and_takes_the_answer() -> None:
    loop = asyncio.get_running_loop()
    transport, router = await loop.create_datagram_endpoint(lambda: _Router(_pmp_map_answer()), local_addr=("127.0.0.1", 0))
    try:
        server = transport.get_extra_info("sockname")
        req = natpmp.encode_map_request("tcp", 4000, 4000, 60)
        r = await udp_exchange(server, req, lambda d: natpmp.parse_map_response(d, "tcp", 4000))
        assert r.external_port == 4000 and router.requests == 1
        router.answer = _pmp_map_answer(result=3)  # a refusal ends the exchange at once
        with pytest.raises(natpmp.NatPmpError, match="network failure"):
            await udp_exchange(server, req, lambda d: natpmp.parse_map_response(d, "tcp", 4000))
        router.answer, router.requests = None, 0  # only garbage: every retry spent, then unavailable
        with pytest.raises(SwarmdError, match="port mapping"):
            await udp_exchange(server, req, lambda d: natpmp.parse_map_response(d, "tcp", 4000), retries=(0.05, 0.05))
        assert router.requests == 2
    finally:
        transport.close()


async def test_udp_exchange_fails_fast_when_nothing_listens() -> None:
    with socket_port() as port:
        pass  # a port that was free a moment ago: the kernel answers ICMP port unreachable
    with pytest.raises(SwarmdError, match="refused"):  # (not "no answer": it did not wait the retries out)
        await udp_exchange(("127.0.0.1", port), b"\x00\x00", natpmp.parse_external_address, retries=(2.0, 2.0))


class socket_port:
    def __enter__(self) -> int:
        import socket

        self.s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.s.bind(("127.0.0.1", 0))
        return self.s.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.s.close()
