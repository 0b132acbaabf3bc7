"""TCP hole punching by simultaneous open: a punched path that is plain TCP.

Each side binds ONE local port (SO_REUSEADDR + SO_REUSEPORT) and uses it twice:
first to ping a relay (`rendezvous`), which answers with the address it saw the
connection come from (the NAT's TCP mapping for that port, see the PONG of
swarmd/net/relay.py); then, once the two sides swapped those addresses through
signalling, to connect() to the other side's mapping (`simultaneous_open`).
Through a NAT with endpoint-independent mapping (cone, restricted, full cone)
the connect leaves from the same public port the relay saw. The first SYN to
arrive at the other side's router is dropped (no mapping allows it in yet); the
second finds the first side's outbound entry and passes, and the kernels finish
the handshake (simultaneous open, RFC 793). Measured in the NAT lab: 1 ms,
several GiB/s. A symmetric NAT maps each destination to a new port, so the
connect leaves from a port the peer never heard of: against a cone peer that
takes a birthday search (below); two symmetric NATs are left to the relay.

What comes back is a connected socket; the caller runs its Noise connection on
it exactly as on a dialled TCP socket (swarmd.net.connection.SecureConnection).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import socket
import time
from dataclasses import dataclass
from typing import Any

from swarmd.errors import ERR_PROTOCOL, ERR_TIMEOUT, ERR_UNAVAILABLE, SwarmdError
from swarmd.net.nat import CONE, SYMMETRIC
from swarmd.net.relay import KIND_PING, ST_PONG, StatusDecoder, encode_hello
from swarmd.node.address import parse_hostport

Address = tuple[str, int]

RETRY_S = 0.01  # a refused connect (the peer's kernel answered RST before it connected) is retried this soon
MAX_STATUS_BYTES = 2 + 255  # one status frame
_RETRYABLE = {errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL}


def reuse_socket(port: int = 0, host: str = "0.0.0.0") -> socket.socket:
    """A non-blocking TCP socket bound to (host, port) that other sockets may bind too."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        s.bind((host, port))
    except BaseException:
        s.close()
        raise
    return s


def parse_observed(reason: str) -> Address | None:
    """The `observed=IP:PORT` field of a relay's PONG reason, or None (an older relay)."""
    for part in reason.split():
        if part.startswith("observed="):
            try:
                return parse_hostport(part[len("observed=") :], what="relay PONG observed=", bare_ipv6=True)
            except SwarmdError:
                return None
    return None


@dataclass
class Rendezvous:
    """Our side of a TCP punch: the bound port and its public mapping.

    The relay connection stays open until `close()`: it holds the router's
    mapping for the port while the punch runs."""

    sock: socket.socket
    port: int
    observed: Address
    seconds: float

    def close(self) -> None:
        self.sock.close()

    def detail(self, remote: Address) -> dict[str, object]:
        """Connection info of a punch made from this port to `remote`."""
        return {"local": f"{self.observed[0]}:{self.observed[1]}", "remote": f"{remote[0]}:{remote[1]}",
                "rendezvous_ms": round(self.seconds * 1000, 2)}


async def rendezvous(relay: Address, timeout: float = 3.0) -> Rendezvous:  # noqa: ASYNC109 - bound on the whole exchange
    """Bind a reusable port, ping `relay` from it, and learn the port's public mapping."""
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    sock = reuse_socket(0)
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, relay)
            await loop.sock_sendall(sock, encode_hello(KIND_PING))
            decoder = StatusDecoder()
            got = 0
            while not decoder.done:
                data = await loop.sock_recv(sock, MAX_STATUS_BYTES)
                got += len(data)
                if not data or got > 2 * MAX_STATUS_BYTES:
                    raise SwarmdError(ERR_PROTOCOL, f"relay {relay[0]}:{relay[1]} ended the ping without a PONG")
                statuses, _ = decoder.feed(data)
                for st in statuses:
                    if st.refused:
                        raise st.error()
                    if st.code == ST_PONG:
                        observed = parse_observed(st.reason)
                        if observed is None:
                            raise SwarmdError(
                                ERR_UNAVAILABLE, f"relay {relay[0]}:{relay[1]} does not report observed addresses"
                            )
                        port = sock.getsockname()[1]
                        return Rendezvous(sock, port, observed, time.monotonic() - t0)
            raise SwarmdError(ERR_PROTOCOL, f"relay {relay[0]}:{relay[1]} answered a ping without a PONG")
    except TimeoutError:
        sock.close()
        raise SwarmdError(ERR_TIMEOUT, f"relay {relay[0]}:{relay[1]} did not answer within {timeout:g}s") from None
    except OSError as e:
        sock.close()
        raise SwarmdError(ERR_UNAVAILABLE, f"relay {relay[0]}:{relay[1]} unreachable: {e.strerror or e}") from None
    except BaseException:
        sock.close()
        raise


async def simultaneous_open(port: int, remote: Address, timeout: float) -> socket.socket:  # noqa: ASYNC109
    """connect() from our punch port to the peer's mapping until it completes (bounded).

    A connect refused (the peer's kernel saw our SYN before its own connect) is
    retried from a fresh socket on the same port; a dropped SYN needs nothing:
    the peer's SYN, let in by our outbound one, completes the handshake."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = ""
    while True:
        left = deadline - loop.time()
        if left <= 0:
            raise SwarmdError(
                ERR_TIMEOUT, f"TCP simultaneous open to {remote[0]}:{remote[1]} did not complete in {timeout:g}s"
                + (f" ({last})" if last else "")
            )
        s = reuse_socket(port)
        try:
            async with asyncio.timeout(left):
                await loop.sock_connect(s, remote)
            return s
        except TimeoutError:
            s.close()
            continue  # the deadline check above raises
        except OSError as e:
            s.close()
            if e.errno not in _RETRYABLE:
                raise SwarmdError(ERR_UNAVAILABLE, f"TCP punch to {remote[0]}:{remote[1]}: {e.strerror or e}") from None
            last = e.strerror or str(e)
            await asyncio.sleep(min(RETRY_S, max(0.0, deadline - loop.time())))
        except BaseException:
            s.close()
            raise


def close_quietly(*socks: socket.socket | None) -> None:
    for s in socks:
        if s is not None:
            with contextlib.suppress(OSError):
                s.close()


# -- birthday punching: one side symmetric ---------------------------------------------------
#
# A symmetric NAT gives each destination a new random public port, so the simple
# simultaneous open above cannot meet it. The symmetric side instead connect()s from
# BIRTHDAY_SOCKETS fresh ports at the other side's mapping (opening that many random
# ports on its router; their SYNs die at the other router, which has seen nothing from
# them), and the other side connect()s from its one punch port at random ports of the
# symmetric side's address, BIRTHDAY_RATE per second. A SYN that lands on one of those
# ports passes (the router takes it for the reply to that socket's SYN) and the kernels
# finish a simultaneous open. ~1 in 250 probes hits; measured in the NAT lab
# (tests/natlab/tcpbirthday.py): cone x symmetric established in every trial.

BIRTHDAY_TIMEOUT = 6.0  # s: ~3000 probes at BIRTHDAY_RATE, a hit all but certain when the routers behave
BIRTHDAY_SOCKETS = 256
BIRTHDAY_RATE = 500.0  # probes per second from the non-symmetric side
BIRTHDAY_LIVE = 1024  # probes kept waiting at once (an older one's SYN had its chance)


async def _first_connected(socks: list[socket.socket], timeout: float, more: Any = None) -> socket.socket:  # noqa: ASYNC109
    """The first of `socks` whose connect() completes; the others are closed. `more`:
    an optional coroutine function called with the list every tick that may add sockets."""
    loop = asyncio.get_running_loop()
    won: asyncio.Future[socket.socket] = loop.create_future()
    watched: set[int] = set()

    def ready(s: socket.socket) -> None:
        loop.remove_writer(s.fileno())
        watched.discard(s.fileno())
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0 and not won.done():
            won.set_result(s)

    def watch(s: socket.socket) -> None:
        watched.add(s.fileno())
        loop.add_writer(s.fileno(), ready, s)

    for s in socks:
        watch(s)
    try:
        async with asyncio.timeout(timeout):
            if more is None:
                return await won
            while not won.done():
                for s in more(socks):
                    watch(s)
                while len(socks) > BIRTHDAY_LIVE:  # the oldest probe's SYN had its chance
                    old = socks.pop(0)
                    if old.fileno() in watched:
                        watched.discard(old.fileno())
                        loop.remove_writer(old.fileno())
                    old.close()
                await asyncio.wait([won], timeout=1.0 / BIRTHDAY_RATE)
            return won.result()
    except TimeoutError:
        raise SwarmdError(ERR_TIMEOUT, f"TCP birthday punch did not meet within {timeout:g}s") from None
    finally:
        for fd in list(watched):
            loop.remove_writer(fd)
        keep = won.result() if won.done() and not won.cancelled() else None
        close_quietly(*(s for s in socks if s is not keep))


def _connect_nowait(s: socket.socket, remote: Address) -> None:
    err = s.connect_ex(remote)
    if err not in (0, errno.EINPROGRESS, errno.EAGAIN):
        raise OSError(err, os.strerror(err))


async def birthday_many(remote: Address, timeout: float, sockets: int = BIRTHDAY_SOCKETS) -> socket.socket:  # noqa: ASYNC109
    """The symmetric side: connect() from `sockets` fresh ports at the peer's mapping; the
    one the peer's probe reaches completes (bounded by `timeout`)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(sockets):
            s = reuse_socket(0)
            socks.append(s)
            _connect_nowait(s, remote)
    except OSError as e:
        close_quietly(*socks)
        raise SwarmdError(ERR_UNAVAILABLE, f"TCP birthday punch to {remote[0]}:{remote[1]}: {e.strerror or e}") from None
    return await _first_connected(socks, timeout)


async def birthday_probe(port: int, remote_ip: str, timeout: float, rate: float = BIRTHDAY_RATE) -> socket.socket:  # noqa: ASYNC109
    """The other side: from our punch port, connect() at random ports of the symmetric side's
    address, `rate` per second (at most BIRTHDAY_LIVE waiting at once), until one completes."""
    loop = asyncio.get_running_loop()
    tried: set[int] = set()
    t0 = loop.time()

    def more(socks: list[socket.socket]) -> list[socket.socket]:
        due = int((loop.time() - t0) * rate) + 1 - len(tried)
        new = []
        for _ in range(max(0, min(due, 64))):
            p = random.randint(1024, 65535)
            while p in tried and len(tried) < 64000:
                p = random.randint(1024, 65535)
            tried.add(p)
            s = reuse_socket(port)
            try:
                _connect_nowait(s, (remote_ip, p))
            except OSError:
                s.close()
                continue
            socks.append(s)
            new.append(s)
        return new

    return await _first_connected([], timeout, more)


def is_birthday(mine: str, theirs: str) -> bool:
    """Exactly one side symmetric and the other cone (endpoint-independent mapping): the
    simultaneous open needs the birthday search; two symmetric sides cannot be punched."""
    return {mine, theirs} == {CONE, SYMMETRIC}


async def punch_open(rv: Rendezvous, remote: Address, mine: str, theirs: str, timeout: float) -> socket.socket:  # noqa: ASYNC109
    """The TCP punch that fits the two NAT types: a simultaneous open from our punch port, or
    one side of a birthday punch (`remote` is the peer's mapping as its relay saw it; a
    symmetric peer's port there means nothing, its address does)."""
    if not is_birthday(mine, theirs):
        return await simultaneous_open(rv.port, remote, timeout)
    if mine == SYMMETRIC:
        return await birthday_many(remote, timeout)
    return await birthday_probe(rv.port, remote[0], timeout)
