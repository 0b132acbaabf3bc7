"""Shared test helpers: run the real CLI in a subprocess and read its log lines."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

# the package is silent as a library (swarmd/__init__.py); tests that read its log lines through
# their own loguru sinks are an application that wants them
logger.enable("swarmd")

ROOT = Path(__file__).resolve().parent.parent


def node_context(data_dir: Path, *roles: str, settings: Any = None, identity: Any = None, **parts: Any) -> Any:
    """A role's swarmd.roles.base.NodeContext as the daemon builds it: a fresh key and
    Supervisor unless given, `parts` (methods, swarm, dht, rpc_server, trust) as given."""
    from swarmd.node.identity import Identity
    from swarmd.node.supervisor import Supervisor
    from swarmd.roles.base import NodeContext
    from swarmd.settings import Settings

    parts.setdefault("tasks", Supervisor())
    return NodeContext(identity=identity or Identity.generate(), settings=settings or Settings(),
                       data_dir=Path(data_dir), instance_id="test", roles=roles, **parts)


class InProcessRacks:
    """An ork's RackCaller (swarmd.services.ork) reaching thing services in this process by
    rack key: the ork's fan-out tested without sockets."""

    def __init__(self) -> None:
        self.services: dict[str, Any] = {}

    def add(self, public_key: str, service: Any) -> None:
        self.services[public_key.lower()] = service

    async def __call__(self, rack: Any, method: str, params: Any, timeout: float) -> Any:  # noqa: ASYNC109
        from swarmd.errors import ERR_UNAVAILABLE, SwarmdError
        from swarmd.node.deadline import within

        svc = self.services.get(rack.public_key)
        if svc is None:
            raise SwarmdError(ERR_UNAVAILABLE, f"rack {rack.id} is not served in this process")
        return await within(svc.call(method, params), timeout=timeout)


def swarmd_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWARMD_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["SWARMD_TRUST_OPEN"] = "true"  # test daemons ask for an open swarm; trust tests pass operators
    env.update(extra)
    return env


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "swarmd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or swarmd_env(),
        cwd=str(ROOT),
    )


class Daemon:
    """A `swarmd` process started with the real CLI; its JSON log lines are parsed.

    A thread reads its log from the start to the end: a daemon whose pipe nobody read
    would block on a full pipe (about 64 KiB of log) and stall mid-test, the more likely
    the more a loaded machine makes it log (retries, timeouts).
    """

    def __init__(self, *args: str, env: dict[str, str] | None = None, command: tuple[str, ...] = ("-m", "swarmd")) -> None:
        """`command`: what python runs (a plugin script, `-m swarmd.plugins ork`), `args` its flags."""
        self.log_path = None
        self.proc = subprocess.Popen(
            [sys.executable, *command, "--log-format", "json", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env or swarmd_env(),
            cwd=str(ROOT),
        )
        self.lines: list[str] = []
        self._fresh: queue.Queue[str | None] = queue.Queue()  # lines not yet seen by wait_event; None: EOF
        self._reader = threading.Thread(target=self._read, name="daemon-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in iter(self.proc.stdout.readline, ""):
                self.lines.append(line)
                self._fresh.put(line)
        finally:
            self.proc.stdout.close()
            self._fresh.put(None)

    def wait_event(self, event: str, timeout: float = 60.0) -> dict[str, Any]:
        """Read log lines until one carries `"event": event`; fail with the log if the process exits."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._fresh.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {event!r} within {timeout}s:\n" + "".join(self.lines)) from None
            if line is None:
                self._fresh.put(None)  # later calls see the end too
                raise AssertionError(
                    f"swarmd exited ({self.proc.wait()}) before {event!r}:\n" + "".join(self.lines)
                )
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if doc.get("event") == event:
                return doc

    def wait_output(self, timeout: float = 30.0) -> None:
        """After the process ended: wait until its whole log is in self.lines."""
        self._reader.join(timeout)

    def stop(self, sig: int = 15, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.wait_output()
            raise AssertionError("swarmd did not stop within the bound:\n" + "".join(self.lines)) from None
        self.wait_output()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.wait_output()


def http_json(port: int, key: str, method: str, path: str, doc: Any = None) -> tuple[int, Any]:
    """One HTTP request with an API key to a gateway on loopback: (status, parsed JSON body)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        headers = {"x-api-key": key}
        body = None
        if doc is not None:
            body = json.dumps(doc).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        conn.close()


async def rpc_call(identity: Any, ready: dict[str, Any], method: str, params: dict[str, Any]) -> Any:
    """One RPC call, with `identity` (None: a throwaway key), to the daemon of a "ready" log line."""
    from swarmd.rpc import connect

    peer = await connect(identity, "127.0.0.1", ready["ports"]["rpc"],
                         remote_public_key=bytes.fromhex(ready["public_key"]), timeout=30)
    try:
        return await peer.call(method, params, timeout=60)
    finally:
        await peer.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def daemons(request):
    """Start `swarmd` processes; on a failed test their whole logs are printed."""
    started: list[Daemon] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Daemon:
        d = Daemon(*args, env=env)
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for i, d in enumerate(started):
            sys.stderr.write(f"----- swarmd #{i} {' '.join(d.proc.args[3:])} -----\n")
            sys.stderr.write("".join(d.lines[-200:]))
