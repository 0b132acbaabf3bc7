"""Which path carries a connection, and how we got there.

The punching itself is in swarmd/net/udppunch.py (UDP hole and birthday
punching) and swarmd/net/udx.py (the stream on the punched socket); this module
keeps the connection-info records every path fills in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
