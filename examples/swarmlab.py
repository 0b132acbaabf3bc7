"""Start and stop real swarmd processes on 127.0.0.1 for the examples.

Each example runs the real CLI (`python -m swarmd ...`) in child processes,
waits for each daemon's `"event": "ready"` log line (which carries its
ports), and stops every process it started by PID (SIGTERM, then SIGKILL
if it does not exit) when the `with Lab()` block ends, even on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def env() -> dict[str, str]:
    """The environment for child processes: this checkout importable, no stray SWARMD_* settings."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("SWARMD_")}
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    # a loopback lab asks for an open swarm (every key admitted to every role); a real
    # deployment names its operator keys instead: docs/operations.md "Trust model"
    e["SWARMD_TRUST_OPEN"] = "true"
    return e


class Daemon:
    """One `swarmd --role ...` process; its JSON log lines are read by a thread so its pipe never fills."""

    def __init__(self, args: list[str], name: str, *, argv: list[str] | None = None,
                 environ: dict[str, str] | None = None, cwd: Path = ROOT) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            argv or [sys.executable, "-m", "swarmd", "--log-format", "json", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environ or env(), cwd=str(cwd),
        )
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self.ready: dict[str, Any] | None = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @classmethod
    def from_shell(cls, line: str, name: str, *, env: dict[str, str], cwd: Path) -> Daemon:
        """A daemon from a shell command line as a README shows it (`swarmd --role ... $A:17401`);
        bash expands the variables and then becomes the daemon (exec), so the PID is the daemon's."""
        return cls([], name, argv=["bash", "-c", f"exec {line}"], environ=env, cwd=cwd)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if self.ready is None and '"ready"' in line:
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                if doc.get("event") == "ready":
                    self.ready = doc
                    self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:  # noqa: ASYNC109
        """The ready event (public_key, ports) once the daemon serves; raises with its log if it died."""
        self._ready.wait(timeout)
        if self.ready is None:
            raise RuntimeError(f"{self.name} did not become ready:\n" + "".join(self.lines[-30:]))
        return self.ready

    @property
    def ports(self) -> dict[str, int]:
        return self.wait_ready()["ports"]

    def stop(self, timeout: float = 20.0) -> int:  # noqa: ASYNC109
        """SIGTERM this process (by its PID) and wait; SIGKILL it if it does not exit in time."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode


class Lab:
    """A scratch directory and the daemons started in it; everything is stopped on exit."""

    def __init__(self, keep: bool = False) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="swarmd-example-")
        self.dir = Path(self._tmp.name)
        self.daemons: list[Daemon] = []

    def start(self, name: str, *args: str) -> Daemon:
        """`swarmd --data-dir <lab>/<name> ARGS` in the background, waited on until ready."""
        d = Daemon(["--data-dir", str(self.dir / name), *args], name)
        self.daemons.append(d)
        d.wait_ready()
        print(f"started {name:10} pid {d.pid}  {' '.join(args)}", flush=True)
        return d

    def cli(self, *args: str, check: bool = True) -> str:
        """Run one `swarmd` command to completion and return its stdout."""
        r = subprocess.run([sys.executable, "-m", "swarmd", *args], capture_output=True, text=True,
                           env=env(), cwd=str(ROOT), timeout=120)
        if check and r.returncode != 0:
            raise RuntimeError(f"swarmd {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        for d in reversed(self.daemons):
            code = d.stop()
            print(f"stopped {d.name:10} pid {d.pid}  exit {code}", flush=True)
        self._tmp.cleanup()


def wait_until(pred: Any, timeout: float = 60.0, what: str = "condition") -> Any:  # noqa: ASYNC109
    """Poll pred() until it returns something truthy (swarm state spreads by DHT announcements)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = pred()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - retried until the deadline, then reported
            last = e
        time.sleep(0.3)
    raise RuntimeError(f"timed out waiting for {what}" + (f": {last}" if last else ""))
