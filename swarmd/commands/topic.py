"""`swarmd topic join NAME` / `swarmd topic lookup NAME [--json]`.

Both run a short-lived DHT node of their own (an ephemeral key, client mode
unless publicly reachable) bootstrapped from --bootstrap. The network layers
are imported when the command runs, so listing commands stays cheap.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from swarmd.errors import ConfigError

if TYPE_CHECKING:
    from swarmd.dht.node import DhtNode
    from swarmd.dht.records import PeerRecord
    from swarmd.settings import Settings
    from swarmd.swarm import ConnectionEvent, Swarm

NAME = "topic"
HELP = "join a topic (stay joined, print connections) or look up the peers announcing it"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # one flat parser (not nested subparsers) so common flags such as --bootstrap
    # may follow NAME: `swarmd topic lookup NAME --json --bootstrap HOST:PORT`
    parser.add_argument("topic_command", choices=["join", "lookup"], metavar="join|lookup")
    parser.add_argument("name", help="topic name")
    parser.add_argument(
        "--json", action="store_true", help="JSON output (lookup: an array; join: one object per event)"
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="lookup: seconds to search (default 5)")
    parser.add_argument("--no-announce", action="store_true", help="join: only look up and connect")


def _secret(settings: Settings) -> bytes | None:
    return bytes.fromhex(settings.node.swarm_secret) if settings.node.swarm_secret else None


async def open_dht(settings: Settings) -> DhtNode:
    """A started client-mode DHT node with an ephemeral identity, bootstrapped from settings."""
    from swarmd.dht import DhtConfig, DhtNode
    from swarmd.node.identity import Identity
    from swarmd.settings import parse_hostport

    boot = [parse_hostport(b, what="bootstrap entry") for b in settings.node.bootstrap]
    if not boot:
        raise ConfigError("topic commands need --bootstrap HOST:PORT (or SWARMD_BOOTSTRAP)")
    # client mode: a short-lived command must not enter others' routing tables,
    # where it would be a dead contact costing them a timeout after it exits
    dht = DhtNode(Identity.generate(), DhtConfig(host="0.0.0.0", port=0, bootstrap=boot, mode="client"))
    await dht.start()
    return dht


def record_json(rec: PeerRecord) -> dict[str, Any]:
    """A peer record as JSON (bytes in the payload become hex)."""

    def clean(v: Any) -> Any:
        if isinstance(v, bytes):
            return v.hex()
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return {
        "public_key": rec.public_key.hex(),
        "addresses": [f"{h}:{p}" for h, p in rec.addresses],
        "payload": clean(rec.payload),
        "seq": rec.seq,
        "expires": rec.expiry,
    }


async def lookup_topic(settings: Settings, name: str, timeout: float = 5.0) -> list[PeerRecord]:  # noqa: ASYNC109
    """Records of every peer announcing NAME (what `swarmd topic lookup` prints)."""
    from swarmd.dht.records import topic_from_name

    dht = await open_dht(settings)
    try:
        return await dht.lookup_all(topic_from_name(name, _secret(settings)), timeout)
    finally:
        await dht.stop()


async def join_topic(
    settings: Settings,
    name: str,
    on_event: Callable[[ConnectionEvent], None],
    stop: asyncio.Event,
    announce: bool = True,
) -> None:
    """Join NAME with a swarm of our own and report connection events until stop is set."""
    from swarmd.node.identity import Identity
    from swarmd.rpc import Methods, RpcServer
    from swarmd.swarm import Swarm, SwarmConfig

    dht = await open_dht(settings)
    ident = Identity.generate()
    server = RpcServer(ident, Methods(), settings.node.host, 0)
    swarm: Swarm | None = None
    try:
        await server.start()
        swarm = Swarm(ident, dht, server, SwarmConfig(secret=_secret(settings)), on_connection=on_event)
        swarm.register_methods()
        await swarm.join(name, announce=announce, lookup=True)
        await stop.wait()
    finally:
        if swarm is not None:
            await swarm.stop()
        await server.stop()
        await dht.stop()


async def run(args: argparse.Namespace) -> int:
    from swarmd.errors import SwarmdError

    settings = args.settings
    try:
        if args.topic_command == "lookup":
            recs = await lookup_topic(settings, args.name, args.timeout)
            if args.json:
                print(json.dumps([record_json(r) for r in recs]))
            else:
                for r in recs:
                    print(
                        f"{r.public_key.hex()}  {' '.join(f'{h}:{p}' for h, p in r.addresses)}  {json.dumps(record_json(r)['payload'])}"
                    )
                print(f"{len(recs)} peer(s) announce {args.name!r}", file=sys.stderr)
            return 0
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        def on_event(ev: ConnectionEvent) -> None:
            doc = {
                "event": ev.kind,
                "public_key": ev.public_key.hex(),
                "inbound": ev.inbound,
                "topics": sorted(t.hex() for t in ev.topics),
            }
            print(
                json.dumps(doc)
                if args.json
                else f"{ev.kind:5} {ev.public_key.hex()} {'in' if ev.inbound else 'out'}",
                flush=True,
            )

        try:
            await join_topic(settings, args.name, on_event, stop, announce=not args.no_announce)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)
        return 0
    except SwarmdError as e:
        print(f"swarmd topic: {e.code}: {e.message}", file=sys.stderr)
        return 1
