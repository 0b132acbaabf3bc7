"""`swarmd call PUBKEY METHOD [--data JSON] [--timeout S]`: the operator's tool.

    swarmd call PUBKEY --list           the peer's methods, each with its op (r: reads, w: writes)

Goes through the client library (swarmd_rpc.Client): the node of --data-dir is
dialled at the address in its status.json; any other peer is found by its key
on the DHT (every node announces on peer_topic(its key)) and reached the way
the swarm reaches peers (direct, hole-punched or relayed). The Noise channel
checks the key. Prints the result as JSON; errors print their code and message
and exit 1.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from swarmd.commands.reach import local_node, operator_identity, swarm_client
from swarmd.errors import ERR_BAD_REQUEST, SwarmdError

NAME = "call"
HELP = "call one RPC method on the peer with this public key and print the result as JSON (--list: its methods)"
FLAGS = ("data_dir", "bootstrap", "host", "json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("public_key", metavar="PUBKEY", help="the peer's Ed25519 public key (64 hex digits)")
    parser.add_argument("method", metavar="METHOD", nargs="?", help="the method (see --list)")
    parser.add_argument("--data", "-d", default=None, metavar="JSON", help="params as JSON (default: none)")
    parser.add_argument("--list", action="store_true", help="list the peer's methods and their r/w op")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds for lookup and call (default 10)")


def to_json(value: Any) -> Any:
    """Make an RPC result printable: bytes as hex, arrays as nested lists."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if hasattr(value, "tolist") and hasattr(value, "dtype"):
        return value.tolist()
    return value


async def call(args: argparse.Namespace) -> Any:
    from swarmd.node.identity import parse_public_key
    from swarmd_rpc import Client, ClientConfig

    public_key = parse_public_key(args.public_key, "PUBKEY")
    if args.list == (args.method is not None):
        raise SwarmdError(ERR_BAD_REQUEST, "give either METHOD or --list")
    try:
        params = json.loads(args.data) if args.data is not None else None
    except ValueError as e:
        raise SwarmdError(ERR_BAD_REQUEST, f"--data is not valid JSON: {e}") from None
    method = "listMethods" if args.list else args.method
    cfg = ClientConfig(timeout=args.timeout, lookup_timeout=min(args.timeout, 5.0))
    identity = operator_identity(args)
    local = local_node(args)
    if local is not None and local.public_key == public_key:
        client = Client.for_peer(public_key, local.host, local.rpc_port, identity=identity, config=cfg)
    else:
        client = swarm_client(args, cfg, identity=identity)
    async with client:
        return await client.call(public_key, method, params, timeout=args.timeout)


async def run(args: argparse.Namespace) -> int:
    result = await call(args)
    if args.list and not args.json:
        for m in result:
            print(f"{m['op']}  {m['name']}{'  (stream)' if m.get('stream') else ''}")
        return 0
    print(json.dumps(to_json(result), indent=2))
    return 0
