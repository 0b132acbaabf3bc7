"""DHT benchmark: time to first peer of a topic lookup at 100 and 500 nodes,
announce time, and join -> connection through the swarm, each beside a raw
UDP request/response round trip measured on the same loop in the same run.

    python bench/dht.py [--loop asyncio|uvloop]   # prints a table, then one JSON line

Every loop of the run (this process and the two-process figure's child) is the
one a node runs by default (node.event_loop, swarmd/node/eventloop.py) unless
--loop names one; the JSON says which.

Two lookup figures per size: from a node of the testnet (its table warm), and
from a fresh client-mode node that bootstrapped just before each lookup, for a
topic announced just before: what hyperdht's bench-lookup.js measures (a fresh
ephemeral node per trial, new topic per trial, all nodes in one process), so
the anchor ratio uses that one.

Two join -> connection figures: everything on one loop (the testnet, the
announcing swarm and the joining swarms), and the layout of hyperswarm's
bench-connect.js: the testnet and the announcing swarm in a child process, a
fresh DHT node and swarm per trial in this one (bootstrapped before the clock
starts). The anchor ratio uses the second.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from contextlib import aclosing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loguru import logger  # noqa: E402

from swarmd.dht.config import DhtConfig  # noqa: E402
from swarmd.dht.node import DhtNode  # noqa: E402
from swarmd.dht.records import make_record, topic_from_name  # noqa: E402
from swarmd.node.eventloop import loop_factory, run  # noqa: E402
from swarmd.node.identity import Identity  # noqa: E402
from swarmd.settings import NodeConfig  # noqa: E402

LOOP = sys.argv[sys.argv.index("--loop") + 1] if "--loop" in sys.argv else NodeConfig().event_loop
LOOP = "asyncio" if loop_factory(LOOP) is None else "uvloop"  # what it resolves to here

SELF = os.path.abspath(__file__)
LOOKUPS = 200
FRESH_LOOKUPS = 40
ANNOUNCES = 50
RAW_RTTS = 2000
JOINS = 40


def cfg(**kw: object) -> DhtConfig:
    c = DhtConfig(host="127.0.0.1", port=0, request_timeout=1.0, per_source_rate=1e6, per_source_burst=1e6)
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


async def raw_udp_rtt(n: int) -> list[float]:
    """Baseline: a bare asyncio UDP echo round trip on loopback, same loop."""
    loop = asyncio.get_running_loop()

    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, t: asyncio.BaseTransport) -> None:
            self.t = t

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            self.t.sendto(data, addr)

    class Client(asyncio.DatagramProtocol):
        fut: asyncio.Future[bytes] | None = None

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            if self.fut is not None and not self.fut.done():
                self.fut.set_result(data)

    st, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    ct, cp = await loop.create_datagram_endpoint(Client, remote_addr=st.get_extra_info("sockname")[:2])
    out = []
    for _ in range(n):
        cp.fut = loop.create_future()
        t0 = time.perf_counter()
        ct.sendto(b"x" * 64)
        await cp.fut
        out.append(time.perf_counter() - t0)
    ct.close()
    st.close()
    return out


async def build(n: int) -> list[DhtNode]:
    first = DhtNode(Identity.generate(), cfg())
    await first.start()
    nodes = [first]
    rest = [DhtNode(Identity.generate(), cfg(bootstrap=[first.address])) for _ in range(n - 1)]
    for i in range(0, len(rest), 25):
        batch = rest[i : i + 25]
        await asyncio.gather(*(x.start() for x in batch))
        nodes.extend(batch)
    return nodes


async def dht_figures(n: int) -> dict[str, float]:
    nodes = await build(n)
    rng = random.Random(n)
    try:
        announce_times = []
        topic = topic_from_name(f"bench-{n}")
        for i in range(ANNOUNCES):
            ident = Identity.generate()
            rec = make_record(
                ident, topic_from_name(f"bench-{n}-{i}"), [("127.0.0.1", 4000)], None, 1, 600, time.time()
            )
            node = rng.choice(nodes)
            t0 = time.perf_counter()
            res = await node.announce(rec)
            announce_times.append(time.perf_counter() - t0)
            assert res.ok
        announcer = Identity.generate()
        await nodes[0].announce(
            make_record(announcer, topic, [("127.0.0.1", 4000)], None, 1, 600, time.time())
        )
        askers = [x for x in nodes if not x.protocol.records.get(topic, time.time())]
        first_times = []
        for _ in range(LOOKUPS):
            node = rng.choice(askers)
            t0 = time.perf_counter()
            async with aclosing(node.lookup(topic)) as it:
                async for rec in it:
                    assert rec.public_key == announcer.public_key
                    first_times.append(time.perf_counter() - t0)
                    break
        fresh_first = []
        for i in range(FRESH_LOOKUPS):
            # hyperdht's bench-lookup.js: new topic, announced, then a fresh ephemeral node asks
            fresh_topic = topic_from_name(f"bench-{n}-fresh-{i}")
            ident = Identity.generate()
            await nodes[0].announce(make_record(ident, fresh_topic, [("127.0.0.1", 4000)], None, 1, 600, time.time()))
            client = DhtNode(Identity.generate(), cfg(bootstrap=[nodes[0].address], mode="client"))
            await client.start()
            try:
                t0 = time.perf_counter()
                async with aclosing(client.lookup(fresh_topic)) as it:
                    async for rec in it:
                        assert rec.public_key == ident.public_key
                        fresh_first.append(time.perf_counter() - t0)
                        break
            finally:
                await client.stop()
        ping_times = []
        for _ in range(200):
            a, b = rng.sample(nodes, 2)
            t0 = time.perf_counter()
            await a.ping(b.address)
            ping_times.append(time.perf_counter() - t0)
        return {
            "lookup_first_p50_ms": statistics.median(first_times) * 1e3,
            "lookup_first_p90_ms": pct(first_times, 90) * 1e3,
            "lookup_found": len(first_times) / LOOKUPS,
            "lookup_fresh_first_p50_ms": statistics.median(fresh_first) * 1e3,
            "lookup_fresh_first_p90_ms": pct(fresh_first, 90) * 1e3,
            "lookup_fresh_found": len(fresh_first) / FRESH_LOOKUPS,
            "announce_p50_ms": statistics.median(announce_times) * 1e3,
            "dht_ping_p50_ms": statistics.median(ping_times) * 1e3,
        }
    finally:
        await asyncio.gather(*(x.stop() for x in nodes))


async def swarm_figures(n_nodes: int = 30, joins: int = 40) -> dict[str, float] | None:
    """join(topic) -> first connection event, with B already announcing."""
    try:
        from swarmd.rpc import CallContext, Methods
        from swarmd.rpc.client import connect
        from swarmd.swarm import ConnectionEvent, Swarm, SwarmConfig
    except ImportError:
        return None

    async def echo(ctx: CallContext, params: object) -> object:
        return params

    methods = Methods()
    methods.register("echo", echo)
    nodes = await build(n_nodes)
    swarms: list[Swarm] = []

    async def make_swarm() -> Swarm:
        ident = Identity.generate()
        dht = DhtNode(ident, cfg(bootstrap=[nodes[0].address]))
        await dht.start()
        nodes.append(dht)
        sw = Swarm(ident, dht, methods, SwarmConfig(announce_self=False))
        await sw.start()
        swarms.append(sw)
        return sw

    try:
        server = await make_swarm()
        clients = [await make_swarm() for _ in range(joins)]
        times = []
        first_call = []
        for i, client in enumerate(clients):
            topic = f"bench-join-{i}"
            await server.join(topic, announce=True, lookup=False)
            await server.flush(10)
            got: asyncio.Future[float] = asyncio.get_running_loop().create_future()

            def on_conn(ev: ConnectionEvent, got: asyncio.Future[float] = got) -> None:
                if ev.kind == "open" and not got.done():
                    got.set_result(time.perf_counter())

            client.on_connection = on_conn
            t0 = time.perf_counter()
            await client.join(topic, announce=False, lookup=True)
            t1 = await asyncio.wait_for(got, 10)
            times.append(t1 - t0)
            t2 = time.perf_counter()
            await client.request(server.public_key, "echo", b"x", timeout=5)
            first_call.append(time.perf_counter() - t2)
            # stop this client's re-lookups so the next join is measured on a quiet loop
            await client.leave(topic)
            await server.leave(topic)
        # baseline: a bare rpc connect (TCP + Noise IK) to a known address and key
        raw = []
        for _ in range(joins):
            t0 = time.perf_counter()
            peer = await connect(
                Identity.generate(), "127.0.0.1", server.server.port, remote_public_key=server.public_key
            )
            raw.append(time.perf_counter() - t0)
            await peer.close()
        return {
            "rpc_connect_baseline_p50_ms": statistics.median(raw) * 1e3,
            "join_to_connection_p50_ms": statistics.median(times) * 1e3,
            "join_to_connection_p90_ms": pct(times, 90) * 1e3,
            "first_request_after_connect_p50_ms": statistics.median(first_call) * 1e3,
        }
    finally:
        for sw in swarms:
            await sw.stop()
        await asyncio.gather(*(x.stop() for x in nodes))


async def serve_swarm() -> None:
    """The child of the two-process join figure (hyperswarm's server.js, mode swarm): a
    10-node testnet and a swarm announcing one topic; prints one JSON line, then serves
    until a line (or EOF) on stdin."""
    from swarmd.rpc import Methods
    from swarmd.swarm import Swarm, SwarmConfig

    nodes = await build(10)
    ident = Identity.generate()
    dht = DhtNode(ident, cfg(bootstrap=[nodes[0].address]))
    await dht.start()
    sw = Swarm(ident, dht, Methods(), SwarmConfig(announce_self=False))
    topic = "bench-join-two-process"
    try:
        await sw.start()
        await sw.join(topic, announce=True, lookup=False)
        await sw.flush(10)
        print(json.dumps({"bootstrap": list(nodes[0].address), "topic": topic}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    finally:
        await sw.stop()
        await asyncio.gather(dht.stop(), *(x.stop() for x in nodes))


async def swarm_two_process(joins: int = JOINS) -> dict[str, float]:
    """join(topic) -> first connection as hyperswarm's bench-connect.js times it: the
    announcing swarm and the testnet in a child process, a fresh DHT node and swarm per
    trial here, bootstrapped before the clock starts."""
    from swarmd.rpc import Methods
    from swarmd.swarm import ConnectionEvent, Swarm, SwarmConfig

    proc = await asyncio.create_subprocess_exec(
        sys.executable, SELF, "--serve-swarm", "--loop", LOOP,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        info = json.loads(await asyncio.wait_for(proc.stdout.readline(), 120))
        boot = (info["bootstrap"][0], info["bootstrap"][1])
        times, totals = [], []
        for _ in range(joins):
            ident = Identity.generate()
            tc = time.perf_counter()
            # client mode, like the anchor's fresh hyperdht node (ephemeral: in no one's table)
            dht = DhtNode(ident, cfg(bootstrap=[boot], mode="client"))
            await dht.start()
            sw = Swarm(ident, dht, Methods(), SwarmConfig(announce_self=False))
            try:
                await sw.start()
                got: asyncio.Future[float] = asyncio.get_running_loop().create_future()

                def on_conn(ev: ConnectionEvent, got: asyncio.Future[float] = got) -> None:
                    if ev.kind == "open" and not got.done():
                        got.set_result(time.perf_counter())

                sw.on_connection = on_conn
                t0 = time.perf_counter()
                await sw.join(info["topic"], announce=False, lookup=True)
                t1 = await asyncio.wait_for(got, 10)
                times.append(t1 - t0)
                totals.append(t1 - tc)
            finally:
                await sw.stop()
                await dht.stop()
        return {
            "join_to_connection_p50_ms": statistics.median(times) * 1e3,
            "join_to_connection_p90_ms": pct(times, 90) * 1e3,
            "new_client_to_connection_p50_ms": statistics.median(totals) * 1e3,
        }
    finally:
        if proc.returncode is None:
            proc.stdin.write(b"exit\n")
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def records_memory(n: int = 10_000) -> float:
    """MB of Python heap a RecordStore uses for n small worker records."""
    import tracemalloc

    from swarmd.dht.records import RecordStore, decode_record

    now = time.time()
    idents = [Identity.generate() for _ in range(100)]
    wires = [
        make_record(
            idents[i % 100], topic_from_name(f"t{i // 50}"), [("10.0.0.1", 4000 + i % 1000)],
            {"state": "ONLINE", "load": 0.5, "models": ["mnist"]}, i, 600, now,
        ).to_wire()
        for i in range(n)
    ]  # fmt: skip
    tracemalloc.start()
    store = RecordStore(max_per_source=n, max_total=n)
    for i, w in enumerate(wires):
        store.put(decode_record(w, now), f"10.0.{i % 200}.1", now)
    used = tracemalloc.get_traced_memory()[0] / 1e6
    tracemalloc.stop()
    return used


async def main() -> None:
    logger.remove()
    logger.add(sys.stderr, level="ERROR")
    logger.enable("swarmd")
    raw = await raw_udp_rtt(RAW_RTTS)
    base = {"raw_udp_rtt_p50_ms": statistics.median(raw) * 1e3, "raw_udp_rtt_p90_ms": pct(raw, 90) * 1e3}
    figures: dict[str, object] = {}
    for n in (100, 500):
        figures[f"n{n}"] = await dht_figures(n)
    figures["records_10k_mb"] = records_memory()
    sw = await swarm_figures()
    if sw:
        figures["swarm"] = sw
        figures["swarm_two_process"] = await swarm_two_process()
    print(f"{'figure':<34}{'value':>12}")
    print(f"{'raw UDP RTT p50 (baseline)':<34}{base['raw_udp_rtt_p50_ms']:>10.3f}ms")
    for n in (100, 500):
        f = figures[f"n{n}"]
        assert isinstance(f, dict)
        print(f"{f'[{n} nodes] lookup first peer p50':<34}{f['lookup_first_p50_ms']:>10.3f}ms")
        print(f"{f'[{n} nodes] lookup first peer p90':<34}{f['lookup_first_p90_ms']:>10.3f}ms")
        print(f"{f'[{n} nodes] announce p50':<34}{f['announce_p50_ms']:>10.3f}ms")
        print(f"{f'[{n} nodes] dht ping p50':<34}{f['dht_ping_p50_ms']:>10.3f}ms")
        print(f"{f'[{n} nodes] lookups that found':<34}{f['lookup_found'] * 100:>11.1f}%")
        print(f"{f'[{n}] fresh node: first peer p50':<34}{f['lookup_fresh_first_p50_ms']:>10.3f}ms")
        print(f"{f'[{n}] fresh node: first peer p90':<34}{f['lookup_fresh_first_p90_ms']:>10.3f}ms")
    print(f"{'10k topic records held (target <= 20)':<34}{figures['records_10k_mb']:>10.1f}MB")
    if sw:
        for k, v in sw.items():
            print(f"{k:<34}{v:>10.3f}ms")
        two = figures["swarm_two_process"]
        assert isinstance(two, dict)
        for k, v in two.items():
            print(f"{'[2 processes] ' + k:<34}{v:>10.3f}ms")
    print(
        "targets (bench/anchors.py, same run): fresh-node lookup p50 <= 1.0x hyperdht at 100 and 500 nodes,"
        " two-process join -> connection p50 <= 1.0x hyperswarm"
    )
    print(f"event loop: {LOOP}")
    print(json.dumps({"figures": figures, "baseline": base, "event_loop": LOOP}))


if __name__ == "__main__":
    if "--serve-swarm" in sys.argv:
        logger.remove()
        run(serve_swarm(), LOOP)
    else:
        run(main(), LOOP)
