"""Does a TCP birthday punch work through the lab's routers? A measurement, not product code.

    python tests/natlab/tcpbirthday.py sym  CONE_IP CONE_PORT SOCKETS SECONDS
    python tests/natlab/tcpbirthday.py cone SYM_IP  LOCAL_PORT RATE SECONDS

The symmetric side connect()s SOCKETS sockets at the cone side's mapping (each
opens a new random port on its router; their SYNs are dropped by the cone
router, which has seen nothing from those ports). The cone side, from one port
bound with SO_REUSEADDR/SO_REUSEPORT (its cone router keeps it as the public
port), connect()s at random ports of the symmetric router's address, RATE per
second. A SYN that lands on one of the symmetric side's mappings is taken as
the reply to that socket's SYN (TCP simultaneous open, as in swarmd/net/tcppunch.py);
both kernels complete the handshake. Each side prints one JSON line: whether a
connection was established, after how long, and how many probes/sockets it took.
Driven by `python tests/natlab/tcpbirthday.py drive TRIALS` as root (builds its own lab).
"""

from __future__ import annotations

import asyncio
import json
import random
import select
import socket
import sys
import time


def _established(s: socket.socket) -> bool:
    return s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 and _connected(s)


def _connected(s: socket.socket) -> bool:
    try:
        s.getpeername()
        return True
    except OSError:
        return False


def _wait(socks: list[socket.socket], until: float) -> socket.socket | None:
    poll = select.poll()
    by_fd = {s.fileno(): s for s in socks}
    for fd in by_fd:
        poll.register(fd, select.POLLOUT)
    for fd, _ev in poll.poll(max(0, int((until - time.monotonic()) * 1000))):
        s = by_fd[fd]
        if _established(s):
            return s
    return None


def sym(cone_ip: str, cone_port: int, sockets: int, seconds: float) -> dict:
    t0 = time.monotonic()
    socks = []
    for _ in range(sockets):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect((cone_ip, cone_port))
        except BlockingIOError:
            pass
        socks.append(s)
    print(json.dumps({"event": "sym_ready", "sockets": len(socks)}), flush=True)
    deadline = t0 + seconds
    pending = list(socks)
    while time.monotonic() < deadline and pending:
        hit = _wait(pending, min(deadline, time.monotonic() + 0.05))
        if hit is not None:
            return {"side": "sym", "ok": True, "ms": round((time.monotonic() - t0) * 1000, 1),
                    "local": hit.getsockname(), "peer": hit.getpeername()}
        pending = [s for s in pending if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0]
    return {"side": "sym", "ok": False, "ms": round((time.monotonic() - t0) * 1000, 1), "alive": len(pending)}


def cone(sym_ip: str, port: int, rate: float, seconds: float) -> dict:
    t0 = time.monotonic()
    socks: list[socket.socket] = []
    probes = 0
    deadline = t0 + seconds
    tried: set[int] = set()
    while time.monotonic() < deadline:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("0.0.0.0", port))
        s.setblocking(False)
        p = random.randint(1024, 65535)
        while p in tried:
            p = random.randint(1024, 65535)
        tried.add(p)
        try:
            s.connect((sym_ip, p))
        except BlockingIOError:
            pass
        socks.append(s)
        probes += 1
        hit = _wait(socks, time.monotonic() + 1.0 / rate)
        if hit is not None:
            return {"side": "cone", "ok": True, "ms": round((time.monotonic() - t0) * 1000, 1), "probes": probes,
                    "peer": hit.getpeername()}
        if len(socks) > 4000:  # bounded: the oldest SYNs have had their chance
            for old in socks[:1000]:
                old.close()
            socks = socks[1000:]
    return {"side": "cone", "ok": False, "ms": round((time.monotonic() - t0) * 1000, 1), "probes": probes}


async def drive(trials: int, mode_a: str = "cone") -> None:
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    from tests.natlab.lab import NATA_WAN, NATB_WAN, NatLab

    lab = NatLab(prefix=f"tb{__import__('os').getpid() % 10000}-")
    results = []
    try:
        for i in range(trials):
            lab.up(mode_a, "symmetric")
            port = 20000 + i
            me = __file__
            b = await lab.spawn("lan-b", [sys.executable, me, "sym", NATA_WAN, str(port), "256", "6"])
            await b.wait_for("sym_ready", 10)
            a = await lab.spawn("lan-a", [sys.executable, me, "cone", NATB_WAN, str(port), "500", "5"])
            await a.wait(15)
            await b.wait(15)
            ra = json.loads([ln for ln in a.lines if ln.startswith('{"side"')][-1])
            rb = json.loads([ln for ln in b.lines if ln.startswith('{"side"')][-1])
            results.append({"cone": ra, "sym": rb})
            print(json.dumps(results[-1]), flush=True)
            await lab.stop_processes()
            lab.down()
    finally:
        await lab.stop_processes()
        lab.down()
    ok = [r for r in results if r["cone"]["ok"] and r["sym"]["ok"]]
    ms = sorted(r["cone"]["ms"] for r in ok)
    print(json.dumps({"trials": trials, "mode_a": mode_a, "established": len(ok),
                      "median_ms": ms[len(ms) // 2] if ms else None,
                      "probes_median": sorted(r["cone"]["probes"] for r in ok)[len(ok) // 2] if ok else None}))


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "drive":
        asyncio.run(drive(int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "cone"))
    elif role == "sym":
        print(json.dumps(sym(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))), flush=True)
    else:
        print(json.dumps(cone(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]))), flush=True)
