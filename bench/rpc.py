"""RPC benchmark: swarmd RPC (Noise + mux + msgpack over TCP) beside plain asyncio TCP.

    python bench/rpc.py [--quick] [--uvloop] [--net KEY=V ...]

The server side of each measurement runs in its own process (as a remote peer
would), the client here. Figures:

- 64-byte echo round trip, sequential: p50 / p99 in microseconds
- 64-byte echo, 64 calls in flight: requests per second
- one bulk stream over one connection: MiB/s (upload into a handler that discards)
- the echo p50 again with client and server on one event loop (no cross-process
  wake-up), for comparison with figures measured that way

The baseline is a plain asyncio TCP echo / sink with 4-byte length framing,
measured in the same run on the same machine. Last line: one JSON object.
`--uvloop` runs every event loop of the run (baseline, client and server
processes alike) on uvloop (optional: node.event_loop, swarmd/node/eventloop.py).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PAYLOAD = b"x" * 64
LOOP = "uvloop" if "--uvloop" in sys.argv else "asyncio"
NET_SETTINGS: list[str] = []  # --net KEY=V, for the RPC client and server alike (A/B a NetConfig field)


def rpc_config() -> Any:
    """RpcConfig with the --net settings applied to its NetConfig."""
    import dataclasses

    from swarmd.net.config import NetConfig
    from swarmd.rpc.config import RpcConfig

    kinds = {f.name: f.type for f in dataclasses.fields(NetConfig)}
    values: dict[str, Any] = {}
    for kv in NET_SETTINGS:
        key, _, text = kv.partition("=")
        if key not in kinds:
            sys.exit(f"--net {kv}: no NetConfig field {key!r}; known: {', '.join(kinds)}")
        values[key] = float(text) if kinds[key] in ("float", float) else int(text)
    return RpcConfig(net=NetConfig(**values))


def run(coro: Any) -> Any:
    from swarmd.node.eventloop import run as run_on

    return run_on(coro, LOOP)


# -- servers (run in a child process) ---------------------------------------


class _BaselineServer(asyncio.Protocol):
    """Length-prefixed echo; a frame starting with b"S" is a sink: count, answer at the end."""

    def connection_made(self, transport: Any) -> None:
        self.t = transport
        self.buf = bytearray()
        self.sink_left = 0

    def data_received(self, data: bytes) -> None:
        if self.sink_left:
            n = min(self.sink_left, len(data))
            self.sink_left -= n
            data = data[n:]
            if self.sink_left == 0:
                self.t.write(b"\x00\x00\x00\x02ok")
            if not data:
                return
        buf = self.buf
        buf += data
        pos = 0
        out = []
        while len(buf) - pos >= 4:
            n = int.from_bytes(buf[pos : pos + 4], "big")
            if buf[pos + 4 : pos + 5] == b"S":  # sink header: b"S" + u64 size
                size = int.from_bytes(buf[pos + 5 : pos + 13], "big")
                rest = len(buf) - (pos + 4 + n)
                self.sink_left = size - rest
                pos = len(buf)
                if self.sink_left == 0:
                    self.t.write(b"\x00\x00\x00\x02ok")
                break
            if len(buf) - pos - 4 < n:
                break
            out.append(bytes(buf[pos : pos + 4 + n]))
            pos += 4 + n
        del buf[:pos]
        if out:
            self.t.write(b"".join(out))


async def serve(kind: str) -> None:
    loop = asyncio.get_running_loop()
    if kind == "tcp":
        server = await loop.create_server(_BaselineServer, "127.0.0.1", 0)
        print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
    else:
        from loguru import logger

        logger.remove()
        from swarmd.node.identity import Identity
        from swarmd.rpc import Methods, RpcServer

        methods = Methods()

        def echo(ctx: Any, params: Any) -> Any:  # a plain function, as the anchor's (req) => req
            return params

        async def sink(ctx: Any, params: Any, stream: Any) -> int:
            n = 0
            recv = stream.recv
            while (chunk := await recv()) is not None:
                n += len(chunk)
            return n

        methods.register("echo", echo)  # answered in the read callback: no coroutine, no Task
        methods.register_stream("sink", sink, op="w")
        ident = Identity.generate()
        server = RpcServer(ident, methods, config=rpc_config())
        await server.start()
        print(json.dumps({"port": server.port, "key": ident.public_key.hex()}), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes our stdin


# -- baseline client --------------------------------------------------------


class _BaselineClient(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiters: list[asyncio.Future[bytes]] = []
        self.head = 0

    def connection_made(self, transport: Any) -> None:
        self.t = transport
        self.writable = asyncio.Event()
        self.writable.set()
        transport.set_write_buffer_limits(high=4 << 20, low=1 << 20)

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        while len(buf) - pos >= 4:
            n = int.from_bytes(buf[pos : pos + 4], "big")
            if len(buf) - pos - 4 < n:
                break
            fut = self.waiters[self.head]
            self.head += 1
            fut.set_result(bytes(buf[pos + 4 : pos + 4 + n]))
            pos += 4 + n
        del buf[:pos]
        if self.head > 4096:
            del self.waiters[: self.head]
            self.head = 0

    def request(self, payload: bytes) -> asyncio.Future[bytes]:
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        self.t.write(len(payload).to_bytes(4, "big") + payload)
        return fut


# -- measurement ------------------------------------------------------------


def start_server(kind: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--serve", kind, *(["--uvloop"] if LOOP == "uvloop" else []),
         *(f"--net={kv}" for kv in NET_SETTINGS)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    info = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
    return proc, info


def stop_server(proc: subprocess.Popen[str]) -> None:
    proc.stdin.close()  # type: ignore[union-attr]
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process used so far (Linux /proc; 0.0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(call: Any, n_seq: int, n_par: int, in_flight: int, server_pid: int) -> dict[str, float]:
    """`call()` returns the awaitable of one echo (a functools.partial: no wrapper coroutine of
    ours per call on either side, as the anchor's client awaits client.request() itself).

    Besides times, the CPU each side spent per call (client: this process; server: the
    child's /proc figures), which a loaded machine shifts less than the rates."""
    for _ in range(500):
        await call()
    lat = []
    perf = time.perf_counter
    c0, s0 = time.process_time(), proc_cpu_seconds(server_pid)
    for _ in range(n_seq):
        t0 = perf()
        await call()
        lat.append(perf() - t0)
    c1, s1 = time.process_time(), proc_cpu_seconds(server_pid)
    lat.sort()
    per_worker = n_par // in_flight

    async def worker() -> None:
        for _ in range(per_worker):
            await call()

    t0 = perf()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed = perf() - t0
    c2, s2 = time.process_time(), proc_cpu_seconds(server_pid)
    n = per_worker * in_flight
    return {
        "p50_us": statistics.median(lat) * 1e6,
        "p99_us": lat[int(len(lat) * 0.99)] * 1e6,
        "req_per_s": n / elapsed,
        "cpu_us_per_call_seq": {"client": (c1 - c0) / n_seq * 1e6, "server": (s1 - s0) / n_seq * 1e6},
        "cpu_us_per_call_64": {"client": (c2 - c1) / n * 1e6, "server": (s2 - s1) / n * 1e6},
    }


async def bench_baseline(n_seq: int, n_par: int, in_flight: int, bulk: int) -> dict[str, float]:
    proc, info = start_server("tcp")
    try:
        loop = asyncio.get_running_loop()
        transport, client = await loop.create_connection(_BaselineClient, "127.0.0.1", info["port"])
        import socket

        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        out = await measure(functools.partial(client.request, PAYLOAD), n_seq, n_par, in_flight, proc.pid)
        done = loop.create_future()
        client.waiters.append(done)
        chunk = b"b" * (1 << 20)
        t0 = time.perf_counter()
        transport.write((9).to_bytes(4, "big") + b"S" + bulk.to_bytes(8, "big"))
        sent = 0
        while sent < bulk:
            transport.write(chunk)
            sent += len(chunk)
            await client.writable.wait()
        await done
        out["bulk_mib_s"] = bulk / (1 << 20) / (time.perf_counter() - t0)
        transport.close()
        return out
    finally:
        stop_server(proc)


async def bench_rpc(n_seq: int, n_par: int, in_flight: int, bulk: int) -> dict[str, float]:
    from loguru import logger

    logger.remove()
    from swarmd.rpc import connect

    proc, info = start_server("rpc")
    try:
        peer = await connect(
            None, "127.0.0.1", info["port"], remote_public_key=bytes.fromhex(info["key"]), timeout=10,
            config=rpc_config(),
        )
        out = await measure(functools.partial(peer.call, "echo", PAYLOAD), n_seq, n_par, in_flight, proc.pid)
        chunk = b"b" * (1 << 20)
        t0 = time.perf_counter()
        s = await peer.open_stream("sink", timeout=600)
        sent = 0
        while sent < bulk:
            await s.send(chunk)
            sent += len(chunk)
        await s.close()
        assert await s.result() == bulk
        out["bulk_mib_s"] = bulk / (1 << 20) / (time.perf_counter() - t0)
        await peer.close()
        return out
    finally:
        stop_server(proc)


async def bench_same_process(n_seq: int) -> dict[str, float]:
    """p50 with client and server on one event loop: no cross-process wake-up in the figure."""
    from loguru import logger

    logger.remove()
    from swarmd.node.identity import Identity
    from swarmd.rpc import Methods, RpcServer, connect

    loop = asyncio.get_running_loop()
    tcp_server = await loop.create_server(_BaselineServer, "127.0.0.1", 0)
    transport, client = await loop.create_connection(
        _BaselineClient, "127.0.0.1", tcp_server.sockets[0].getsockname()[1]
    )
    methods = Methods()

    def echo(ctx: Any, params: Any) -> Any:  # a plain function, as the anchor's (req) => req
        return params

    methods.register("echo", echo)  # answered in the read callback: no coroutine, no Task
    ident = Identity.generate()
    server = RpcServer(ident, methods, config=rpc_config())
    await server.start()
    peer = await connect(
        None, "127.0.0.1", server.port, remote_public_key=ident.public_key, timeout=10, config=rpc_config()
    )

    out = {}
    calls = (("tcp", functools.partial(client.request, PAYLOAD)), ("rpc", functools.partial(peer.call, "echo", PAYLOAD)))
    for name, call in calls:
        for _ in range(500):
            await call()
        lat = []
        for _ in range(n_seq):
            t0 = time.perf_counter()
            await call()
            lat.append(time.perf_counter() - t0)
        out[name] = statistics.median(lat) * 1e6
    await peer.close()
    await server.stop()
    transport.close()
    tcp_server.close()
    await tcp_server.wait_closed()
    return out


def _rounded(v: Any) -> Any:
    return {k: round(x, 2) for k, x in v.items()} if isinstance(v, dict) else round(v, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", choices=["tcp", "rpc"])
    ap.add_argument("--quick", action="store_true", help="smaller loops (smoke run)")
    ap.add_argument("--profile", action="store_true", help="cProfile the client side of the RPC run")
    ap.add_argument("--uvloop", action="store_true", help="run every event loop on uvloop (both processes)")
    ap.add_argument("--net", action="append", default=[], metavar="KEY=V",
                    help="a NetConfig field for the RPC client and server, e.g. busy_poll_us=50 or flush_frames=0")
    args = ap.parse_args()
    NET_SETTINGS.extend(args.net)
    if args.uvloop:
        from swarmd.node.eventloop import uvloop_available

        if not uvloop_available():
            sys.exit("--uvloop: uvloop is not installed (pip install uvloop, or swarmd[fast])")
    if args.serve:
        run(serve(args.serve))
        return
    n_seq, n_par, bulk = (2000, 20_000, 128 << 20) if args.quick else (10_000, 128_000, 1 << 30)
    in_flight = 64
    base = run(bench_baseline(n_seq, n_par, in_flight, bulk))
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        rpc = run(bench_rpc(n_seq, n_par, in_flight, bulk))
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    else:
        rpc = run(bench_rpc(n_seq, n_par, in_flight, bulk))
    same = run(bench_same_process(n_seq))
    targets = {"p50_us": 80, "req_per_s": 55_000, "bulk_mib_s": 400}
    anchor = {"p50_us": 102, "req_per_s": 52_600, "bulk_mib_s": 54}
    print(f"event loop: {LOOP} (client, server and baseline)")
    print(f"{'figure':<28}{'swarmd rpc':>14}{'asyncio tcp':>14}{'target':>10}{'hyperswarm':>12}")
    rows = [
        ("echo 64 B p50 (us)", "p50_us"),
        ("echo 64 B p99 (us)", "p99_us"),
        (f"echo req/s ({in_flight} in flight)", "req_per_s"),
        ("bulk stream (MiB/s)", "bulk_mib_s"),
    ]
    for label, key in rows:
        t = targets.get(key, "")
        a = anchor.get(key, "")
        print(f"{label:<28}{rpc[key]:>14.1f}{base[key]:>14.1f}{t!s:>10}{a!s:>12}")
    print(f"{'echo p50, same process (us)':<28}{same['rpc']:>14.1f}{same['tcp']:>14.1f}")
    for label, key in (("CPU/call, sequential (us)", "cpu_us_per_call_seq"), ("CPU/call, 64 in flight (us)", "cpu_us_per_call_64")):
        ours, tcp = rpc[key], base[key]
        print(f"{label:<28}{ours['client']:>6.1f} + {ours['server']:<5.1f}{tcp['client']:>6.1f} + {tcp['server']:<5.1f}"
              "  (client + server)")
    print(
        json.dumps(
            {
                "bench": "rpc",
                "event_loop": LOOP,
                "rpc": {k: _rounded(v) for k, v in rpc.items()},
                "baseline_asyncio_tcp": {k: _rounded(v) for k, v in base.items()},
                "same_process_p50_us": {
                    "rpc": round(same["rpc"], 1),
                    "baseline_asyncio_tcp": round(same["tcp"], 1),
                },
                "targets": targets,
                "anchor_hyperswarm_rpc": anchor,
                "params": {
                    "net": NET_SETTINGS,
                    "seq_calls": n_seq,
                    "parallel_calls": n_par,
                    "in_flight": in_flight,
                    "bulk_bytes": bulk,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
