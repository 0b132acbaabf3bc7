"""`swarmd peers`: the connections and DHT routing table of the node running
on this data dir, asked over RPC (`swarm.status`) using its status.json."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from swarmd.errors import ERR_NOT_FOUND, SwarmdError

NAME = "peers"
HELP = "show the connections and DHT routing table of the running node (same --data-dir)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the raw status as JSON")
    parser.add_argument("--timeout", type=float, default=5.0)


def _rpc_port(ports: dict[str, Any]) -> int | None:
    for key in ("rpc", "port", "tcp"):
        if isinstance(ports.get(key), int):
            return ports[key]
    return None


async def running_node_status(
    data_dir: Path, host: str = "127.0.0.1", timeout: float = 5.0
) -> dict[str, Any]:  # noqa: ASYNC109
    """`swarm.status` of the node whose status.json is in data_dir."""
    from swarmd.rpc import connect

    try:
        doc = json.loads((data_dir / "status.json").read_text())
        pk = bytes.fromhex(doc["public_key"])
        port = _rpc_port(doc.get("ports", {}))
    except (OSError, ValueError, KeyError, TypeError):
        raise SwarmdError(
            ERR_NOT_FOUND, f"no running node found in {data_dir} (status.json missing or unreadable)"
        ) from None
    if port is None:
        raise SwarmdError(ERR_NOT_FOUND, f"the node in {data_dir} lists no RPC port in status.json")
    peer = await connect(
        None,
        host if host not in ("0.0.0.0", "") else "127.0.0.1",
        port,
        remote_public_key=pk,
        timeout=timeout,
    )
    try:
        return await peer.call("swarm.status", None, timeout=timeout)
    finally:
        await peer.close()


async def run(args: argparse.Namespace) -> int:
    settings = args.settings
    try:
        st = await running_node_status(Path(settings.node.data_dir), settings.node.host, args.timeout)
    except SwarmdError as e:
        print(f"swarmd peers: {e.code}: {e.message}", file=sys.stderr)
        return 1
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
