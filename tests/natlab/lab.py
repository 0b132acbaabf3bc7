"""Pytest helper for the NAT lab (tests/natlab/natlab.sh).

`NatLab` builds the namespaces for a mode pair (always `down` before `up`, so a
hard-killed earlier run cannot break this one), runs commands and long-lived
processes inside them with `ip netns exec`, reads the routers' drop counters,
and tears everything down, also when a test fails. One NATLAB_PREFIX per test
session keeps parallel sessions (and other engineers' labs) apart.

Use it through `lab_fixture()`:

    @pytest.fixture
    async def lab():
        async for one in lab_fixture():
            yield one

    @pytest.mark.natlab
    async def test_x(lab):
        lab.up("cone", "symmetric")
        proc = await lab.spawn("inet", [sys.executable, "-m", "swarmd", "--role", "relay"])
        await proc.wait_for('"event": "ready"')
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).with_name("natlab.sh")
REPO_ROOT = Path(__file__).resolve().parents[2]

INET_IP = "198.18.0.1"  # bootstrap / relay host on the "internet" bridge
PUB_IP = "198.18.0.20"  # a host with a public address
NATA_WAN = "198.18.0.11"
NATB_WAN = "198.18.0.12"
LANA_IP = "198.19.1.2"
LANB_IP = "198.19.2.2"
HOSTS = ("inet", "pub", "nat-a", "nat-b", "lan-a", "lan-b")
MODES = ("cone", "restricted", "fullcone", "symmetric")

SESSION_PREFIX = f"sw{os.getpid() % 100000}-"


def unavailable_reason() -> str | None:
    """Why the lab cannot run here (None when it can)."""
    if not sys.platform.startswith("linux"):
        return "the NAT lab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the NAT lab needs root (network namespaces and nftables); CI runs it as root"
    for tool, pkg in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"the NAT lab needs `{tool}`: apt-get install -y {pkg}"
    return _kernel_reason()


_KERNEL_REASON: list[str | None] = []


def _kernel_reason() -> str | None:
    """Root is not always enough (a container without CAP_SYS_ADMIN, no nf_tables):
    build and drop one throwaway namespace with an nftables table, once per session."""
    if _KERNEL_REASON:
        return _KERNEL_REASON[0]
    ns = f"swprobe{os.getpid()}"
    reason = None
    try:
        for argv in (
            ["ip", "netns", "add", ns],
            ["ip", "netns", "exec", ns, "nft", "add", "table", "ip", "probe"],
        ):
            res = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
            if res.returncode != 0:
                reason = f"the NAT lab cannot run here: `{' '.join(argv[:4])}` failed: {res.stderr.strip()[:200]}"
                break
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20, check=False)
    _KERNEL_REASON.append(reason)
    return reason


def skip_unless_available() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


class LabProcess:
    """A process running inside a lab namespace; its output is kept for diagnosis."""

    def __init__(self, host: str, argv: list[str], proc: asyncio.subprocess.Process) -> None:
        self.host = host
        self.argv = argv
        self.proc = proc
        self.lines: list[str] = []
        self._new_line = asyncio.Event()
        self._readers = [
            asyncio.get_running_loop().create_task(self._read(stream))
            for stream in (proc.stdout, proc.stderr)
            if stream is not None
        ]

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line over the stream limit: keep its head
                raw = await stream.read(65536)
            if not raw:
                return
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))
            self._new_line.set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def events(self, event: str) -> list[dict[str, Any]]:
        """JSON log lines whose "event" field equals event."""
        out = []
        for line in self.lines:
            if f'"{event}"' not in line or not line.startswith("{"):
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if doc.get("event") == event:
                out.append(doc)
        return out

    async def wait_for(self, pattern: str, within: float = 30.0) -> str:
        """Wait until an output line matches pattern (a regex); return that line."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + within
        seen = 0
        while True:
            for line in self.lines[seen:]:
                if rx.search(line):
                    return line
            seen = len(self.lines)
            if self.proc.returncode is not None and all(r.done() for r in self._readers):
                raise AssertionError(
                    f"{self.argv[0]} in {self.host} exited with {self.proc.returncode} before printing "
                    f"{pattern!r}; output:\n{self.output[-4000:]}"
                )
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line matching {pattern!r} within {within}s; output:\n{self.output[-4000:]}")
            self._new_line.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new_line.wait(), timeout=min(left, 0.5))

    async def wait_event(self, event: str, within: float = 30.0) -> dict[str, Any]:
        line = await self.wait_for(rf'"event": "{re.escape(event)}"', within)
        return json.loads(line)

    async def wait(self, within: float = 30.0) -> int:
        rc = await asyncio.wait_for(self.proc.wait(), within)
        await asyncio.wait_for(asyncio.gather(*self._readers, return_exceptions=True), within)
        return rc

    async def stop(self, within: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `within` seconds; reap the output readers."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), within)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        for r in self._readers:
            r.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        return self.proc.returncode


class NatLab:
    """One lab (six namespaces) named with a prefix; up/down are idempotent."""

    def __init__(self, prefix: str = SESSION_PREFIX) -> None:
        self.prefix = prefix
        self.modes: tuple[str, str] | None = None
        self.processes: list[LabProcess] = []

    def _script(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, NATLAB_PREFIX=self.prefix)
        return subprocess.run(
            ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
        )

    def up(self, mode_a: str = "cone", mode_b: str | None = None) -> None:
        mode_b = mode_b or mode_a
        for m in (mode_a, mode_b):
            if m not in MODES:
                raise ValueError(f"unknown NAT mode {m!r}; expected one of {MODES}")
        self.down()
        res = self._script("up", f"{mode_a}-{mode_b}")
        if res.returncode != 0:
            raise RuntimeError(f"natlab up {mode_a}-{mode_b} failed: {res.stderr.strip() or res.stdout.strip()}")
        self.modes = (mode_a, mode_b)

    def down(self) -> None:
        res = self._script("down")
        if res.returncode != 0:
            raise RuntimeError(f"natlab down failed: {res.stderr.strip()}")
        self.modes = None

    def ns(self, host: str) -> str:
        if host not in HOSTS:
            raise ValueError(f"unknown lab host {host!r}; expected one of {HOSTS}")
        return self.prefix + host

    def argv(self, host: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def run(self, host: str, argv: list[str], timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            self.argv(host, argv), capture_output=True, text=True, timeout=timeout, check=False, env=self.env()
        )
        if check and res.returncode != 0:
            raise AssertionError(
                f"{argv} in {host} exited {res.returncode}:\nstdout:\n{res.stdout[-3000:]}\nstderr:\n{res.stderr[-3000:]}"
            )
        return res

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        for var in [v for v in env if v.startswith("SWARMD_")]:
            del env[var]  # the daemons in the lab take their settings from flags only
        env["SWARMD_TRUST_OPEN"] = "true"  # ...and ask for an open swarm (the trust model is tested elsewhere)
        env.update(extra or {})
        return env

    async def spawn(self, host: str, argv: list[str], env: dict[str, str] | None = None) -> LabProcess:
        proc = await asyncio.create_subprocess_exec(
            *self.argv(host, argv),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env(env),
            cwd=str(REPO_ROOT),
            limit=1 << 20,
        )
        lp = LabProcess(host, argv, proc)
        self.processes.append(lp)
        return lp

    async def stop_processes(self) -> None:
        procs, self.processes = self.processes, []
        await asyncio.gather(*(p.stop() for p in procs), return_exceptions=True)

    def counters(self, router: str) -> dict[str, int]:
        """The router's drop counters: {"forward-dropped": packets, "input-dropped": packets}."""
        res = self.run(router, ["nft", "list", "table", "ip", "natlab"])
        out: dict[str, int] = {}
        for m in re.finditer(r'counter packets (\d+) bytes \d+ comment "([\w-]+)"', res.stdout):
            out[m.group(2)] = int(m.group(1))
        return out


async def lab_fixture() -> AsyncIterator[NatLab]:
    """Body of a `lab` fixture: skip when unavailable; stop processes and tear down, also on failure."""
    skip_unless_available()
    lab = NatLab()
    try:
        yield lab
    finally:
        await lab.stop_processes()
        lab.down()
