"""Swarms of real `swarmd` processes for multi-process tests: the set-up they all repeat.

Each helper starts or asks real daemons (tests.conftest.Daemon through the `daemons`
fixture, the real CLI through run_cli); nothing here is a stand-in.

    boot = start_hub(daemons, tmp_path / "hub")              # bootstrap (+ roles), returns HOST:PORT
    worker, ready = start_worker(daemons, tmp_path / "w", boot, models=serve_mlp(tmp_path))
    poll_until(lambda: key in {r["public_key"] for r in lookup_json(boot)}, "worker announced", 60)
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tests.conftest import Daemon, run_cli
from tests.models import mlp_model

T = TypeVar("T")
WORKERS_TOPIC = "swarmd/workers"


def free_udp_port() -> int:
    """A UDP port free now on 127.0.0.1 (a bootstrap started later may take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_mlp(tmp_path: Path, name: str = "mlp", dims: tuple[int, ...] = (16, 64, 4)) -> Path:
    """A config file whose [worker] serves a small MLP from a local file as `name`."""
    model = tmp_path / f"{name}.onnx"
    model.write_bytes(mlp_model(dims))
    cfg = tmp_path / f"{name}-worker.toml"
    cfg.write_text(f'[worker]\nmodels = ["{name}={model}"]\n')
    return cfg


def start_hub(daemons: Callable[..., Daemon], data_dir: Path, roles: str = "bootstrap",
              env: dict[str, str] | None = None) -> tuple[Daemon, str]:
    """The first node of a new swarm (bootstrap plus `roles`); (daemon, its DHT address)."""
    hub = daemons("--role", roles, "--data-dir", str(data_dir), env=env)
    return hub, f"127.0.0.1:{hub.wait_event('ready')['ports']['dht']}"


def start_node(daemons: Callable[..., Daemon], roles: str, data_dir: Path, boot: str, *args: str,
               config: Path | None = None, env: dict[str, str] | None = None) -> tuple[Daemon, dict[str, Any]]:
    """A daemon with `roles` joined to `boot`; (daemon, its "ready" log line)."""
    pre = ("--config", str(config)) if config is not None else ()
    d = daemons(*pre, "--role", roles, "--data-dir", str(data_dir), "--bootstrap", boot, *args, env=env)
    return d, d.wait_event("ready")


def start_worker(daemons: Callable[..., Daemon], data_dir: Path, boot: str, *, models: Path | None = None,
                 env: dict[str, str] | None = None) -> tuple[Daemon, dict[str, Any]]:
    return start_node(daemons, "worker", data_dir, boot, config=models, env=env)


def lookup_json(boot: str, topic: str = WORKERS_TOPIC, timeout: float = 3.0) -> list[dict[str, Any]]:
    """`swarmd topic lookup TOPIC --json` from a separate process."""
    r = run_cli("topic", "lookup", topic, "--json", "--timeout", str(timeout), "--bootstrap", boot)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def status_json(data_dir: Path) -> dict[str, Any]:
    """`swarmd status --json` for the daemon running on data_dir."""
    r = run_cli("status", "--json", "--data-dir", str(data_dir))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def poll_until(check: Callable[[], T], what: str, deadline_s: float, every: float = 0.2,
               since: float | None = None) -> T:
    """Call check() until it returns something truthy, at most deadline_s seconds after `since`
    (default: now); fail naming `what`. A deadline the behaviour under test promises, or a
    bound a stall cannot reach: never a performance threshold."""
    start = time.monotonic() if since is None else since
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() - start > deadline_s:
            raise AssertionError(f"{what}: not within {deadline_s:g}s (last: {got!r})")
        time.sleep(every)


def admin_key(gateway: Daemon) -> str:
    """The first admin API key a new gateway printed (once) on its output."""
    m = re.search(r"first admin API key \(shown once, store it now\): (\S+)", "".join(gateway.lines))
    assert m is not None, "the gateway printed no first admin key:\n" + "".join(gateway.lines[-50:])
    return m.group(1)


def start_gateway(daemons: Callable[..., Daemon], data_dir: Path, boot: str, *args: str,
                  roles: str = "gateway", env: dict[str, str] | None = None) -> tuple[Daemon, int, str]:
    """A gateway (plus `roles`) on a free HTTP port joined to `boot`; (daemon, HTTP port, admin key)."""
    gw, ready = start_node(daemons, roles, data_dir, boot, "--http", "127.0.0.1:0", *args, env=env)
    return gw, ready["ports"]["http"], admin_key(gw)
