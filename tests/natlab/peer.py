"""A lab peer: connects to another lab peer over one path and streams a payload both ways.

Run inside a lab namespace by the natlab tests and bench/nat.py:

    peer.py relay   --relay 198.18.0.1:PORT --token HEX [--bytes N]
    peer.py upgrade --relay 198.18.0.1:PORT --token HEX --side a|b --stun HOST:PORT[,..]
    peer.py listen  --port PORT                 (a public peer: plain TCP)
    peer.py direct  --connect HOST:PORT [--bytes N]

`upgrade` opens the relayed circuit first (it always works), swaps UDP punch
offers over it (swarmd/net/udppunch.py; `--nat symmetric` on one side makes it
a birthday punch), tries to punch (UDX on the punched socket), and streams over the punched path when
both sides got it, otherwise over the relay: the order a relayed connection
follows when it keeps trying to punch.

Prints one JSON line per step ("paired", "punch", then "done" with the path,
the digest check and the throughput); exits non-zero with an "error" line on
failure. The payload is derived from the token, so both ends know what to expect.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import struct
import sys
import time
from typing import Any

from swarmd.errors import SwarmdError
from swarmd.net.relayio import open_circuit
from swarmd.net.udppunch import UdpPuncher, parse_offer
from swarmd.node.address import parse_hostport

CHUNK = 256 * 1024
MAX_CONTROL = 64 * 1024


def payload(token: bytes, size: int) -> bytes:
    seed = hashlib.sha256(token).digest()
    block = hashlib.shake_256(seed).digest(CHUNK)
    return (block * (size // CHUNK + 1))[:size]


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


class _PipeProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.eof = False
        self.readable = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.readable.set()

    def eof_received(self) -> bool:
        self.eof = True
        self.readable.set()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.readable.set()
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()


class PunchedPipe:
    """A punched UDX transport in the byte-pipe shape StreamPipe has."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self._p = _PipeProtocol()
        transport.attach(self._p)

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    async def drain(self) -> None:
        await self._p.writable.wait()

    def write_eof(self) -> None:
        self.transport.write_eof()

    async def read(self, n: int) -> bytes:
        p = self._p
        while not p.buf and not p.eof:
            p.readable.clear()
            await p.readable.wait()
        out = bytes(p.buf[:n])
        del p.buf[:n]
        return out

    async def close(self) -> None:
        self.transport.close()
        await self.transport.wait_closed()


class StreamPipe:
    """asyncio reader/writer in the byte-pipe shape PunchedPipe also has."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    def write_eof(self) -> None:
        self.writer.write_eof()

    async def read(self, n: int) -> bytes:
        return await self.reader.read(n)

    async def close(self) -> None:
        self.writer.close()


async def send_control(pipe: StreamPipe, obj: Any) -> None:
    raw = json.dumps(obj).encode()
    pipe.write(struct.pack("!I", len(raw)) + raw)
    await pipe.drain()


async def recv_control(pipe: StreamPipe, timeout: float) -> Any:
    head = await asyncio.wait_for(pipe.reader.readexactly(4), timeout)
    (n,) = struct.unpack("!I", head)
    if n > MAX_CONTROL:
        raise SwarmdError("ERR_TOO_LARGE", f"control message of {n} bytes")
    return json.loads(await asyncio.wait_for(pipe.reader.readexactly(n), timeout))


async def stream(pipe: Any, data: bytes, expect: int, timeout: float) -> tuple[bytes, float]:
    async def send() -> None:
        for i in range(0, len(data), CHUNK):
            pipe.write(data[i : i + CHUNK])
            await asyncio.wait_for(pipe.drain(), timeout)
        pipe.write_eof()

    async def recv() -> bytes:
        got = bytearray()
        while len(got) <= expect:
            chunk = await asyncio.wait_for(pipe.read(CHUNK), timeout)
            if not chunk:
                break
            got += chunk
        return bytes(got)

    t0 = time.monotonic()
    _, got = await asyncio.gather(send(), recv())
    return got, time.monotonic() - t0


def report(path: str, got: bytes, data: bytes, took: float, setup_s: float) -> int:
    ok = got == data
    say(
        event="done", path=path, ok=ok, bytes=len(got), sha256=hashlib.sha256(got).hexdigest(),
        seconds=took, setup_s=setup_s, mib_s=len(got) / took / (1 << 20) if took > 0 else 0.0,
    )
    return 0 if ok else 1


def hostport(text: str) -> tuple[str, int]:
    return parse_hostport(text, what="address")


async def run_relay(args: argparse.Namespace, *, upgrade: bool) -> int:
    host, port = hostport(args.relay)
    token = bytes.fromhex(args.token)
    t0 = time.monotonic()
    circ = await open_circuit(host, port, token, timeout=args.timeout, on_waiting=lambda: say(event="waiting"))
    setup = time.monotonic() - t0
    say(event="paired", path="relayed", connect_s=circ.connect_s, wait_s=circ.wait_s, setup_s=setup)
    relayed = StreamPipe(circ.reader, circ.writer)
    pipe: Any = relayed
    path = "relayed"
    if upgrade:
        t1 = time.monotonic()
        punched = await try_punch(relayed, args)
        if punched is not None:
            pipe, path = punched, "punched"
            setup = time.monotonic() - t1
    data = payload(token, args.bytes)
    got, took = await stream(pipe, data, args.bytes, args.timeout)
    await pipe.close()
    if pipe is not relayed:
        await relayed.close()
    return report(path, got, data, took, setup)


async def try_punch(ctl: StreamPipe, args: argparse.Namespace) -> Any:
    """A UDP punch with the relayed circuit as signalling; the punched pipe if both sides got it."""
    stun = [hostport(s) for s in args.stun.split(",") if s]
    t0 = time.monotonic()
    pipe = None
    error = ""
    if args.side == "a":
        puncher = UdpPuncher(stun, args.nat, initiator=True, peer_nat=args.peer_nat)
        await send_control(ctl, {"offer": _wire(await puncher.prepare())})
        theirs_offer = parse_offer(_unwire((await recv_control(ctl, args.timeout))["answer"]))
    else:
        theirs_offer = parse_offer(_unwire((await recv_control(ctl, args.timeout))["offer"]))
        puncher = UdpPuncher(stun, args.nat, initiator=False, punch_id=theirs_offer.punch_id, peer_nat=theirs_offer.nat)
        await send_control(ctl, {"answer": _wire(await puncher.prepare(theirs_offer))})
    try:
        pipe = PunchedPipe(await puncher.connect(theirs_offer, args.punch_timeout))
    except SwarmdError as e:
        error = e.message
    # both sides must agree before the stream moves off the relay
    await send_control(ctl, {"punched": pipe is not None})
    theirs = (await recv_control(ctl, args.timeout + args.punch_timeout))["punched"]
    say(event="punch", ok=pipe is not None and theirs, mine=pipe is not None, theirs=theirs, error=error,
        seconds=time.monotonic() - t0, **puncher.result.to_dict())
    if pipe is not None and theirs:
        return pipe
    if pipe is not None:
        await pipe.close()
    else:
        await puncher.close()
    return None


def _wire(offer: Any) -> dict[str, Any]:
    """A punch offer in JSON (the control channel's format): the id as hex."""
    return {**offer.to_wire(), "id": offer.punch_id.hex()}


def _unwire(obj: Any) -> Any:
    if isinstance(obj, dict) and isinstance(obj.get("id"), str):
        return {**obj, "id": bytes.fromhex(obj["id"])}
    return obj


async def run_listen(args: argparse.Namespace) -> int:
    done = asyncio.Event()
    result: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            token = await asyncio.wait_for(reader.readexactly(32), args.timeout)
            size = struct.unpack("!Q", await asyncio.wait_for(reader.readexactly(8), args.timeout))[0]
            data = payload(token, size)
            got, took = await stream(StreamPipe(reader, writer), data, size, args.timeout)
            writer.close()
            result.append(report("direct", got, data, took, 0.0))
        finally:
            done.set()

    server = await asyncio.start_server(handle, "0.0.0.0", args.port)
    say(event="listening", port=server.sockets[0].getsockname()[1])
    async with server:
        await asyncio.wait_for(done.wait(), args.timeout * 4)
    return result[0] if result else 1


async def run_direct(args: argparse.Namespace) -> int:
    host, port = hostport(args.connect)
    token = bytes.fromhex(args.token)
    t0 = time.monotonic()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), args.timeout)
    setup = time.monotonic() - t0
    say(event="connected", path="direct", setup_s=setup)
    writer.write(token + struct.pack("!Q", args.bytes))
    data = payload(token, args.bytes)
    got, took = await stream(StreamPipe(reader, writer), data, args.bytes, args.timeout)
    writer.close()
    return report("direct", got, data, took, setup)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["relay", "upgrade", "listen", "direct"])
    p.add_argument("--relay", metavar="HOST:PORT")
    p.add_argument("--connect", metavar="HOST:PORT")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--token", default="00" * 32, help="32-byte token, hex")
    p.add_argument("--side", choices=["a", "b"], default="a")
    p.add_argument("--stun", default="", help="our STUN servers, HOST:PORT[,HOST:PORT]")
    p.add_argument("--nat", default="cone", help="this side's NAT type, as detection would report it")
    p.add_argument("--peer-nat", default="cone", help="the other side's NAT type (side a)")
    p.add_argument("--bytes", type=int, default=1 << 20)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--punch-timeout", type=float, default=10.0)
    args = p.parse_args()
    run = {
        "relay": lambda: run_relay(args, upgrade=False),
        "upgrade": lambda: run_relay(args, upgrade=True),
        "listen": lambda: run_listen(args),
        "direct": lambda: run_direct(args),
    }[args.mode]
    try:
        return asyncio.run(run())
    except SwarmdError as e:
        say(event="error", code=e.code, message=e.message)
        return 1


if __name__ == "__main__":
    sys.exit(main())
