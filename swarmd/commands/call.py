"""`swarmd call PUBKEY METHOD [--data JSON] [--timeout S]`: the operator's tool.

Finds the peer by its public key on the DHT (every node announces on
peer_topic(its key)), or through the local node's status.json when PUBKEY is
that node, opens a Noise channel that checks the key, calls one method and
prints the result as JSON. Errors print their code and message and exit 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from swarmd.errors import ERR_BAD_REQUEST, ERR_NOT_FOUND, SwarmdError

NAME = "call"
HELP = "call one RPC method on the peer with this public key and print the result as JSON"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("public_key", metavar="PUBKEY", help="the peer's Ed25519 public key (64 hex digits)")
    parser.add_argument("method", metavar="METHOD")
    parser.add_argument("--data", "-d", default=None, metavar="JSON", help="params as JSON (default: none)")
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


def local_identity(data_dir: Path) -> Any:
    """The data dir's key when there is one, so the firewall sees the operator's node."""
    from swarmd.node.identity import Identity

    path = data_dir / "identity.key"
    return Identity.load(path) if path.exists() else None


def local_node_address(data_dir: Path, public_key: bytes) -> tuple[str, int] | None:
    try:
        doc = json.loads((data_dir / "status.json").read_text())
        if bytes.fromhex(doc["public_key"]) == public_key:
            return "127.0.0.1", int(doc["ports"]["rpc"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


async def find_addresses(args: argparse.Namespace, public_key: bytes) -> list[tuple[str, int]]:
    settings = args.settings
    local = local_node_address(settings.node.data_dir, public_key)
    if local is not None:
        return [local]
    if not settings.node.bootstrap:
        raise SwarmdError(
            ERR_NOT_FOUND,
            "peer is not the node in --data-dir; give --bootstrap HOST:PORT to find it on the DHT",
        )
    from swarmd.commands.topic import lookup_topic
    from swarmd.topics import peer_topic

    records = await lookup_topic(settings, peer_topic(public_key.hex()), timeout=min(args.timeout, 5.0))
    addrs = [tuple(a) for r in records if r.public_key == public_key for a in r.addresses]
    if not addrs:
        raise SwarmdError(ERR_NOT_FOUND, f"no peer with key {public_key.hex()[:16]}… announces itself on the DHT")
    return addrs  # type: ignore[return-value]


async def call(args: argparse.Namespace) -> Any:
    from swarmd.rpc import connect

    try:
        public_key = bytes.fromhex(args.public_key)
    except ValueError:
        public_key = b""
    if len(public_key) != 32:
        raise SwarmdError(ERR_BAD_REQUEST, "PUBKEY must be 64 hex digits (a 32-byte Ed25519 public key)")
    try:
        params = json.loads(args.data) if args.data is not None else None
    except ValueError as e:
        raise SwarmdError(ERR_BAD_REQUEST, f"--data is not valid JSON: {e}") from None
    identity = local_identity(args.settings.node.data_dir)
    last: SwarmdError | None = None
    for host, port in await find_addresses(args, public_key):
        try:
            peer = await connect(identity, host, port, remote_public_key=public_key, timeout=args.timeout)
        except SwarmdError as e:
            last = e
            continue
        try:
            return await peer.call(args.method, params, timeout=args.timeout)
        finally:
            await peer.close()
    assert last is not None
    raise last


async def run(args: argparse.Namespace) -> int:
    try:
        result = await call(args)
    except SwarmdError as e:
        print(f"{e.code}: {e.message}", file=sys.stderr)
        return 1
    print(json.dumps(to_json(result), indent=2))
    return 0
