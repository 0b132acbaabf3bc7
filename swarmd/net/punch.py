"""Which path carries a connection, and how we got there.

The punching itself is in swarmd/net/udppunch.py (UDP hole and birthday
punching) and swarmd/net/quic.py (QUIC on the punched socket); this module
keeps the connection-info records every path fills in.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any


async def warm_up() -> None:
    """Import QUIC (aioquic) in a thread, ahead of the first punch: imported inside a
    punch it blocks the event loop (~0.2 s quiet, > 1 s loaded) and with it every other path."""
    import importlib

    await asyncio.to_thread(importlib.import_module, "swarmd.net.quic")


@dataclass
class PathAttempt:
    path: str  # direct / punched / relayed
    ok: bool
    seconds: float
    error: str = ""


@dataclass
class PathInfo:
    """The chosen path and how we got there: part of connection info and the logs."""

    path: str = ""
    setup_s: float = 0.0
    attempts: list[PathAttempt] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "setup_ms": round(self.setup_s * 1000, 1),
            "attempts": [
                {"path": a.path, "ok": a.ok, "ms": round(a.seconds * 1000, 1), **({"error": a.error} if a.error else {})}
                for a in self.attempts
            ],
            **self.detail,
        }
