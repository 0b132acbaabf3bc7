"""UPnP Internet Gateway Device, sans-IO: SSDP discovery, the device description, SOAP calls.

1. SSDP: an M-SEARCH datagram to 239.255.255.250:1900 asking for an
   InternetGatewayDevice; the router answers (unicast) an HTTP-like response
   whose LOCATION header names its description URL.
2. The description (XML over HTTP) lists services; we want a
   WANIPConnection (or WANPPPConnection) service and its controlURL.
3. SOAP over HTTP POST to that URL: GetExternalIPAddress, AddPortMapping,
   DeletePortMapping. A refusal is an HTTP 500 whose body holds a UPnP error
   code (718 ConflictInMappingEntry, 725 OnlyPermanentLeasesSupported, ...).

Everything a router (or anyone on the LAN) sends is bounded and checked: the
SSDP answer's LOCATION must point at the host that answered, HTTP answers are
at most MAX_HTTP bytes, XML with a DOCTYPE or entity is refused. Parsers
raise ValueError with a sentence naming what was wrong.
"""

from __future__ import annotations

import ipaddress
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit
from xml.sax.saxutils import escape

SSDP_ADDR = ("239.255.255.250", 1900)
IGD_TYPES = (
    "urn:schemas-upnp-org:device:InternetGatewayDevice:2",
    "urn:schemas-upnp-org:device:InternetGatewayDevice:1",
)
WAN_SERVICES = (
    "urn:schemas-upnp-org:service:WANIPConnection:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
)
MAX_SSDP = 2048  # an SSDP answer is a few hundred bytes
MAX_HTTP = 64 * 1024  # a description or SOAP answer
MAX_HEADERS = 64
ERR_CONFLICT = 718  # ConflictInMappingEntry: the external port is taken
ERR_ONLY_PERMANENT = 725  # OnlyPermanentLeasesSupported: ask again with lease 0
UPNP_ERRORS = {
    402: "invalid arguments",
    501: "action failed",
    606: "action not authorized",
    714: "no such entry in array",
    715: "wildcard not permitted in source IP",
    716: "wildcard not permitted in external port",
    718: "conflict in mapping entry",
    724: "same port values required",
    725: "only permanent leases supported",
    726: "remote host only supports wildcard",
    727: "external port only supports wildcard",
    728: "no port maps available",
    729: "conflict with other mechanism",
}


@dataclass(frozen=True)
class Gateway:
    control_url: str
    service_type: str


class UpnpError(ValueError):
    """The router refused a SOAP action (a well-formed UPnP error)."""

    def __init__(self, code: int, description: str = "") -> None:
        self.code = code
        text = description or UPNP_ERRORS.get(code, "unknown error")
        super().__init__(f"UPnP error {code}: {text}")


# -- SSDP ------------------------------------------------------------------------------


def encode_msearch(search_type: str = IGD_TYPES[1], mx: int = 1) -> bytes:
    return (
        "M-SEARCH * HTTP/1.1\r\n"
        f"HOST: {SSDP_ADDR[0]}:{SSDP_ADDR[1]}\r\n"
        'MAN: "ssdp:discover"\r\n'
        f"MX: {mx}\r\n"
        f"ST: {search_type}\r\n\r\n"
    ).encode()


def _headers(lines: list[str], what: str) -> dict[str, str]:
    if len(lines) > MAX_HEADERS:
        raise ValueError(f"{what} has {len(lines)} header lines, at most {MAX_HEADERS} allowed")
    out: dict[str, str] = {}
    for line in lines:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip() or name != name.strip():
            raise ValueError(f"{what} has a malformed header line {line[:60]!r}")
        out[name.strip().lower()] = value.strip()
    return out


def parse_ssdp_response(data: bytes, source_ip: str) -> str:
    """The description URL an SSDP answer from `source_ip` names (must be on that host)."""
    if len(data) > MAX_SSDP:
        raise ValueError(f"SSDP answer is {len(data)} bytes, at most {MAX_SSDP} expected")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("SSDP answer is not ASCII") from None
    head, _, _ = text.partition("\r\n\r\n")
    lines = head.split("\r\n")
    if not re.fullmatch(r"HTTP/1\.[01] 200 .*", lines[0]):
        raise ValueError(f"SSDP answer status line is {lines[0][:60]!r}, expected 'HTTP/1.1 200 OK'")
    headers = _headers(lines[1:], "SSDP answer")
    location = headers.get("location")
    if not location:
        raise ValueError("SSDP answer has no LOCATION header")
    _check_url(location, source_ip, "SSDP LOCATION")
    return location


def _check_url(url: str, host_ip: str, what: str) -> None:
    """An http URL on the router itself: a LAN neighbour must not send us elsewhere."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{what} {url[:80]!r} is not an http:// URL")
    try:
        host = ipaddress.IPv4Address(parts.hostname)
        port = parts.port
    except ValueError:
        raise ValueError(f"{what} {url[:80]!r} does not name an IPv4 address and port") from None
    if str(host) != host_ip:
        raise ValueError(f"{what} points at {host}, but {host_ip} answered")
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"{what} has port {port}")


# -- HTTP (the two requests we make: GET a description, POST a SOAP action) ------------


def encode_http_request(method: str, url: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    parts = urlsplit(url)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    lines = [f"{method} {path} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close",
             f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def parse_http_response(data: bytes) -> tuple[int, bytes]:
    """(status, body) of a complete HTTP/1.x answer read until the server closed."""
    if len(data) > MAX_HTTP:
        raise ValueError(f"HTTP answer is over {MAX_HTTP} bytes")
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError("HTTP answer ended inside its headers")
    try:
        lines = head.decode("latin-1").split("\r\n")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise ValueError("HTTP answer headers are not text") from None
    m = re.fullmatch(r"HTTP/1\.[01] (\d{3})(?: .*)?", lines[0])
    if not m:
        raise ValueError(f"HTTP status line is {lines[0][:60]!r}")
    headers = _headers(lines[1:], "HTTP answer")
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    elif "content-length" in headers:
        if not headers["content-length"].isdigit():
            raise ValueError(f"HTTP Content-Length is {headers['content-length'][:20]!r}")
        n = int(headers["content-length"])
        if n > len(body):
            raise ValueError(f"HTTP body is {len(body)} bytes, Content-Length said {n}")
        body = body[:n]
    return int(m.group(1)), body


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            raise ValueError("HTTP chunked body ends inside a chunk size line")
        size_text = data[pos:end].split(b";", 1)[0].strip()
        if not size_text or len(size_text) > 8 or not re.fullmatch(rb"[0-9a-fA-F]+", size_text):
            raise ValueError(f"HTTP chunk size {size_text[:20]!r} is not hexadecimal")
        size = int(size_text, 16)
        if size == 0:
            return bytes(out)
        if end + 2 + size > len(data):
            raise ValueError("HTTP chunked body is truncated")
        out += data[end + 2 : end + 2 + size]
        pos = end + 2 + size + 2


# -- XML -----------------------------------------------------------------------------------


def _xml(body: bytes, what: str) -> ET.Element:
    if len(body) > MAX_HTTP:
        raise ValueError(f"{what} is over {MAX_HTTP} bytes")
    if b"<!DOCTYPE" in body.upper() or b"<!ENTITY" in body.upper():
        raise ValueError(f"{what} declares a DOCTYPE or entity; refused")
    try:
        return ET.fromstring(body)
    except ET.ParseError as e:
        raise ValueError(f"{what} is not well-formed XML: {e}") from None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def parse_description(body: bytes, location: str) -> Gateway:
    """The WAN connection service of an IGD description fetched from `location`."""
    root = _xml(body, "UPnP description")
    base = location
    for el in root.iter():
        if _local(el.tag) == "URLBase" and el.text and el.text.strip():
            base = el.text.strip()
    found: dict[str, str] = {}
    for service in root.iter():
        if _local(service.tag) != "service":
            continue
        fields = {_local(c.tag): (c.text or "").strip() for c in service}
        stype, control = fields.get("serviceType", ""), fields.get("controlURL", "")
        if stype in WAN_SERVICES and control and stype not in found:
            found[stype] = control
    for stype in WAN_SERVICES:
        if stype in found:
            url = urljoin(base, found[stype])
            _check_url(url, urlsplit(location).hostname or "", "UPnP controlURL")
            return Gateway(url, stype)
    raise ValueError("UPnP description lists no WANIPConnection or WANPPPConnection service")


def encode_soap(service_type: str, action: str, args: list[tuple[str, str | int]]) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of a SOAP action call."""
    if not re.fullmatch(r"[A-Za-z]+", action):
        raise ValueError(f"SOAP action name {action!r} is not a word")
    inner = "".join(f"<{k}>{escape(str(v))}</{k}>" for k, v in args)
    body = (
        '<?xml version="1.0"?>'
        '<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
        's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/">'
        f'<s:Body><u:{action} xmlns:u="{escape(service_type)}">{inner}</u:{action}></s:Body></s:Envelope>'
    ).encode()
    headers = {"Content-Type": 'text/xml; charset="utf-8"', "SOAPAction": f'"{service_type}#{action}"'}
    return body, headers


def parse_soap_response(status: int, body: bytes, action: str) -> dict[str, str]:
    """The out-arguments of a SOAP answer; UpnpError for a UPnP fault."""
    root = _xml(body, f"SOAP answer to {action}")
    if status != 200:
        code, desc = None, ""
        for el in root.iter():
            if _local(el.tag) == "errorCode" and el.text and el.text.strip().isdigit():
                code = int(el.text.strip())
            elif _local(el.tag) == "errorDescription" and el.text:
                desc = el.text.strip()[:200]
        if code is None:
            raise ValueError(f"SOAP answer to {action} is HTTP {status} without a UPnP errorCode")
        raise UpnpError(code, desc)
    for el in root.iter():
        if _local(el.tag) == f"{action}Response":
            return {_local(c.tag): (c.text or "").strip()[:256] for c in el}
    raise ValueError(f"SOAP answer has no {action}Response element")


def external_ip(args: dict[str, str]) -> str:
    """The NewExternalIPAddress of a GetExternalIPAddress answer, checked."""
    raw = args.get("NewExternalIPAddress", "")
    try:
        addr = ipaddress.IPv4Address(raw)
    except ValueError:
        raise ValueError(f"UPnP external address {raw[:40]!r} is not an IPv4 address") from None
    if addr.is_unspecified or addr.is_multicast or addr.is_loopback:
        raise ValueError(f"UPnP external address {addr} is not a usable unicast address")
    return str(addr)
