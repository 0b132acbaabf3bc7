"""Network addresses: the one reader of `HOST:PORT` text and of `[host, port]` pairs.

Operators write `HOST:PORT` (`--bootstrap`, `--http`, `gateway.grpc`, rack
addresses, `KEY@HOST:PORT`), peers send `[host, port]` pairs (DHT records,
signal requests, registerWorker); both are read here, by the same rules, so a
string one part accepts is never refused by another. It sits in node/, the
lowest layer, because the DHT (below net/) reads bootstrap strings too.

Rules: a host is 1..253 characters, a name or IPv4 address of letters, digits,
'.', '-' and '_', or an IPv6 address, which text writes in brackets
(`[::1]:8080`; a bare `::1:8080` is ambiguous and refused) and a pair writes
bare; a port is 1..65535 (0 too for a listen address: any free port). Errors
name the setting or field, the value, what was expected and what was wrong;
their code is ERR_CONFIG for the operator's text unless the caller says whose
input it is (`error=`), ERR_BAD_REQUEST for a peer's pair.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

from swarmd.errors import ConfigError, SwarmdError, bad_request

Address = tuple[str, int]
MAX_HOST = 253  # a DNS name's limit; an IPv6 address with a zone fits too
MAX_TEXT = MAX_HOST + len("[]:65535")
_NAME = re.compile(r"[A-Za-z0-9._-]+")

ErrorFactory = Callable[[str], SwarmdError]


def host_problem(host: str) -> str | None:
    """What is wrong with a bare host (no brackets), or None when it is fine."""
    if not host:
        return "the host is empty"
    if len(host) > MAX_HOST:
        return f"the host is {len(host)} characters long; at most {MAX_HOST}"
    if "[" in host or "]" in host:
        return "a bare host has no brackets"
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"host {host!r:.80} has ':' but is not an IPv6 address"
        return None
    if not _NAME.fullmatch(host):
        return f"host {host!r:.80} may hold only letters, digits, '.', '-' and '_'"
    return None


def _port_problem(port: int, low: int) -> str | None:
    return None if low <= port <= 65535 else f"port {port} is out of range"


def _split(text: str, bare_ipv6: bool) -> tuple[str, str] | str:
    """'HOST:PORT' / '[V6]:PORT' -> (host, port text), or what is wrong with it."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            return "'[' is never closed"
        host, rest = text[1:close], text[close + 1 :]
        if "[" in host or "]" in rest or "[" in rest:
            return "brackets are unbalanced"
        if not rest.startswith(":"):
            return "no ':PORT' after ']'" if not rest else f"{rest[:1]!r} after ']'; expected ':PORT'"
        if ":" not in host:
            return "brackets hold an IPv6 address only"
        return host, rest[1:]
    if "[" in text or "]" in text:
        return "brackets go around the host only, as [::1]:PORT"
    host, sep, port = text.rpartition(":")
    if not sep:
        return "no ':PORT'"
    if ":" in host and not bare_ipv6:
        return "an IPv6 host goes in brackets, as [::1]:PORT"
    return host, port


def parse_hostport(
    text: Any, *, what: str, listen: bool = False, error: ErrorFactory = ConfigError, bare_ipv6: bool = False
) -> Address:
    """'HOST:PORT' or '[IPV6]:PORT' -> (host, port); `error(message)` is raised on bad text.

    A listen address may say port 0 (any free port, reported in the ready event's ports),
    as node.port does: tests and side-by-side runs then never race for a port picked in advance.
    `bare_ipv6` reads 'IPV6:PORT' too, for machine-written text whose port is never left out
    (an older relay's PONG `observed=`): its last ':' can only be the port's.
    """
    low = 0 if listen else 1
    expect = f"must look like HOST:PORT or [IPV6]:PORT with a port from {low} to 65535"
    if not isinstance(text, str):
        raise error(f"{what} {expect}, got {type(text).__name__} {text!r:.80}")
    if not text:
        raise error(f"{what} {expect}, got an empty string")
    if len(text) > MAX_TEXT:
        raise error(f"{what} {expect}, got {len(text)} characters (at most {MAX_TEXT})")
    parts = _split(text, bare_ipv6)
    if isinstance(parts, str):
        raise error(f"{what} {text!r} {expect}: {parts}")
    host, port_s = parts
    if not port_s:
        raise error(f"{what} {text!r} {expect}: the port is missing")
    if not (port_s.isascii() and port_s.isdigit() and len(port_s) <= 5):
        raise error(f"{what} {text!r} {expect}: port {port_s!r:.20} is not a number")
    port = int(port_s)
    problem = host_problem(host) or _port_problem(port, low)
    if problem:
        raise error(f"{what} {text!r} {expect}: {problem}")
    return host, port


def parse_address(value: Any, what: str, *, listen: bool = False, error: ErrorFactory = bad_request) -> Address:
    """[host, port] (list or tuple, as msgpack and records carry it) -> (host, port)."""
    low = 0 if listen else 1
    expect = f"must be [host, port] with a port from {low} to 65535"
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise error(f"{what} {expect}, got {value!r:.80}")
    host, port = value
    if not isinstance(host, str):
        raise error(f"{what} {expect}: the host is {type(host).__name__}, not a string")
    if not isinstance(port, int) or isinstance(port, bool):
        raise error(f"{what} {expect}: the port is {type(port).__name__} {port!r:.20}, not an integer")
    problem = host_problem(host) or _port_problem(port, low)
    if problem:
        raise error(f"{what} {expect}: {problem}")
    return host, port


def format_hostport(host: str, port: int) -> str:
    """(host, port) -> the text parse_hostport reads back: IPv6 hosts in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
