"""`swarmd peers`: the connections and DHT routing table of the node running
on this data dir, asked over RPC (`swarm.status`) using its status.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from swarmd.commands.reach import call_local_node

NAME = "peers"
HELP = "show the connections and DHT routing table of the running node (same --data-dir)"
FLAGS = ("data_dir", "host", "json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=float, default=5.0,
                        help="seconds to connect to the node and for its answer (default 5)")


async def running_node_status(
    data_dir: Path, host: str | None = None, timeout: float = 5.0  # noqa: ASYNC109
) -> dict[str, Any]:
    """`swarm.status` of the node whose status.json is in data_dir (at the address it bound,
    or `host` when the operator names one)."""
    return await call_local_node(data_dir, host, "swarm.status", None, timeout)


async def run(args: argparse.Namespace) -> int:
    st = await running_node_status(Path(args.settings.node.data_dir), args.host, args.timeout)
    if args.json:
        print(json.dumps(st))
        return 0
    print(f"node {st.get('public_key')}  dht {st['dht']['address']} mode={st['dht']['mode']}")
    print(f"connections ({len(st['peers'])}):")
    for p in st["peers"]:
        print(f"  {p['public_key']}  {'in ' if p['inbound'] else 'out'}  topics={len(p['topics'])}")
    print(f"routing table ({len(st['dht']['contacts'])}):")
    for nid, ip, port in st["dht"]["contacts"]:
        print(f"  {nid}  {ip}:{port}")
    return 0
