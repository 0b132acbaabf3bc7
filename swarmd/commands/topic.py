"""`swarmd topic join NAME` / `swarmd topic lookup NAME [--json]`.

Both go through the client library (swarmd_rpc.Client): a short-lived member of the
swarm of --bootstrap (or of the --data-dir node's DHT port) with an ephemeral key and
a client-mode DHT node, so it never enters others' routing tables. `join` prints its
own key and "joined" as soon as it is announced, then one line per connection opened
or closed, until Ctrl-C. `lookup` shows each record's last-seen age and, on the workers'
topics, which orchestrators published that worker as ejected. The network layers are imported when the command runs, so
listing commands stays cheap.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
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


def record_json(rec: PeerRecord, now: float | None = None) -> dict[str, Any]:
    """A peer record as JSON (bytes in the payload become hex), with its age when the seq tells it."""
    from swarmd.commands.call import to_json
    from swarmd.commands.status import last_seen

    return {
        "public_key": rec.public_key.hex(),
        "addresses": [f"{h}:{p}" for h, p in rec.addresses],
        "payload": to_json(rec.payload),
        "seq": rec.seq,
        "expires": rec.expiry,
        "last_seen_s": last_seen(rec.seq, time.time() if now is None else now),
    }


def is_workers_topic(name: str) -> bool:
    from swarmd.topics import WORKERS

    return name == WORKERS or name.startswith(WORKERS + "/")


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
    from swarmd.commands.status import admission_check, admission_label
    from swarmd.topics import topic_role
    from swarmd_rpc import ClientConfig

    cfg = ClientConfig(lookup_timeout=args.timeout)
    role = topic_role(args.name)
    admission = admission_check(args.settings)
    async with swarm_client(args, cfg) as client:
        if args.topic_command == "join":
            await _join(args, client)
            return 0
        ejected: dict[str, list[str]] = {}
        # every record, each marked with its admission: a rogue announcer is shown as one, not hidden
        found = client.lookup(args.name, args.timeout, admitted_only=False)
        if is_workers_topic(args.name):  # and the orchestrators' verdicts on these workers, at once
            from swarmd.commands.status import ejections

            recs, ejected = await asyncio.gather(found, ejections(client))
        else:
            recs = await found
    now = time.time()
    docs = []
    for r in recs:
        doc = record_json(r, now)
        if is_workers_topic(args.name):
            doc["ejected_by"] = ejected.get(doc["public_key"][:16], [])
        adm = admission(r, role)
        if adm is not None:
            doc["admission"] = adm
        docs.append(doc)
    if args.json:
        print(json.dumps(docs))
    else:
        for doc in docs:
            seen = doc["last_seen_s"]
            verdict = f"  EJECTED by {','.join(doc['ejected_by'])}" if doc.get("ejected_by") else ""
            adm = doc.get("admission")
            mark = f"{admission_label(adm)} ({adm['why']})  " if adm is not None else ""
            print(f"{mark}{doc['public_key']}  {' '.join(doc['addresses'])}  "
                  f"seen {'?' if seen is None else f'{seen:g}s'} ago{verdict}  {json.dumps(doc['payload'])}")
        tally = ""
        if role is not None:
            marks = [d["admission"]["admitted"] for d in docs]
            tally = (f" ({marks.count(True)} admitted as {role}, {marks.count(False)} not admitted)"
                     if None not in marks else
                     f" (not verified: this config names no [trust] operators, so any key may announce as a {role})")
        print(f"{len(recs)} peer(s) announce {args.name!r}{tally}", file=sys.stderr)
    return 0

