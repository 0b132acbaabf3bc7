"""<data dir>/status.json: how tools on this box find the node running on a data dir.

The daemon writes it once it is ready (key, roles, ports, the address it bound) and
removes it on a clean stop. Every command that talks to "the local node" reads it
here, so they all dial the address the node actually bound (a node started with
`--host 10.0.0.5` is not on 127.0.0.1), never a guess.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swarmd.errors import ERR_NOT_FOUND, SwarmdError

FILE_NAME = "status.json"
_ANY = ("", "0.0.0.0", "::", "[::]")  # wildcard binds: reachable on loopback (dual-stack for ::)


@dataclass(frozen=True)
class LocalNode:
    """What status.json says about the node running on a data dir."""

    public_key: bytes
    host: str  # where to dial it (a wildcard bind becomes the loopback address)
    ports: dict[str, Any]
    roles: list[str] = field(default_factory=list)
    doc: dict[str, Any] = field(default_factory=dict)  # the whole file, for fields not named here

    @property
    def rpc_port(self) -> int:
        return int(self.ports["rpc"])

    @property
    def dht_address(self) -> str | None:
        """HOST:PORT of the node's DHT node, when it lists one (a bootstrap for short-lived tools)."""
        port = self.ports.get("dht")
        return f"{_bracket(self.host)}:{port}" if isinstance(port, int) else None


def dial_host(bound: str | None) -> str:
    """The address to reach a node listening on `bound`: itself, or loopback for a wildcard."""
    if bound is None or bound in _ANY:
        return "127.0.0.1"
    return bound


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def read_local_node(data_dir: Path, host: str | None = None) -> LocalNode:
    """The node running on data_dir (ERR_NOT_FOUND naming the dir when none is).

    `host` overrides the address from the file (the operator's --host)."""
    path = Path(data_dir) / FILE_NAME
    try:
        doc = json.loads(path.read_text())
        pk = bytes.fromhex(doc["public_key"])
        ports = dict(doc["ports"])
        int(ports["rpc"])
        if len(pk) != 32:
            raise ValueError("key length")
    except (OSError, ValueError, KeyError, TypeError):
        raise SwarmdError(
            ERR_NOT_FOUND,
            f"no running node found in {data_dir} ({FILE_NAME} missing or unreadable); "
            "start one with `swarmd --role ... --data-dir DIR` or pass that node's --data-dir",
        ) from None
    roles = [str(r) for r in doc.get("roles") or []]
    return LocalNode(pk, dial_host(host or doc.get("host")), ports, roles, doc)


def write_status_file(data_dir: Path, doc: dict[str, Any]) -> None:
    """Replace status.json atomically (a reader never sees half a file)."""
    path = Path(data_dir) / FILE_NAME
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
