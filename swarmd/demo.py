"""`make run`: a local swarm with every role in one process (filled in by the gateway issue)."""

from __future__ import annotations

import sys
from pathlib import Path

from swarmd.cli import main

if __name__ == "__main__":
    data = Path(".run/data")
    sys.exit(main(["--data-dir", str(data), "--log-format", "text"]))
