import asyncio
import json
import os
import signal

import pytest

from swarmd.daemon import EXIT_CRASH, Node
from swarmd.node.trust import TrustConfig
from swarmd.roles.base import Role
from swarmd.settings import NodeConfig, Settings
from tests.conftest import run_cli, swarmd_env


def make_roles(events: list[str]):
    def role(role_name: str, fail_start: bool = False):
        class R(Role):
            name = role_name

            async def start(self) -> None:
                events.append(f"start:{role_name}")
                if fail_start:
                    raise RuntimeError("boom")
                self.ctx.tasks.spawn(asyncio.Event().wait(), name=f"{role_name}-loop")

            async def stop(self) -> None:
                events.append(f"stop:{role_name}")

        return R

    return role


async def test_roles_start_in_dependency_order_and_stop_in_reverse(tmp_path):
    events: list[str] = []
    role = make_roles(events)
    classes = {n: role(n) for n in ("gateway", "worker", "store")}
    settings = Settings(node=NodeConfig(data_dir=tmp_path, roles=["gateway", "worker", "store"]), trust=TrustConfig(open=True))
    node = Node(settings, role_classes=classes)
    ctx = await node.start()
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["roles"] == ["store", "worker", "gateway"]
    assert status["public_key"] == ctx.identity.public_hex and status["pid"] == os.getpid()
    assert len(ctx.tasks.describe()["tasks"]) == 3  # one per role (the swarm and dht have scopes of their own)
    await node.stop()
    assert events == [
        "start:store",
        "start:worker",
        "start:gateway",
        "stop:gateway",
        "stop:worker",
        "stop:store",
    ]
    assert len(ctx.tasks) == 0
    assert not (tmp_path / "status.json").exists()
    # the instance id persists across restarts
    node2 = Node(settings, role_classes=classes)
    ctx2 = await node2.start()
    assert ctx2.instance_id == ctx.instance_id and ctx2.identity.public_key == ctx.identity.public_key
    await node2.stop()


async def test_failed_start_stops_what_started(tmp_path):
    events: list[str] = []
    role = make_roles(events)
    classes = {"store": role("store"), "worker": role("worker", fail_start=True)}
    node = Node(Settings(node=NodeConfig(data_dir=tmp_path, roles=["store", "worker"]), trust=TrustConfig(open=True)), role_classes=classes)
    with pytest.raises(RuntimeError):
        await node.start()
    assert events == ["start:store", "start:worker", "stop:store"]


async def test_crashed_task_stops_node_nonzero(tmp_path):
    node = Node(Settings(node=NodeConfig(data_dir=tmp_path)))
    run = asyncio.create_task(node.run())
    while node.ctx is None or not (tmp_path / "status.json").exists():
        await asyncio.sleep(0.01)

    async def crash() -> None:
        raise ValueError("disk on fire")

    node.ctx.tasks.spawn(crash(), name="crasher")
    assert await asyncio.wait_for(run, 30) == EXIT_CRASH


def test_sigterm_stops_gracefully_exit_0(tmp_path, daemons):
    d = daemons("--data-dir", str(tmp_path))
    ready = d.wait_event("ready")
    assert len(ready["public_key"]) == 64
    assert json.loads((tmp_path / "status.json").read_text())["pid"] == d.proc.pid
    assert d.stop(signal.SIGTERM) == 0
    assert any('"event": "stopped"' in line for line in d.lines)


def test_sigint_stops_gracefully_exit_0(tmp_path, daemons):
    d = daemons("--data-dir", str(tmp_path))
    d.wait_event("ready")
    assert d.stop(signal.SIGINT) == 0


def test_identity_command_matches_daemon(tmp_path, daemons):
    r = run_cli("identity", "--data-dir", str(tmp_path))
    assert r.returncode == 0
    d = daemons("--data-dir", str(tmp_path))
    assert d.wait_event("ready")["public_key"] == r.stdout.strip()
    d.stop()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--role", "chef"], "unknown role 'chef'"),
        (["--port", "x"], "invalid int value"),
        (["--bootstrap", "nohost"], "HOST:PORT"),
    ],
)
def test_cli_usage_errors_exit_nonzero_one_line(args, needle, tmp_path):
    r = run_cli("--data-dir", str(tmp_path), *args)
    assert r.returncode == 2
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_unwritable_data_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    r = run_cli("--data-dir", str(blocker / "sub"))
    assert r.returncode != 0
    assert "data dir" in r.stderr or "data dir" in r.stdout


def test_loose_key_refused_by_daemon(tmp_path):
    assert run_cli("identity", "--data-dir", str(tmp_path)).returncode == 0
    os.chmod(tmp_path / "identity.key", 0o644)
    r = run_cli("--data-dir", str(tmp_path), "--log-format", "text")
    assert r.returncode != 0
    assert "chmod 600" in r.stderr


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("swarmd ")


def test_ports_in_use_and_unreachable_bootstrap_exit_nonzero_with_one_reason(tmp_path):
    import socket

    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    try:
        cases = [
            (["--dht-port", str(udp.getsockname()[1])], "cannot listen for the DHT"),
            (["--port", str(tcp.getsockname()[1])], "cannot listen on 127.0.0.1"),
            (["--bootstrap", f"127.0.0.1:{udp.getsockname()[1]}"], "no bootstrap node answered"),
        ]
        for args, needle in cases:
            # a daemon waits for its bootstrap forever by default; node.bootstrap_wait bounds it
            env = swarmd_env(SWARMD_BOOTSTRAP_WAIT="1")
            r = run_cli("--data-dir", str(tmp_path), "--log-format", "text", *args, env=env)
            assert r.returncode == 1, r.stderr
            assert "Traceback" not in r.stderr
            assert needle in r.stderr.strip().splitlines()[-1]
    finally:
        udp.close()
        tcp.close()
