"""`swarmd status`: what the running node (same --data-dir) is: key, DHT, NAT, connections.

Asks the node over RPC (`swarm.status`, which carries the NAT report and each
connection's path); `--json` prints it whole.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from swarmd.errors import SwarmdError

NAME = "status"
HELP = "show the running node's key, DHT mode, NAT type and connections with their paths"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the raw status as JSON")
    parser.add_argument("--timeout", type=float, default=5.0)


async def run(args: argparse.Namespace) -> int:
    from swarmd.commands.peers import running_node_status

    settings = args.settings
    try:
        st = await running_node_status(Path(settings.node.data_dir), settings.node.host, args.timeout)
    except SwarmdError as e:
        print(f"swarmd status: {e.code}: {e.message}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(st))
        return 0
    nat = st.get("nat", {}).get("nat", {})
    print(f"node     {st.get('public_key')}")
    print(f"dht      {st['dht']['address']} mode={st['dht']['mode']} contacts={len(st['dht']['contacts'])}")
    print(
        f"nat      {nat.get('type', 'n/a')}  public {nat.get('public_address')}  "
        f"(STUN answers {nat.get('answers')}/{nat.get('asked')})"
    )
    signal = st.get("nat", {}).get("signal_peers", [])
    print(f"signal   {', '.join(k[:16] for k in signal) or '-'}")
    print(f"peers    {len(st['peers'])}")
    for p in st["peers"]:
        print(f"  {p['public_key'][:16]}  {'in ' if p['inbound'] else 'out'}  {p.get('path', 'direct')}")
    return 0
