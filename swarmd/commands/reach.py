"""How commands reach the swarm: one swarmd_rpc.Client, configured from the common flags.

Not a command (no NAME): the helpers every command that talks to a node shares, so they
find peers, stores and the local node the same way the client library does.

- the local node (the daemon of --data-dir): from its status.json, at the address it bound;
- the swarm: --bootstrap (or SWARMD_BOOTSTRAP), else the local node's own DHT port;
- the operator's key: the data dir's identity.key when it has one (peers' firewalls and
  stores' uploader records see the operator's node), else a throwaway key.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from swarmd.errors import ERR_BAD_REQUEST, SwarmdError
from swarmd.node.statusfile import LocalNode, read_local_node


def local_node(args: argparse.Namespace) -> LocalNode | None:
    """The node running on --data-dir, or None when none is."""
    try:
        return read_local_node(Path(args.settings.node.data_dir), getattr(args, "host", None))
    except SwarmdError:
        return None


async def call_local_node(data_dir: Path, host: str | None, method: str, params: Any, timeout: float,  # noqa: ASYNC109
                          identity: Any = None) -> Any:
    """Call `method` on the node running on data_dir (at the address its status.json names, or
    `host`), as `identity` (default: a throwaway key); connecting takes at most 10 s of timeout."""
    from swarmd_rpc import Client, ClientConfig

    local = read_local_node(data_dir, host)
    cfg = ClientConfig(timeout=min(timeout, 10.0))
    async with Client.for_peer(local.public_key, local.host, local.rpc_port, identity=identity, config=cfg) as node:
        return await node.call(None, method, params, timeout=timeout)


def operator_identity(args: argparse.Namespace) -> Any:
    from swarmd.node.identity import Identity

    path = Path(args.settings.node.data_dir) / "identity.key"
    return Identity.load(path) if path.exists() else None


def swarm_client(args: argparse.Namespace, config: Any, *, identity: Any = None) -> Any:
    """A swarmd_rpc.Client joined to the swarm of --bootstrap, or of the local node."""
    from swarmd_rpc import Client

    config.traversal = True  # peers behind NAT are reached punched or relayed, as daemons reach them
    client = Client.from_settings(args.settings, config=config, identity=identity)
    if not client.config.bootstrap:
        local = local_node(args)
        if local is None or local.dht_address is None:
            raise SwarmdError(
                ERR_BAD_REQUEST,
                "no swarm to ask: give --bootstrap HOST:PORT (or SWARMD_BOOTSTRAP), or the --data-dir of "
                f"a running node (none runs on {args.settings.node.data_dir})",
            )
        client.config.bootstrap = [local.dht_address]
    if getattr(args, "host", None):
        client.config.listen_host = args.host
    return client
