"""`swarmd topic join NAME` / `swarmd topic lookup NAME [--json]`.

Both go through the client library (swarmd_rpc.Client): a short-lived member of the
swarm of --bootstrap (or of the --data-dir node's DHT port) with an ephemeral key and
a client-mode DHT node, so it never enters others' routing tables. `join` prints its
own key and "joined" as soon as it is announced, then one line per connection opened
or closed, until Ctrl-C. The network layers are imported when the command runs, so
listing commands stays cheap.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from typing import TYPE_CHECKING, Any

from swarmd.commands.reach import swarm_client

if TYPE_CHECKING:
    from swarmd.dht.records import PeerRecord

NAME = "topic"
HELP = "join a topic (stay joined, print connections) or look up the peers announcing it"
FLAGS = ("bootstrap", "data_dir", "host", "json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("topic_command", choices=["join", "lookup"], metavar="join|lookup")
    parser.add_argument("name", help="topic name")
    parser.add_argument("--timeout", type=float, default=5.0, help="lookup: seconds to search (default 5)")
    parser.add_argument("--no-announce", action="store_true", help="join: only look up and connect")


def record_json(rec: PeerRecord) -> dict[str, Any]:
    """A peer record as JSON (bytes in the payload become hex)."""
    from swarmd.commands.call import to_json

    return {
        "public_key": rec.public_key.hex(),
        "addresses": [f"{h}:{p}" for h, p in rec.addresses],
        "payload": to_json(rec.payload),
        "seq": rec.seq,
        "expires": rec.expiry,
    }


def _emit(args: argparse.Namespace, doc: dict[str, Any], text: str) -> None:
    print(json.dumps(doc) if args.json else text, flush=True)


async def _join(args: argparse.Namespace, client: Any) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        events = client.connections()  # subscribed before joining: no event is lost
        topic = await client.join(args.name, announce=not args.no_announce, lookup=True)
        me = client.identity.public_hex
        _emit(args, {"event": "joined", "topic": args.name, "public_key": me, "announce": not args.no_announce},
              f"joined {args.name!r} as {me}{'' if not args.no_announce else ' (not announcing)'}")

        def names(topics: frozenset[bytes]) -> list[str]:
            return sorted(args.name if t == topic else t.hex() for t in topics)

        async def report() -> None:
            async for ev in events:
                _emit(args, {"event": ev.kind, "public_key": ev.public_key.hex(), "inbound": ev.inbound,
                             "topics": names(ev.topics)},
                      f"{ev.kind:5} {ev.public_key.hex()} {'in ' if ev.inbound else 'out'} "
                      f"{','.join(names(ev.topics)) or '-'}")

        task = asyncio.ensure_future(report())
        try:
            await stop.wait()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)


async def run(args: argparse.Namespace) -> int:
    from swarmd_rpc import ClientConfig

    cfg = ClientConfig(lookup_timeout=args.timeout)
    async with swarm_client(args, cfg) as client:
        if args.topic_command == "join":
            await _join(args, client)
            return 0
        recs = await client.lookup(args.name, args.timeout)
    if args.json:
        print(json.dumps([record_json(r) for r in recs]))
    else:
        for r in recs:
            print(f"{r.public_key.hex()}  {' '.join(f'{h}:{p}' for h, p in r.addresses)}  "
                  f"{json.dumps(record_json(r)['payload'])}")
        print(f"{len(recs)} peer(s) announce {args.name!r}", file=sys.stderr)
    return 0
