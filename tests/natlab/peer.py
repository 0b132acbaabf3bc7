"""A lab peer: opens a circuit through a relay and streams a payload both ways.

Run inside a lab namespace by the natlab tests and bench/nat.py:

    python tests/natlab/peer.py --relay 198.18.0.1:PORT --token HEX --bytes 10485760

Prints one JSON line per step ("paired", then "done" with the digest of what
arrived and the throughput), and exits non-zero with a JSON "error" line on failure.
The payload is derived from the token, so both ends know what to expect.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time

from swarmd.errors import SwarmdError
from swarmd.net.relayio import open_circuit

CHUNK = 256 * 1024


def payload(token: bytes, size: int) -> bytes:
    seed = hashlib.sha256(token).digest()
    block = hashlib.shake_256(seed).digest(CHUNK)
    return (block * (size // CHUNK + 1))[:size]


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def run(args: argparse.Namespace) -> int:
    host, _, port = args.relay.rpartition(":")
    token = bytes.fromhex(args.token)
    t0 = time.monotonic()
    circ = await open_circuit(
        host, int(port), token, timeout=args.timeout, on_waiting=lambda: say(event="waiting")
    )
    say(event="paired", path="relayed", connect_s=circ.connect_s, wait_s=circ.wait_s, setup_s=time.monotonic() - t0)
    data = payload(token, args.bytes)

    async def send() -> None:
        for i in range(0, len(data), CHUNK):
            circ.writer.write(data[i : i + CHUNK])
            await asyncio.wait_for(circ.writer.drain(), args.timeout)
        circ.writer.write_eof()

    async def recv() -> bytes:
        got = bytearray()
        while len(got) <= args.bytes:
            chunk = await asyncio.wait_for(circ.reader.read(CHUNK), args.timeout)
            if not chunk:
                break
            got += chunk
        return bytes(got)

    t1 = time.monotonic()
    _, got = await asyncio.gather(send(), recv())
    took = time.monotonic() - t1
    circ.writer.close()
    ok = got == data
    say(
        event="done",
        ok=ok,
        bytes=len(got),
        sha256=hashlib.sha256(got).hexdigest(),
        seconds=took,
        mib_s=len(got) / took / (1 << 20) if took > 0 else 0.0,
    )
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--relay", required=True, metavar="HOST:PORT")
    p.add_argument("--token", required=True, help="32-byte circuit token, hex")
    p.add_argument("--bytes", type=int, default=1 << 20)
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args()
    try:
        return asyncio.run(run(args))
    except SwarmdError as e:
        say(event="error", code=e.code, message=e.message)
        return 1


if __name__ == "__main__":
    sys.exit(main())
